"""Functional API of the fused ops: thin wrappers over ``torch.ops.cifarnet``.

Each function normalises its arguments to the op schema and calls the op through the
dispatcher, so autograd, ``torch.compile`` and device kernels come with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cifarnet._arguments import pair

__all__ = ["conv2d_relu_max_pool2d"]


def conv2d_relu_max_pool2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    pool_size=2,
    pool_stride=None,
    ceil_mode: bool = False,
) -> Tensor:
    """Convolution, ReLU and max pooling in one op.

    Computes ``F.max_pool2d(F.relu(F.conv2d(input, weight, bias, stride, padding)),
    pool_size, pool_stride, ceil_mode=ceil_mode)`` without materialising the convolution
    output: the backward keeps only ``input``, ``weight`` and a one-byte window argmax.
    Ties and NaN are resolved as native ``max_pool2d`` resolves them, so gradients match.

    Args:
        input (Tensor[N, C_in, H, W]): float32 or float64; contiguous or channels_last.
        weight (Tensor[C_out, C_in, kH, kW]): same dtype and device as ``input``.
        bias (Tensor[C_out], optional): convolution bias.
        stride (int or (int, int)): convolution stride.
        padding (int or (int, int)): implicit zero padding of the convolution.
        pool_size (int or (int, int)): pooling window; at most 255 elements.
        pool_stride (int or (int, int), optional): pooling stride; ``None`` means ``pool_size``.
        ceil_mode (bool): round the pooled size up, as in ``F.max_pool2d``.

    Returns:
        Tensor[N, C_out, H_out, W_out]: in the memory format native conv2d would give
        (channels_last if ``input`` or ``weight`` is channels_last).
    """
    return torch.ops.cifarnet.conv2d_relu_max_pool2d.default(
        input,
        weight,
        bias,
        pair(stride, "stride"),
        pair(padding, "padding"),
        pair(pool_size, "pool_size"),
        [] if pool_stride is None else pair(pool_stride, "pool_stride"),
        bool(ceil_mode),
    )
