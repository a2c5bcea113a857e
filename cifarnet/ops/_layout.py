"""Shape, layout and dtype rules the ops' Python side shares: the unbatched-input rule of the
functional wrappers, and the output layouts and dtypes the C++ kernels give, which the fake
kernels reproduce.

Shapes and the errors for impossible geometry come from native conv2d and max_pool2d's own
meta functions, so they agree with the composition the ops replace; layouts follow the rules
the C++ kernels use, which are native torch's: the convolution's layout (channels_last when the
input or the weight is channels_last) for the fused ops' outputs and gradients, native batch
norm's for batch norm, ``empty_like(input)``'s for dropout.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format as _prims_suggest_memory_format

from cifarnet import _C


def is_unbatched(input: Tensor) -> bool:
    """Whether ``input`` is an unbatched ``(C, H, W)`` image rather than an ``(N, C, H, W)``
    batch, the two ranks ``F.conv2d`` and ``F.max_pool2d`` take; raises on any other."""
    if input.dim() not in (3, 4):
        raise RuntimeError(
            f"input must be a 3-D (unbatched) or 4-D (batched) tensor, got {input.dim()}-D tensor of shape "
            f"{list(input.shape)}"
        )
    return input.dim() == 3


def suggest_memory_format(tensor: Tensor) -> torch.memory_format:
    """The layout c10's ``TensorBase::suggest_memory_format`` gives ``tensor``, by which the C++
    kernels lay out their outputs: channels_last where the strides are *like* channels_last."""
    # NB: torch._prims_common is private, but it holds the only Python copy of c10's rule (no
    # public tensor method exposes it; is_contiguous(memory_format=...) is a different test).
    # tests/test_torch_internals.py checks it against the C++ kernels.
    return _prims_suggest_memory_format(tensor)


def conv_output_memory_format(input: Tensor, weight: Tensor) -> torch.memory_format:
    """Native conv2d's output layout: channels_last when the input or the weight is, except for
    float64 on CUDA (cuDNN has no channels-last float64 path; native returns contiguous)."""
    if input.device.type == "cuda" and input.dtype == torch.float64:
        return torch.contiguous_format
    if torch.channels_last in (suggest_memory_format(input), suggest_memory_format(weight)):
        return torch.channels_last
    return torch.contiguous_format


def pooled_output_memory_format(input: Tensor, weight: Tensor, conv_output: Tensor) -> torch.memory_format:
    """The pooled output's layout, the C++ kernels' ``pooled_output_memory_format``: native
    conv2d's, except where the convolution output is 1x1: native's ReLU and batch norm return a
    contiguous tensor then (no order can be read from size-1 dimensions), and max_pool2d keeps
    it, which shows where a padded pool makes the output larger."""
    if conv_output.shape[-2:] == (1, 1):
        return torch.contiguous_format
    return conv_output_memory_format(input, weight)


def check_input_channels(weight: Tensor) -> None:
    """The C++ kernels' refusal of a weight without input channels (native conv2d returns 0
    output channels for those, whatever the weight's output channels)."""
    torch._check(
        weight.shape[1] != 0,
        lambda: f"weight must have at least one input channel, got shape {list(weight.shape)}",
    )


def check_pool_window(pool_size) -> None:
    elements = pool_size[0] * pool_size[1]
    torch._check(
        elements <= _C.MAX_POOL_WINDOW_ELEMENTS,
        lambda: f"pool_size {list(pool_size)} has {elements} elements; at most "
        f"{_C.MAX_POOL_WINDOW_ELEMENTS} are supported (the argmax is stored in one byte)",
    )


def check_pool_padding(pool_size, pool_padding) -> None:
    """The C++ kernels' check of ``pool_padding``, with their message: non-negative and at
    most half of ``pool_size``, as ``max_pool2d`` requires of its ``padding``."""
    torch._check(
        pool_padding[0] >= 0 and pool_padding[1] >= 0,
        lambda: f"pool_padding must be non-negative, got {list(pool_padding)}",
    )
    torch._check(
        pool_padding[0] <= pool_size[0] // 2 and pool_padding[1] <= pool_size[1] // 2,
        lambda: f"pool_padding should be at most half of pool_size, got pool_padding={list(pool_padding)} "
        f"and pool_size={list(pool_size)}",
    )


def dense_memory_format(tensor: Tensor) -> torch.memory_format | None:
    """The memory format ``tensor`` is dense in (contiguous first, then channels_last for 4-D
    and channels_last_3d for 5-D tensors), or None; the C++ kernels' ``dense_memory_format``."""
    if tensor.is_contiguous():
        return torch.contiguous_format
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.dim())
    if channels_last is not None and tensor.is_contiguous(memory_format=channels_last):
        return channels_last
    return None


def batch_norm_memory_format(input: Tensor) -> torch.memory_format:
    """The layout the batch norm kernels give their outputs, native CPU batch norm's: the
    format the input is dense in, else its suggested one."""
    dense = dense_memory_format(input)
    return suggest_memory_format(input) if dense is None else dense


def batch_norm_grad_input_memory_format(input: Tensor, grad_output: Tensor) -> torch.memory_format:
    """The layout the batch norm kernels give the input gradient, native CPU batch norm's: the
    format the input is dense in where the gradient is dense too and both suggest the same
    format, else the input's suggested format."""
    dense = dense_memory_format(input)
    if (
        dense is not None
        and dense_memory_format(grad_output) is not None
        and suggest_memory_format(input) == suggest_memory_format(grad_output)
    ):
        return dense
    return suggest_memory_format(input)


def batch_norm_stats_dtype(input: Tensor) -> torch.dtype:
    """The dtype statistics are saved in: float64 on the CPU for every input dtype, float32
    for float16/bfloat16/float32 on CUDA (at::toAccumulateType)."""
    if input.dtype == torch.float64:
        return torch.float64
    return torch.float64 if input.device.type == "cpu" else torch.float32


def channel_stats(input: Tensor, channels) -> tuple[Tensor, Tensor]:
    """Empty per-channel mean and variance in the dtype the kernels save statistics in."""
    stats_dtype = batch_norm_stats_dtype(input)
    return input.new_empty(channels, dtype=stats_dtype), input.new_empty(channels, dtype=stats_dtype)


def empty_like_layout(t: Tensor, memory_format: torch.memory_format) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format)
