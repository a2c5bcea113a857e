"""``conv2d_relu_max_pool2d``: convolution, ReLU and max pooling in one op; its functional
wrapper, fake kernels and ONNX translation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from cifarnet import _C  # noqa: F401  (defines the op)
from cifarnet._arguments import check_bool, conv_padding, pair, pool_stride_pair
from cifarnet.ops._layout import (
    check_input_channels,
    check_pool_padding,
    check_pool_window,
    conv_output_memory_format,
    is_unbatched,
    pooled_output_memory_format,
)
from cifarnet.ops._onnx import BACKWARD, no_onnx_translation, onnx_translation, pads


def conv2d_relu_max_pool2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    pool_size=2,
    pool_stride=None,
    ceil_mode: bool = False,
    pool_padding=0,
) -> Tensor:
    """Convolution, ReLU and max pooling in one op.

    Computes ``F.max_pool2d(F.relu(F.conv2d(input, weight, bias, stride, padding)),
    pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)`` without materialising the
    convolution output: the backward keeps only ``input``, ``weight`` and a one-byte window
    argmax. Ties and NaN are resolved as native ``max_pool2d`` resolves them, so gradients
    match.

    Args:
        input (Tensor[N, C_in, H, W] or Tensor[C_in, H, W]): float32, float64, bfloat16 or
            float16 (16-bit data are computed in float32); contiguous or channels_last. An
            unbatched ``[C_in, H, W]`` input is computed as a batch of one, as ``F.conv2d``
            and ``F.max_pool2d`` compute it. Under ``torch.autocast`` input, weight and bias
            are cast to the autocast dtype.
        weight (Tensor[C_out, C_in, kH, kW]): same dtype and device as ``input``.
        bias (Tensor[C_out], optional): convolution bias.
        stride (int or (int, int)): convolution stride.
        padding (int, (int, int), 'valid' or 'same'): implicit zero padding of the
            convolution, as in ``F.conv2d``.
        pool_size (int or (int, int)): pooling window; at most 255 elements.
        pool_stride (int or (int, int), optional): pooling stride; ``None`` means ``pool_size``.
        ceil_mode (bool): round the pooled size up, as in ``F.max_pool2d`` (the last window
            must start inside the convolution output or its left pool padding).
        pool_padding (int or (int, int)): implicit padding of the pooling windows, as
            ``F.max_pool2d``'s ``padding``: padded positions never win (native's ``-inf``);
            at most half of ``pool_size``, else ``RuntimeError`` as natively. Last, after
            ``ceil_mode``, so that calls written before it keep their meaning.

    Returns:
        Tensor[N, C_out, H_out, W_out] (Tensor[C_out, H_out, W_out] for an unbatched input): in
        the layout of the native composition: native conv2d's memory format (channels_last if
        ``input`` or ``weight`` is channels_last), contiguous for an unbatched input. The
        gradients of ``input`` and ``weight`` take the convolution's memory format too.
    """
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(
            conv2d_relu_max_pool2d,
            (input, weight, bias),
            input,
            weight,
            bias,
            stride,
            padding,
            pool_size,
            pool_stride,
            ceil_mode,
            pool_padding,
        )
    unbatched = is_unbatched(input)
    input, padding = conv_padding(input.unsqueeze(0) if unbatched else input, weight, stride, padding)
    output = torch.ops.cifarnet.conv2d_relu_max_pool2d.default(
        input,
        weight,
        bias,
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


@torch.library.register_fake("cifarnet::conv2d_relu_max_pool2d_with_argmax")
def _conv2d_relu_max_pool2d_with_argmax_fake(
    input,
    weight,
    bias=None,
    stride=(1, 1),
    padding=(0, 0),
    pool_size=(2, 2),
    pool_stride=(),
    ceil_mode=False,
    pool_padding=(0, 0),
):
    # Defaults mirror the schema's: callers may leave defaulted arguments out.
    torch._check(input.dim() == 4, lambda: f"input must be a 4-D tensor (N, C, H, W), got {input.dim()}-D")
    for name, tensor in (("weight", weight), ("bias", bias)):
        torch._check(
            tensor is None or tensor.device == input.device,
            lambda: f"{name} is on {tensor.device} but input is on {input.device}",
        )
    check_pool_window(pool_size)
    check_pool_padding(pool_size, pool_padding)
    conv = F.conv2d(input, weight, bias, stride, padding)
    check_input_channels(weight)
    pooled = F.max_pool2d(conv, pool_size, pool_stride or pool_size, pool_padding, ceil_mode=ceil_mode)
    memory_format = pooled_output_memory_format(input, weight, conv)
    output = torch.empty(pooled.shape, dtype=input.dtype, device=input.device, memory_format=memory_format)
    argmax = torch.empty(pooled.shape, dtype=torch.uint8, device=input.device, memory_format=memory_format)
    return output, argmax


@torch.library.register_fake("cifarnet::_conv2d_relu_max_pool2d_backward")
def _conv2d_relu_max_pool2d_backward_fake(
    grad_output, input, weight, argmax, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding, output_mask
):
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        memory_format = conv_output_memory_format(input, weight)
        grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=memory_format)
    if output_mask[1]:
        memory_format = conv_output_memory_format(input, weight)
        grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device, memory_format=memory_format)
    if output_mask[2]:
        grad_bias = weight.new_empty(weight.shape[0])
    return grad_input, grad_weight, grad_bias


@onnx_translation(torch.ops.cifarnet.conv2d_relu_max_pool2d.default)
def _conv2d_relu_max_pool2d_onnx(
    input,
    weight,
    bias=None,
    stride=(1, 1),
    padding=(0, 0),
    pool_size=(2, 2),
    pool_stride=(),
    ceil_mode=False,
    pool_padding=(0, 0),
):
    """``cifarnet::conv2d_relu_max_pool2d`` as ``Conv -> Relu -> MaxPool`` (defaults mirror the schema)."""
    from onnxscript import opset18 as op

    conv = op.Conv(input, weight, bias, strides=list(stride), pads=pads(padding), dilations=[1, 1], group=1)
    pooled, _ = op.MaxPool(
        op.Relu(conv),
        kernel_shape=list(pool_size),
        strides=list(pool_stride or pool_size),
        pads=pads(pool_padding),  # ONNX MaxPool's padding never wins either
        dilations=[1, 1],
        ceil_mode=int(ceil_mode),
    )
    return pooled


no_onnx_translation(
    torch.ops.cifarnet.conv2d_relu_max_pool2d_with_argmax.default,
    "what conv2d_relu_max_pool2d decomposes into, in an ExportedProgram after run_decompositions()",
    "export the model, or its torch.export.export program as it comes (not decomposed), where "
    "conv2d_relu_max_pool2d reaches the exporter whole and becomes Conv -> Relu -> MaxPool",
)
no_onnx_translation(torch.ops.cifarnet._conv2d_relu_max_pool2d_backward.default, *BACKWARD)
