"""The study's ConvNet, built from native torch layers or from cifarnet's fused ones.

Both builds have the same parameter and buffer names (``conv1``…``conv3``, ``bn1``…``bn3`` in
``full``, ``fc4``, ``fc5``) and the same initialisation, so a checkpoint trained with one loads
strictly into the other and one seed gives both the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifarnet.nn import Conv2dReLUMaxPool2d, Dropout, conv2d_batch_norm_module_relu_max_pool2d
from cifarnet.study.variants import VARIANTS, recipe

__all__ = ["CONV_CHANNELS", "ConvNet", "OPS", "VARIANTS", "count_parameters"]

OPS = ("fused", "native")
"""How the conv→ReLU→pool stages are computed: one cifarnet op each, or three torch ops."""

CONV_CHANNELS = (3, 32, 64, 64)
"""Input channels, then the output channels of conv1, conv2 and conv3."""

CONV_KERNEL_SIZE = 5
CONV_PADDING = 2  # keeps the spatial size ("same" for a 5×5 kernel)
POOL_SIZE = 2
POOLED_SIZE = 4  # pool3's output is 4×4 for 32×32 inputs, and for 28×28 ones with ceil_mode
HIDDEN_FEATURES = 1000


class ConvNet(nn.Module):
    """conv1-pool1, conv2-pool2, conv3-pool3, fc4 (1024→1000, ReLU), fc5 (1000→classes).

    The architecture of SEED.md; the variant switches on what its step adds: ``ceil_mode`` on
    pool3 from ``augmented`` on (28×28 inputs: 28→14→7→4), ``Dropout(0.5)`` after fc4's ReLU
    from ``dropout`` on, and ``BatchNorm2d`` after each convolution in ``full``.

    Args:
        variant: one of :data:`cifarnet.study.variants.VARIANTS`.
        ops: ``"fused"`` computes each conv→ReLU→pool stage with
            :class:`cifarnet.nn.Conv2dReLUMaxPool2d`, and each conv→BN→ReLU→pool stage of
            ``full`` with :func:`cifarnet.ops.conv2d_batch_norm_relu_max_pool2d` on the tensors
            of its ``nn.Conv2d`` and ``nn.BatchNorm2d``; ``"native"`` with ``nn.Conv2d``,
            ``nn.BatchNorm2d``, ``F.relu`` and ``nn.MaxPool2d``. Dropout is
            :class:`cifarnet.nn.Dropout` with ``"fused"``, ``nn.Dropout`` with ``"native"``.
        num_classes: outputs of fc5.

    Shape:
        input ``Tensor[N, 3, 32, 32]``, or ``Tensor[N, 3, 28, 28]`` from ``augmented`` on
        (earlier variants pool 28×28 down to 3×3, which fc4 does not take), float32 or
        float64 -> logits ``Tensor[N, num_classes]``, same dtype.
    """

    def __init__(self, variant: str = "full", ops: str = "fused", num_classes: int = 10) -> None:
        super().__init__()
        if ops not in OPS:
            raise ValueError(f"ops must be one of {', '.join(OPS)}; got {ops!r}")
        self.recipe = recipe(variant)
        self.variant = variant
        self.ops = ops
        # Built in forward order, one stage at a time, so the default initialisation draws
        # the same random numbers in the same order for every ops choice.
        stages = []
        for index in (1, 2, 3):
            in_channels, out_channels = CONV_CHANNELS[index - 1], CONV_CHANNELS[index]
            # Only pool3 sees an odd size (7×7 from 28×28 inputs); rounding up keeps it 4×4.
            ceil_mode = self.recipe.augment and index == 3
            stages.append(self._make_stage(in_channels, out_channels, ceil_mode))
        (self.conv1, self.bn1, self.pool1), (self.conv2, self.bn2, self.pool2), (self.conv3, self.bn3, self.pool3) = (
            stages
        )
        self.fc4 = nn.Linear(CONV_CHANNELS[-1] * POOLED_SIZE * POOLED_SIZE, HIDDEN_FEATURES)
        dropout = Dropout if ops == "fused" else nn.Dropout
        self.dropout = dropout(self.recipe.dropout) if self.recipe.dropout else nn.Identity()
        self.fc5 = nn.Linear(HIDDEN_FEATURES, num_classes)

    def _make_stage(self, in_channels: int, out_channels: int, ceil_mode: bool):
        """``(conv, bn or None, pool or None)`` of one conv→[BN→]ReLU→pool stage."""
        if self.recipe.batch_norm:
            # Both ops keep nn.Conv2d and nn.BatchNorm2d as conv{i} and bn{i} (the checkpoint
            # keys); with ops="fused" forward hands their tensors to the fused op.
            conv = nn.Conv2d(in_channels, out_channels, CONV_KERNEL_SIZE, padding=CONV_PADDING)
            return conv, nn.BatchNorm2d(out_channels), nn.MaxPool2d(POOL_SIZE, ceil_mode=ceil_mode)
        if self.ops == "fused":
            conv = Conv2dReLUMaxPool2d(
                in_channels,
                out_channels,
                CONV_KERNEL_SIZE,
                padding=CONV_PADDING,
                pool_size=POOL_SIZE,
                ceil_mode=ceil_mode,
            )
            return conv, None, None
        conv = nn.Conv2d(in_channels, out_channels, CONV_KERNEL_SIZE, padding=CONV_PADDING)
        return conv, None, nn.MaxPool2d(POOL_SIZE, ceil_mode=ceil_mode)

    def _conv_relu_pool(self, conv: nn.Module, bn: nn.Module | None, pool: nn.Module | None, input: Tensor) -> Tensor:
        if pool is None:  # a fused layer: ReLU and pooling are inside conv
            return conv(input)
        if bn is not None and self.ops == "fused":
            # synchronized over the processes when bn is (cifarnet.nn.convert_sync_batchnorm)
            return conv2d_batch_norm_module_relu_max_pool2d(
                input, conv.weight, conv.bias, bn, conv.stride, conv.padding, pool.kernel_size, pool.stride, pool.ceil_mode
            )
        output = conv(input)
        if bn is not None:
            output = bn(output)
        return pool(F.relu(output))

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4 or input.shape[1] != CONV_CHANNELS[0]:
            raise ValueError(f"input must be a Tensor[N, {CONV_CHANNELS[0]}, H, W]; got shape {tuple(input.shape)}")
        output = self._conv_relu_pool(self.conv1, self.bn1, self.pool1, input)
        output = self._conv_relu_pool(self.conv2, self.bn2, self.pool2, output)
        output = self._conv_relu_pool(self.conv3, self.bn3, self.pool3, output)
        output = F.relu(self.fc4(torch.flatten(output, 1)))
        return self.fc5(self.dropout(output))

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, ops={self.ops!r}"


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars in ``module`` (BatchNorm's running statistics excluded)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
