"""``batch_norm_relu_conv2d``: batch norm, ReLU and convolution in one op whose backward keeps the
batch norm's input but not the rectified tensor (it recomputes it); its functional wrapper and
the fake kernels of its private ops (training forward and backward). In evaluation it
decomposes into native batch norm, ReLU and conv2d, which export to ONNX; its private ops fail
the export with a message that names them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from cifarnet import _C  # noqa: F401  (defines the op)
from cifarnet._arguments import conv_padding, pair
from cifarnet.ops._layout import (
    batch_norm_grad_input_memory_format,
    batch_norm_memory_format,
    batch_norm_stats_dtype,
    channel_stats,
    check_input_channels,
    conv_output_memory_format,
    empty_like_layout,
)
from cifarnet.ops._onnx import BACKWARD, EXPORT_IN_EVAL_MODE, no_onnx_translation
from cifarnet.ops._transforms import under_vmap


def batch_norm_relu_conv2d(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride=1,
    padding=0,
) -> Tensor:
    """Batch norm, ReLU and convolution in one op.

    Computes ``F.conv2d(F.relu(F.batch_norm(input, running_mean, running_var, bn_weight,
    bn_bias, training, momentum, eps)), weight, bias, stride, padding)``, updating the running
    statistics in training as :func:`batch_norm` does. In training the backward keeps
    ``input`` and the per-channel batch statistics, not the rectified tensor natively kept as
    the convolution's input: it recomputes it (one elementwise pass over ``input``), so a
    ResNet bottleneck's BN → ReLU → conv saves one activation fewer. Evaluation is the native
    composition. Dtypes as :func:`batch_norm` for the batch norm (float32 parameters and
    running statistics with bfloat16/float16 data, as autocast leaves them) and as
    ``F.conv2d`` for the convolution (``weight`` and ``bias`` in ``input``'s dtype).

    Args:
        input (Tensor[N, C_in, H, W]): float32, float64, bfloat16 or float16, contiguous or
            channels_last. Empty batches are computed as native computes them (no statistics
            to update).
        running_mean, running_var (Tensor[C_in], optional): updated in place in training;
            required in evaluation.
        bn_weight, bn_bias (Tensor[C_in], optional): the batch norm's affine transform.
        weight (Tensor[C_out, C_in, kH, kW]), bias (Tensor[C_out], optional), stride,
            padding (an int, a pair, ``'valid'`` or ``'same'``): the convolution (no groups,
            no dilation).
        training (bool): use batch statistics.
        momentum (float): weight of the batch statistics in the running ones.
        eps (float): added to the variance.

    Returns:
        Tensor[N, C_out, H_out, W_out]: in native conv2d's layout (channels_last when
        ``input`` or ``weight`` is).
    """
    tensors = (input, running_mean, running_var, bn_weight, bn_bias, weight, bias)
    if has_torch_function(tensors):
        return handle_torch_function(
            batch_norm_relu_conv2d,
            tensors,
            input,
            running_mean,
            running_var,
            bn_weight,
            bn_bias,
            weight,
            bias,
            training,
            momentum,
            eps,
            stride,
            padding,
        )
    if input.dim() != 4:
        raise RuntimeError(
            f"input must be a 4-D tensor (N, C_in, H, W), got {input.dim()}-D tensor of shape {list(input.shape)}"
        )
    if under_vmap():  # see cifarnet.ops._transforms
        normalized = F.batch_norm(input, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
        return F.conv2d(F.relu(normalized), weight, bias, stride, padding)
    if isinstance(padding, str) and padding == "same" and (weight.dim() == 4 and any(k % 2 == 0 for k in weight.shape[2:])):
        # NB: conv_padding pads the input for an even kernel's extra row or column, which here
        # would enter the batch statistics: native pads the rectified tensor.
        raise ValueError(
            f"padding='same' with an even kernel {list(weight.shape[2:])} pads asymmetrically, which this op "
            "cannot; pass explicit padding or use an odd kernel"
        )
    input, padding = conv_padding(input, weight, stride, padding)
    return torch.ops.cifarnet.batch_norm_relu_conv2d.default(
        input,
        running_mean,
        running_var,
        bn_weight,
        bn_bias,
        weight,
        bias,
        bool(training),
        float(momentum),
        float(eps),
        pair(stride, "stride"),
        padding,
    )


def _rectified_fake(input):
    """The rectified tensor the kernels convolve: batch norm's output layout."""
    return empty_like_layout(input, batch_norm_memory_format(input))


@torch.library.register_fake("cifarnet::_batch_norm_relu_conv2d_training")
def _batch_norm_relu_conv2d_training_fake(input, bn_weight, bn_bias, weight, bias, eps, stride, padding):
    torch._check(input.dim() == 4, lambda: f"input must be a 4-D tensor (N, C_in, H, W), got {input.dim()}-D")
    rectified = _rectified_fake(input)
    output = F.conv2d(rectified, weight, bias, stride, padding)  # native's shape checks and rule
    check_input_channels(weight)
    output = empty_like_layout(output, conv_output_memory_format(rectified, weight))
    return (output, *channel_stats(input, input.shape[1]))


@torch.library.register_fake("cifarnet::_batch_norm_relu_conv2d_training_backward")
def _batch_norm_relu_conv2d_training_backward_fake(
    grad_output, input, save_mean, save_var, bn_weight, bn_bias, weight, eps, stride, padding, output_mask
):
    # The gradients reaching the batch norm, and the weight's, in the convolution's layout; the
    # batch norm's parameters' gradients in the statistics dtype (the autograd formula casts
    # each to its parameter's dtype).
    conv_format = conv_output_memory_format(_rectified_fake(input), weight)
    grad_normalised = empty_like_layout(input, conv_format)
    channels, grad_dtype = input.shape[1], batch_norm_stats_dtype(input)
    return (
        empty_like_layout(input, batch_norm_grad_input_memory_format(input, grad_normalised)) if output_mask[0] else None,
        input.new_empty(channels, dtype=grad_dtype) if output_mask[1] else None,
        input.new_empty(channels, dtype=grad_dtype) if output_mask[2] else None,
        empty_like_layout(weight, conv_format) if output_mask[3] else None,
        grad_output.new_empty(weight.shape[0]) if output_mask[4] else None,
    )


# The ops of training and of gradients: no ONNX translation, a message (evaluation exports).
no_onnx_translation(
    torch.ops.cifarnet._batch_norm_relu_conv2d_training.default,
    "the batch norm -> ReLU -> conv layer with batch statistics: a model in training mode, or a batch norm "
    "without running statistics",
    f"{EXPORT_IN_EVAL_MODE} with running statistics, where the layer exports as BatchNormalization -> Relu -> Conv",
)
no_onnx_translation(torch.ops.cifarnet._batch_norm_relu_conv2d_training_backward.default, *BACKWARD)
