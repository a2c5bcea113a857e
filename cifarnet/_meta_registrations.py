"""Fake (meta) kernels: output shapes, dtypes and strides of every op, for torch.compile.

Shapes and the errors for impossible geometry come from native conv2d and max_pool2d's own
meta functions, so they agree with the composition the ops replace; layouts follow the rule
the C++ kernels use (channels_last when the input or the weight is channels_last).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format as _prims_suggest_memory_format

from cifarnet import _C


def suggest_memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """The layout c10's ``TensorBase::suggest_memory_format`` gives ``tensor``, by which the C++
    kernels lay out their outputs: channels_last where the strides are *like* channels_last."""
    # NB: torch._prims_common is private, but it holds the only Python copy of c10's rule (no
    # public tensor method exposes it; is_contiguous(memory_format=...) is a different test).
    # tests/test_torch_internals.py checks it against the C++ kernels.
    return _prims_suggest_memory_format(tensor)


def conv_output_memory_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """Native conv2d's output layout: channels_last when the input or the weight is, except for
    float64 on CUDA (cuDNN has no channels-last float64 path; native returns contiguous)."""
    if input.device.type == "cuda" and input.dtype == torch.float64:
        return torch.contiguous_format
    if torch.channels_last in (suggest_memory_format(input), suggest_memory_format(weight)):
        return torch.channels_last
    return torch.contiguous_format


def _check_pool_window(pool_size) -> None:
    elements = pool_size[0] * pool_size[1]
    torch._check(
        elements <= _C.MAX_POOL_WINDOW_ELEMENTS,
        lambda: f"pool_size {list(pool_size)} has {elements} elements; at most "
        f"{_C.MAX_POOL_WINDOW_ELEMENTS} are supported (the argmax is stored in one byte)",
    )


@torch.library.register_fake("cifarnet::conv2d_relu_max_pool2d_with_argmax")
def _conv2d_relu_max_pool2d_with_argmax_fake(
    input, weight, bias=None, stride=(1, 1), padding=(0, 0), pool_size=(2, 2), pool_stride=(), ceil_mode=False
):
    # Defaults mirror the schema's: callers may leave defaulted arguments out.
    torch._check(input.dim() == 4, lambda: f"input must be a 4-D tensor (N, C, H, W), got {input.dim()}-D")
    for name, tensor in (("weight", weight), ("bias", bias)):
        torch._check(
            tensor is None or tensor.device == input.device,
            lambda: f"{name} is on {tensor.device} but input is on {input.device}",
        )
    _check_pool_window(pool_size)
    conv = F.conv2d(input, weight, bias, stride, padding)
    pooled = F.max_pool2d(conv, pool_size, pool_stride or pool_size, ceil_mode=ceil_mode)
    memory_format = conv_output_memory_format(input, weight)
    output = torch.empty(pooled.shape, dtype=input.dtype, device=input.device, memory_format=memory_format)
    argmax = torch.empty(pooled.shape, dtype=torch.uint8, device=input.device, memory_format=memory_format)
    return output, argmax


@torch.library.register_fake("cifarnet::_conv2d_relu_max_pool2d_backward")
def _conv2d_relu_max_pool2d_backward_fake(
    grad_output, input, weight, argmax, stride, padding, pool_size, pool_stride, ceil_mode, output_mask
):
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        memory_format = conv_output_memory_format(input, weight)
        grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=memory_format)
    if output_mask[1]:
        grad_weight = torch.empty(
            weight.shape, dtype=weight.dtype, device=weight.device, memory_format=suggest_memory_format(weight)
        )
    if output_mask[2]:
        grad_bias = weight.new_empty(weight.shape[0])
    return grad_input, grad_weight, grad_bias


def _batch_norm_memory_format(input: torch.Tensor) -> torch.memory_format:
    """The layout the batch norm kernels give their outputs: channels_last for channels-last
    4-D inputs, else contiguous."""
    if input.dim() == 4 and suggest_memory_format(input) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def _batch_norm_stats_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype statistics are saved in: float64 on the CPU for every input dtype, float32
    for float16/bfloat16/float32 on CUDA (at::toAccumulateType)."""
    if input.dtype == torch.float64:
        return torch.float64
    return torch.float64 if input.device.type == "cpu" else torch.float32


def _parameter_grad_dtype(parameter, input: torch.Tensor) -> torch.dtype:
    """The dtype of a per-channel parameter's gradient: the parameter's own where it is given
    (a float32 batch-norm weight of bfloat16 data, as native allows), else the input's."""
    return input.dtype if parameter is None else parameter.dtype


def _empty_like_layout(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format)


@torch.library.register_fake("cifarnet::_batch_norm_forward")
def _batch_norm_forward_fake(input, mean, var, weight, bias, training, eps):
    torch._check(input.dim() >= 2, lambda: f"input must have at least 2 dimensions (N, C, ...), got {input.dim()}-D")
    channels = input.shape[1]
    stats_dtype = _batch_norm_stats_dtype(input)
    return (
        _empty_like_layout(input, _batch_norm_memory_format(input)),
        input.new_empty(channels, dtype=stats_dtype),
        input.new_empty(channels, dtype=stats_dtype),
    )


@torch.library.register_fake("cifarnet::_batch_norm_backward")
def _batch_norm_backward_fake(grad_output, input, save_mean, save_var, weight, training, eps, output_mask):
    channels = input.shape[1]
    grad_dtype = _parameter_grad_dtype(weight, input)
    return (
        _empty_like_layout(input, _batch_norm_memory_format(input)) if output_mask[0] else None,
        input.new_empty(channels, dtype=grad_dtype) if output_mask[1] else None,
        input.new_empty(channels, dtype=grad_dtype) if output_mask[2] else None,
    )


@torch.library.register_fake("cifarnet::_batch_norm_update_running_stats")
def _batch_norm_update_running_stats_fake(running_mean, running_var, save_mean, save_var, momentum, count):
    return None


@torch.library.register_fake("cifarnet::_conv2d_batch_norm_relu_max_pool2d_training")
def _conv2d_batch_norm_relu_max_pool2d_training_fake(
    input, weight, bias, bn_weight, bn_bias, eps, stride, padding, pool_size, pool_stride, ceil_mode
):
    output, argmax = _conv2d_relu_max_pool2d_with_argmax_fake(
        input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode
    )
    conv = F.conv2d(input, weight, bias, stride, padding)
    conv_output = torch.empty(conv.shape, dtype=input.dtype, device=input.device, memory_format=torch.channels_last)
    stats_dtype = _batch_norm_stats_dtype(input)
    channels = weight.shape[0]
    return (
        output,
        argmax,
        conv_output,
        input.new_empty(channels, dtype=stats_dtype),
        input.new_empty(channels, dtype=stats_dtype),
    )


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
    output_mask,
):
    grad_input, grad_weight, grad_bias = _conv2d_relu_max_pool2d_backward_fake(
        grad_output, input, weight, argmax, stride, padding, pool_size, pool_stride, ceil_mode, output_mask[:3]
    )
    channels = weight.shape[0]
    grad_dtype = _parameter_grad_dtype(bn_weight, input)
    return (
        grad_input,
        grad_weight,
        grad_bias,
        input.new_empty(channels, dtype=grad_dtype) if output_mask[3] else None,
        input.new_empty(channels, dtype=grad_dtype) if output_mask[4] else None,
    )


# The phase ops of synchronized batch norm (cifarnet/_sync_batch_norm.py).


def _channel_stats(input: torch.Tensor, channels) -> tuple[torch.Tensor, torch.Tensor]:
    stats_dtype = _batch_norm_stats_dtype(input)
    return input.new_empty(channels, dtype=stats_dtype), input.new_empty(channels, dtype=stats_dtype)


@torch.library.register_fake("cifarnet::_batch_norm_stats")
def _batch_norm_stats_fake(input):
    torch._check(input.dim() >= 2, lambda: f"input must have at least 2 dimensions (N, C, ...), got {input.dim()}-D")
    return _channel_stats(input, input.shape[1])


@torch.library.register_fake("cifarnet::_batch_norm_backward_reduce")
def _batch_norm_backward_reduce_fake(grad_output, input, mean):
    return _channel_stats(input, input.shape[1])


@torch.library.register_fake("cifarnet::_batch_norm_backward_elementwise")
def _batch_norm_backward_elementwise_fake(grad_output, input, mean, var, weight, sum_dy, sum_dy_xmu, count, eps):
    return _empty_like_layout(input, _batch_norm_memory_format(input))


@torch.library.register_fake("cifarnet::_conv2d_batch_norm_relu_max_pool2d_stats")
def _conv2d_batch_norm_relu_max_pool2d_stats_fake(input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode):
    # The geometry checks of the fused op (its pooled output is the epilogue's).
    _conv2d_relu_max_pool2d_with_argmax_fake(input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode)
    conv = F.conv2d(input, weight, bias, stride, padding)
    conv_output = torch.empty(conv.shape, dtype=input.dtype, device=input.device, memory_format=torch.channels_last)
    return (conv_output, *_channel_stats(input, weight.shape[0]))


@torch.library.register_fake("cifarnet::_conv2d_batch_norm_relu_max_pool2d_epilogue")
def _conv2d_batch_norm_relu_max_pool2d_epilogue_fake(
    input, weight, conv_output, mean, var, bn_weight, bn_bias, eps, stride, padding, pool_size, pool_stride, ceil_mode
):
    return _conv2d_relu_max_pool2d_with_argmax_fake(input, weight, None, stride, padding, pool_size, pool_stride, ceil_mode)


@torch.library.register_fake("cifarnet::_conv2d_batch_norm_relu_max_pool2d_backward_reduce")
def _conv2d_batch_norm_relu_max_pool2d_backward_reduce_fake(
    grad_output, input, weight, conv_output, save_mean, argmax, stride, padding, pool_size, pool_stride, ceil_mode
):
    return _channel_stats(input, weight.shape[0])


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
    output_mask,
):
    return _conv2d_relu_max_pool2d_backward_fake(
        grad_output, input, weight, argmax, stride, padding, pool_size, pool_stride, ceil_mode, output_mask
    )


@torch.library.register_fake("cifarnet::dropout")
def _dropout_fake(input, seed, p=0.5):
    # The kernels compute in row-major order and give a channels-last input its own layout back.
    return torch.empty_like(input, memory_format=suggest_memory_format(input))
