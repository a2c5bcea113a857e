"""``conv2d_batch_norm_relu_max_pool2d``: convolution, batch norm, ReLU and max pooling in one
op; its functional wrapper and the fake kernels of its private ops (training forward and
backward, and the phase ops synchronized batch norm runs between its collectives). In
evaluation it decomposes into ``conv2d_relu_max_pool2d``, whose ONNX translation exports it;
its private ops fail the export with a message that names them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from cifarnet import _C  # noqa: F401  (defines the op)
from cifarnet._arguments import check_bool, conv_padding, pair, pool_stride_pair
from cifarnet.ops._layout import batch_norm_stats_dtype, channel_stats, is_unbatched
from cifarnet.ops._onnx import BACKWARD, EXPORT_IN_EVAL_MODE, no_onnx_translation
from cifarnet.ops._transforms import under_vmap
from cifarnet.ops.conv2d_relu_max_pool2d import (
    _conv2d_relu_max_pool2d_backward_fake,
    _conv2d_relu_max_pool2d_with_argmax_fake,
)


def conv2d_batch_norm_relu_max_pool2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride=1,
    padding=0,
    pool_size=2,
    pool_stride=None,
    ceil_mode: bool = False,
    pool_padding=0,
) -> Tensor:
    """Convolution, batch norm, ReLU and max pooling in one op.

    Computes ``F.max_pool2d(F.relu(F.batch_norm(F.conv2d(input, weight, bias, stride,
    padding), running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)),
    pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)``, updating the running statistics in
    training as :func:`batch_norm` does. The backward keeps the input, the convolution output,
    the per-channel statistics and a one-byte window argmax (no normalised or ReLU output, no
    int64 indices). In evaluation the batch norm is folded into the convolution.
    Dtypes as :func:`conv2d_relu_max_pool2d` for the convolution and as :func:`batch_norm` for
    the batch-norm parameters (float32 ones with bfloat16/float16 data, as autocast leaves them).

    Args:
        input (Tensor[N, C_in, H, W] or Tensor[C_in, H, W]), weight (Tensor[C_out, C_in, kH, kW]),
            bias (Tensor[C_out], optional), stride, padding: the convolution. An unbatched
            ``[C_in, H, W]`` input is computed as a batch of one (batch statistics over its
            ``H_conv x W_conv`` positions), as in :func:`conv2d_relu_max_pool2d`.
        running_mean, running_var, bn_weight, bn_bias (Tensor[C_out], optional), training,
            momentum, eps: the batch norm, as in :func:`batch_norm`.
        pool_size, pool_stride, ceil_mode, pool_padding: the max pooling, as in
            :func:`conv2d_relu_max_pool2d` (windows of at most 255 elements, padding at most
            half the window; ``pool_padding`` last, so that calls written before it keep
            their meaning).

    Returns:
        Tensor[N, C_out, H_out, W_out] (Tensor[C_out, H_out, W_out] for an unbatched input): in
        the layout of the native composition, as :func:`conv2d_relu_max_pool2d`'s.
    """
    tensors = (input, weight, bias, running_mean, running_var, bn_weight, bn_bias)
    if has_torch_function(tensors):
        return handle_torch_function(
            conv2d_batch_norm_relu_max_pool2d,
            tensors,
            input,
            weight,
            bias,
            running_mean,
            running_var,
            bn_weight,
            bn_bias,
            training,
            momentum,
            eps,
            stride,
            padding,
            pool_size,
            pool_stride,
            ceil_mode,
            pool_padding,
        )
    unbatched = is_unbatched(input)
    batch = input.unsqueeze(0) if unbatched else input
    if under_vmap():  # see cifarnet.ops._transforms
        conv = F.conv2d(batch, weight, bias, stride, padding)
        normalized = F.batch_norm(conv, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
        output = F.max_pool2d(F.relu(normalized), pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)
        return output.squeeze(0) if unbatched else output
    input, padding = conv_padding(batch, weight, stride, padding)
    output = torch.ops.cifarnet.conv2d_batch_norm_relu_max_pool2d.default(
        input,
        weight,
        bias,
        running_mean,
        running_var,
        bn_weight,
        bn_bias,
        bool(training),
        float(momentum),
        float(eps),
        pair(stride, "stride"),
        padding,
        pair(pool_size, "pool_size"),
        pool_stride_pair(pool_stride),
        check_bool(ceil_mode, "ceil_mode"),
        pair(pool_padding, "pool_padding"),
    )
    # NB: native max_pool2d gives a 3-D input a contiguous output, whatever the convolution's
    # layout (a channels-last weight makes the batch of one's output channels-last).
    return output.squeeze(0).contiguous() if unbatched else output


def _conv_output_fake(input, weight, bias, stride, padding):
    """The saved convolution output: always channels-last (the kernels normalise from it)."""
    conv = F.conv2d(input, weight, bias, stride, padding)
    return torch.empty(conv.shape, dtype=input.dtype, device=input.device, memory_format=torch.channels_last)


@torch.library.register_fake("cifarnet::_conv2d_batch_norm_relu_max_pool2d_training")
def _conv2d_batch_norm_relu_max_pool2d_training_fake(
    input, weight, bias, bn_weight, bn_bias, eps, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding
):
    output, argmax = _conv2d_relu_max_pool2d_with_argmax_fake(
        input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding
    )
    conv_output = _conv_output_fake(input, weight, bias, stride, padding)
    return (output, argmax, conv_output, *channel_stats(input, weight.shape[0]))


@torch.library.register_fake("cifarnet::_conv2d_batch_norm_relu_max_pool2d_training_backward")
def _conv2d_batch_norm_relu_max_pool2d_training_backward_fake(
    grad_output,
    input,
    weight,
    conv_output,
    save_mean,
    save_var,
    bn_weight,
    argmax,
    eps,
    stride,
    padding,
    pool_size,
    pool_stride,
    ceil_mode,
    pool_padding,
    output_mask,
):
    grad_input, grad_weight, grad_bias = _conv2d_relu_max_pool2d_backward_fake(
        grad_output, input, weight, argmax, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding, output_mask[:3]
    )
    # The batch norm's parameters' gradients in the statistics dtype (the autograd formula
    # casts each to its parameter's dtype).
    channels = weight.shape[0]
    grad_dtype = batch_norm_stats_dtype(input)
    return (
        grad_input,
        grad_weight,
        grad_bias,
        input.new_empty(channels, dtype=grad_dtype) if output_mask[3] else None,
        input.new_empty(channels, dtype=grad_dtype) if output_mask[4] else None,
    )


# The phase ops of synchronized batch norm (cifarnet/_sync_batch_norm.py).


@torch.library.register_fake("cifarnet::_conv2d_batch_norm_relu_max_pool2d_stats")
def _conv2d_batch_norm_relu_max_pool2d_stats_fake(
    input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding
):
    # The geometry checks of the fused op (its pooled output is the epilogue's).
    _conv2d_relu_max_pool2d_with_argmax_fake(
        input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding
    )
    return (_conv_output_fake(input, weight, bias, stride, padding), *channel_stats(input, weight.shape[0]))


@torch.library.register_fake("cifarnet::_conv2d_batch_norm_relu_max_pool2d_epilogue")
def _conv2d_batch_norm_relu_max_pool2d_epilogue_fake(
    input,
    weight,
    conv_output,
    mean,
    var,
    bn_weight,
    bn_bias,
    eps,
    stride,
    padding,
    pool_size,
    pool_stride,
    ceil_mode,
    pool_padding,
):
    return _conv2d_relu_max_pool2d_with_argmax_fake(
        input, weight, None, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding
    )


@torch.library.register_fake("cifarnet::_conv2d_batch_norm_relu_max_pool2d_backward_reduce")
def _conv2d_batch_norm_relu_max_pool2d_backward_reduce_fake(
    grad_output, input, weight, conv_output, save_mean, argmax, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding
):
    return channel_stats(input, weight.shape[0])


@torch.library.register_fake("cifarnet::_conv2d_batch_norm_relu_max_pool2d_backward_elementwise")
def _conv2d_batch_norm_relu_max_pool2d_backward_elementwise_fake(
    grad_output,
    input,
    weight,
    conv_output,
    save_mean,
    save_var,
    bn_weight,
    argmax,
    sum_dy,
    sum_dy_xmu,
    count,
    eps,
    stride,
    padding,
    pool_size,
    pool_stride,
    ceil_mode,
    pool_padding,
    output_mask,
):
    return _conv2d_relu_max_pool2d_backward_fake(
        grad_output, input, weight, argmax, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding, output_mask
    )


# The ops of training and of gradients: no ONNX translation, a message (evaluation exports).
no_onnx_translation(
    torch.ops.cifarnet._conv2d_batch_norm_relu_max_pool2d_training.default,
    "the fused conv -> batch norm -> ReLU -> max-pool layer with batch statistics: a model in training mode, "
    "or a batch norm without running statistics",
    f"{EXPORT_IN_EVAL_MODE} with running statistics, where the layer exports as Conv -> Relu -> MaxPool",
)
no_onnx_translation(torch.ops.cifarnet._conv2d_batch_norm_relu_max_pool2d_training_backward.default, *BACKWARD)
no_onnx_translation(
    torch.ops.cifarnet._conv2d_batch_norm_relu_max_pool2d_stats.default,
    "the statistics of the fused layer with synchronized batch norm in training",
)
no_onnx_translation(
    torch.ops.cifarnet._conv2d_batch_norm_relu_max_pool2d_epilogue.default,
    "the normalisation of the fused layer with synchronized batch norm in training",
)
no_onnx_translation(torch.ops.cifarnet._conv2d_batch_norm_relu_max_pool2d_backward_reduce.default, *BACKWARD)
no_onnx_translation(torch.ops.cifarnet._conv2d_batch_norm_relu_max_pool2d_backward_elementwise.default, *BACKWARD)
