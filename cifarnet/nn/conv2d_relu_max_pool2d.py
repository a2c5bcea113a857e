"""``Conv2dReLUMaxPool2d``: ``nn.Conv2d -> nn.ReLU -> nn.MaxPool2d`` as one layer, and the rule
for which such chains it can replace."""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import Tensor, nn

from cifarnet import _C, ops
from cifarnet._arguments import check_padding_string, is_window_stride, pair, stored_pair
from cifarnet.nn._native import _native_chain, _native_sequential


def reset_conv_parameters(weight: Tensor, bias: Tensor | None) -> None:
    """nn.Conv2d's initialisation, in the same order, so one seed gives both the same weights."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        if fan_in != 0:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(bias, -bound, bound)


def conv_unfusable_reason(conv: nn.Module) -> str | None:
    """Why the fused ops cannot compute ``conv``'s convolution (they convolve as a plain
    ``nn.Conv2d`` with dilation 1, one group and zero padding), or None if they can."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not an nn.Conv2d"
    try:  # a malformed size is native's to refuse, when the model runs
        dilation = pair(conv.dilation, "conv.dilation")
        pair(conv.stride, "conv.stride")
        if not isinstance(conv.padding, str):
            pair(conv.padding, "conv.padding")
    except (RuntimeError, TypeError) as error:
        return str(error)
    if dilation != [1, 1]:
        return f"conv.dilation={tuple(conv.dilation)}; the fused op needs dilation 1"
    if conv.groups != 1:
        return f"conv.groups={conv.groups}; the fused op needs groups=1"
    if conv.padding_mode != "zeros":
        return f"conv.padding_mode={conv.padding_mode!r}; the fused op pads with zeros"
    if not isinstance(conv.weight, nn.Parameter):
        # nn.utils.weight_norm's legacy form: a plain tensor a pre-hook recomputes at every call
        return "conv.weight is not a Parameter (nn.utils.weight_norm?); the fused layer would keep one value of it"
    return None


def conv_relu_pool_unfusable_reason(conv: nn.Module, pool: nn.Module) -> str | None:
    """Why ``(conv, ReLU, pool)`` cannot become a ``Conv2dReLUMaxPool2d``, or None if it can."""
    reason = conv_unfusable_reason(conv)
    if reason is not None:
        return reason
    if type(pool) is not nn.MaxPool2d:
        return f"{type(pool).__name__} is not an nn.MaxPool2d"
    try:  # a malformed size is native's to refuse, when the model runs
        window, pool_padding = pair(pool.kernel_size, "pool.kernel_size"), pair(pool.padding, "pool.padding")
        dilation = pair(pool.dilation, "pool.dilation")
        if not is_window_stride(pool.stride):
            pair(pool.stride, "pool.stride")
    except (RuntimeError, TypeError) as error:
        return str(error)
    if dilation != [1, 1]:
        return f"pool.dilation={pool.dilation}; the fused op pools without dilation"
    if pool.return_indices:
        return "pool.return_indices=True; the fused op returns only the pooled values"
    if window[0] * window[1] > _C.MAX_POOL_WINDOW_ELEMENTS:
        return (
            f"pool.kernel_size={pool.kernel_size} has {window[0] * window[1]} elements; "
            f"at most {_C.MAX_POOL_WINDOW_ELEMENTS} are supported"
        )
    if not all(0 <= pad <= size // 2 for pad, size in zip(pool_padding, window)):
        # Native max_pool2d refuses it too: the original keeps its own error.
        return f"pool.padding={pool.padding} is not between 0 and half of pool.kernel_size={pool.kernel_size}"
    return None


class Conv2dReLUMaxPool2d(nn.Module):
    """``nn.Conv2d`` -> ``nn.ReLU`` -> ``nn.MaxPool2d`` as one layer.

    Parameters are named and initialised as in ``nn.Conv2d`` (``weight``, ``bias``), so an
    ``nn.Conv2d`` state_dict loads into it and the same seed gives the same weights.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias: as in ``nn.Conv2d``
            (dilation 1, groups 1, zero padding; ``padding`` may be ``'valid'`` or ``'same'``).
            Stored as ``nn.Conv2d`` stores them, and checked when the layer runs, as there.
        pool_size, pool_stride, ceil_mode, pool_padding: as ``kernel_size``, ``stride``,
            ``ceil_mode`` and ``padding`` of ``nn.MaxPool2d``; ``pool_stride=None`` means
            ``pool_size``. ``pool_padding`` (at most half of ``pool_size``) pads the windows
            with positions that never win, as ``nn.MaxPool2d``'s ``-inf``.

    Shape:
        input ``[N, C_in, H, W]`` -> output ``[N, C_out, H_out, W_out]``; an unbatched input
        ``[C_in, H, W]`` -> ``[C_out, H_out, W_out]``, as ``nn.Conv2d`` and ``nn.MaxPool2d`` take it.
    """

    # NB: the default of layers pickled before pool padding existed, which have no attribute.
    pool_padding = (0, 0)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        pool_size=2,
        pool_stride=None,
        ceil_mode: bool = False,
        pool_padding=0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        check_padding_string(padding, stride)
        self.kernel_size = stored_pair(kernel_size)
        self.stride = stored_pair(stride)
        self.padding = padding if isinstance(padding, str) else stored_pair(padding)
        self.pool_size = stored_pair(pool_size)
        self.pool_stride = self.pool_size if is_window_stride(pool_stride) else stored_pair(pool_stride)
        self.ceil_mode = ceil_mode  # as nn.MaxPool2d keeps it: checked when the layer runs
        self.pool_padding = stored_pair(pool_padding)
        self.weight = nn.Parameter(torch.empty((out_channels, in_channels, *self.kernel_size), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_conv_parameters(self.weight, self.bias)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, pool: nn.MaxPool2d) -> Conv2dReLUMaxPool2d:
        """The fused layer of an existing ``(conv, pool)`` pair (a ReLU between them implied).

        The new module shares ``conv``'s parameters (same ``Parameter`` objects, so optimisers
        keep working) and takes its device, dtype and train/eval mode. Raises ``ValueError``
        when the pair cannot be fused (dilation, groups, padding modes, pool dilation, ...).
        """
        reason = conv_relu_pool_unfusable_reason(conv, pool)
        if reason is not None:
            raise ValueError(f"cannot fuse {conv} and {pool}: {reason}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_channels = conv.in_channels
        fused.out_channels = conv.out_channels
        fused.kernel_size = tuple(conv.kernel_size)
        fused.stride = tuple(conv.stride)
        fused.padding = conv.padding  # 'valid' and 'same' too, as the functional op takes them
        fused.pool_size = stored_pair(pool.kernel_size)
        fused.pool_stride = fused.pool_size if is_window_stride(pool.stride) else stored_pair(pool.stride)
        fused.ceil_mode = pool.ceil_mode
        fused.pool_padding = stored_pair(pool.padding)
        fused.weight = conv.weight
        if conv.bias is None:
            fused.register_parameter("bias", None)
        else:
            fused.bias = conv.bias
        fused.train(conv.training)
        return fused

    def forward(self, input: Tensor) -> Tensor:
        return ops.conv2d_relu_max_pool2d(
            input, self.weight, self.bias, self.stride, self.padding, self.pool_size, self.pool_stride, self.ceil_mode,
            self.pool_padding,
        )  # fmt: skip

    def to_native(self) -> torch.fx.GraphModule:
        """This layer computed by torch alone, with the same state_dict keys.

        A ``torch.fx.GraphModule`` (a torch class, not an ``nn.Sequential``) whose forward is
        ``self.pool(self.relu(F.conv2d(input, self.weight, self.bias, stride, padding)))``: it
        holds this layer's own ``weight`` and ``bias`` ``Parameter`` objects under the same names
        and, as children, an ``nn.ReLU`` ``relu`` and an ``nn.MaxPool2d`` ``pool`` (no state).
        The keys stay ``weight`` and ``bias``, so checkpoints load both ways (and a model's keys
        stay those of its native twin with an ``nn.Conv2d`` at this position); it needs nothing
        of cifarnet to run, pickle or export. The convolution is a call, not an ``nn.Conv2d``
        child, which would rename its parameters ``conv.weight``: for ``nn.Conv2d``,
        ``nn.ReLU`` and ``nn.MaxPool2d`` modules, see :meth:`to_sequential`.
        """
        return _native_chain(self, None)

    def to_sequential(self) -> nn.Sequential:
        """``nn.Sequential(nn.Conv2d, nn.ReLU, nn.MaxPool2d)`` computing this layer, the conv
        holding this layer's own ``weight`` and ``bias`` ``Parameter`` objects.

        Plain torch.nn layers, for tools that look for them; its state_dict keys are
        ``0.weight`` and ``0.bias``, not this layer's (see :meth:`to_native` for those).
        """
        return _native_sequential(self, None)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, pool_size={self.pool_size}, "
            f"pool_stride={self.pool_stride}, ceil_mode={self.ceil_mode}, pool_padding={self.pool_padding}"
        )
