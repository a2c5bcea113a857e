"""``Conv2dBatchNormReLUMaxPool2d``: ``nn.Conv2d -> nn.BatchNorm2d -> nn.ReLU -> nn.MaxPool2d`` as
one layer, the rule for which such chains it can replace, and the fused call with a batch-norm
module (synchronized or not)."""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from cifarnet import ops
from cifarnet._sync_batch_norm import sync_conv2d_batch_norm_relu_max_pool2d
from cifarnet.nn._fx import leaf_call
from cifarnet.nn._native import _native_chain, _native_sequential
from cifarnet.nn.batch_norm import (
    BatchNorm2d,
    batch_norm_arguments,
    batch_norm_sync_group,
    counts_batches,
    native_batch_norm2d,
)
from cifarnet.nn.conv2d_relu_max_pool2d import Conv2dReLUMaxPool2d, conv_relu_pool_unfusable_reason, reset_conv_parameters
from cifarnet.ops._layout import is_unbatched


def conv2d_batch_norm_module_relu_max_pool2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bn: nn.Module,
    stride,
    padding,
    pool_size,
    pool_stride,
    ceil_mode,
    pool_padding=0,
) -> Tensor:
    """conv2d -> ``bn`` -> ReLU -> max_pool2d in one fused op, ``bn`` being a batch-norm module
    whose tensors, mode and momentum are used (and its running statistics updated): with the
    statistics of the whole batch over its process group where ``bn`` is synchronized (see
    :func:`batch_norm_sync_group`), else :func:`cifarnet.ops.conv2d_batch_norm_relu_max_pool2d`."""
    group = batch_norm_sync_group(bn)
    counted = counts_batches(bn)
    arguments = batch_norm_arguments(bn)
    try:
        if group is not None:
            return sync_conv2d_batch_norm_relu_max_pool2d(
                input, weight, bias, arguments["running_mean"], arguments["running_var"], bn.weight, bn.bias,
                arguments["momentum"], arguments["eps"], stride, padding, pool_size, pool_stride, ceil_mode,
                pool_padding, group,
            )  # fmt: skip
        return ops.conv2d_batch_norm_relu_max_pool2d(
            input, weight, bias, bn_weight=bn.weight, bn_bias=bn.bias, stride=stride, padding=padding,
            pool_size=pool_size, pool_stride=pool_stride, ceil_mode=ceil_mode, pool_padding=pool_padding,
            **arguments,
        )  # fmt: skip
    except Exception:
        # The native chain's convolution raises before its batch norm counts the batch.
        if counted:
            with torch.no_grad():
                bn.num_batches_tracked.sub_(1)
        raise


@torch.fx.wrap  # a call in torch.fx graphs, not a branch on a traced value
def _check_batch_norm2d_input(input: Tensor) -> None:
    """The native conv -> batch norm chain's rank checks, in its order: conv2d's (a
    ``RuntimeError`` for other than 3-D or 4-D), then ``nn.BatchNorm2d``'s (a ``ValueError``
    for the 3-D output of an unbatched input)."""
    is_unbatched(input)
    if input.dim() != 4:
        raise ValueError(f"expected 4D input (got {input.dim()}D input)")


# The batch-norm modules a conv -> batch norm -> ReLU -> max-pool chain may hold: torch's
# nn.SyncBatchNorm (what nn.SyncBatchNorm.convert_sync_batchnorm makes of an nn.BatchNorm2d) is
# not an nn.BatchNorm2d.
BATCH_NORMS_2D = (nn.BatchNorm2d, nn.SyncBatchNorm)


def conv_bn_relu_pool_unfusable_reason(conv: nn.Module, bn: nn.Module, pool: nn.Module) -> str | None:
    """Why ``(conv, bn, ReLU, pool)`` cannot become a fused layer, or None if it can."""
    reason = conv_relu_pool_unfusable_reason(conv, pool)
    if reason is not None:
        return reason
    if not isinstance(bn, BATCH_NORMS_2D):
        return f"{type(bn).__name__} is not an nn.BatchNorm2d or nn.SyncBatchNorm"
    if bn.num_features != conv.out_channels:
        return f"bn.num_features={bn.num_features} does not match conv.out_channels={conv.out_channels}"
    return None


class Conv2dBatchNormReLUMaxPool2d(nn.Module):
    """``nn.Conv2d`` -> ``nn.BatchNorm2d`` -> ``nn.ReLU`` -> ``nn.MaxPool2d`` as one layer.

    The convolution's parameters are this module's ``weight`` and ``bias`` (initialised as
    ``nn.Conv2d``'s); the batch norm's live in the child ``bn`` (a :class:`BatchNorm2d`), so the
    state_dict keys of an ``(nn.Conv2d, nn.BatchNorm2d)`` pair map as ``conv.* -> *`` and
    ``bn.* -> bn.*``. Training uses batch statistics and updates the running ones; evaluation
    folds the batch norm into the convolution. Where ``bn`` is synchronized (see
    :class:`SyncConv2dBatchNormReLUMaxPool2d`), training uses the statistics of the whole batch
    over its process group.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias: as in ``nn.Conv2d``.
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``.
        pool_size, pool_stride, ceil_mode, pool_padding: as in :class:`Conv2dReLUMaxPool2d`.

    Shape:
        input ``[N, C_in, H, W]`` -> output ``[N, C_out, H_out, W_out]``. An unbatched input
        raises ``ValueError``, as ``nn.BatchNorm2d`` does in the native chain
        (:func:`cifarnet.ops.conv2d_batch_norm_relu_max_pool2d` takes it as a batch of one).

    Under ``torch.fx.symbolic_trace`` it is a leaf, as ``nn.BatchNorm2d`` is: the traced model
    calls it and follows ``.train()`` / ``.eval()``.
    """

    # Whether torch.fx records a call of this layer (leaf_call) rather than tracing into it.
    _traced_as_leaf = True
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
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        pool_size=2,
        pool_stride=None,
        ceil_mode: bool = False,
        pool_padding=0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        conv = Conv2dReLUMaxPool2d(
            in_channels, out_channels, kernel_size, stride, padding, bias, pool_size, pool_stride, ceil_mode,
            pool_padding, device, dtype,
        )  # fmt: skip
        self._adopt(conv, BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device, dtype))

    def reset_parameters(self) -> None:
        """The convolution's, as ``nn.Conv2d`` initialises them (``bn`` resets its own)."""
        reset_conv_parameters(self.weight, self.bias)

    def _adopt(self, conv: Conv2dReLUMaxPool2d, bn: nn.BatchNorm2d) -> None:
        for name in (
            "in_channels", "out_channels", "kernel_size", "stride", "padding", "pool_size", "pool_stride", "ceil_mode",
            "pool_padding",
        ):  # fmt: skip
            setattr(self, name, getattr(conv, name))
        self.weight = conv.weight
        if conv.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = conv.bias
        self._set_batch_norm(bn)

    def _set_batch_norm(self, bn: nn.BatchNorm2d) -> None:
        self.bn = bn

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: nn.MaxPool2d) -> Conv2dBatchNormReLUMaxPool2d:
        """The fused layer of an existing ``(conv, bn, pool)`` chain (a ReLU between bn and pool).

        Shares ``conv``'s parameters and uses ``bn`` itself as the child ``bn`` (its
        parameters, running statistics and ``num_batches_tracked`` keep counting), in
        ``conv``'s train/eval mode (``bn`` keeps its own). Raises ``ValueError`` when the chain
        cannot be fused.
        """
        reason = conv_bn_relu_pool_unfusable_reason(conv, bn, pool)
        if reason is not None:
            raise ValueError(f"cannot fuse {conv}, {bn} and {pool}: {reason}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._adopt(Conv2dReLUMaxPool2d.from_modules(conv, pool), bn)
        fused.training = conv.training  # not .train(): bn keeps its own mode
        return fused

    def forward(self, input: Tensor) -> Tensor:
        call = leaf_call(self, input) if self._traced_as_leaf else None
        if call is not None:
            return call
        _check_batch_norm2d_input(input)
        return conv2d_batch_norm_module_relu_max_pool2d(
            input, self.weight, self.bias, self.bn, self.stride, self.padding, self.pool_size, self.pool_stride,
            self.ceil_mode, self.pool_padding,
        )  # fmt: skip

    def to_native(self) -> torch.fx.GraphModule:
        """This layer computed by torch alone, with the same state_dict keys.

        A ``torch.fx.GraphModule`` (a torch class, not an ``nn.Sequential``) whose forward is
        ``self.pool(self.relu(self.bn(F.conv2d(input, self.weight, self.bias, stride,
        padding))))``: it holds this layer's own ``weight`` and ``bias`` ``Parameter`` objects
        and, as children, ``bn``, an ``nn.BatchNorm2d`` (``nn.SyncBatchNorm`` over the same group
        where ``bn`` synchronizes) over the batch norm's very tensors (its mode too), an
        ``nn.ReLU`` ``relu`` and an ``nn.MaxPool2d`` ``pool``. The keys stay
        ``weight``, ``bias`` and ``bn.*``, so checkpoints load both ways; it needs nothing of
        cifarnet to run, pickle or export. The convolution is a call, not an ``nn.Conv2d``
        child, which would rename its parameters ``conv.weight``: for torch.nn modules only,
        see :meth:`to_sequential`.
        """
        return _native_chain(self, native_batch_norm2d(self.bn))

    def to_sequential(self) -> nn.Sequential:
        """``nn.Sequential(nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)`` computing this
        layer (``nn.SyncBatchNorm`` where ``bn`` synchronizes): the conv holds this layer's own
        ``weight`` and ``bias``, the batch norm the very tensors of ``bn`` (and its mode).

        Plain torch.nn layers, for tools that look for them; its state_dict keys are ``0.*``
        (the conv) and ``1.*`` (the batch norm), not this layer's (see :meth:`to_native`).
        """
        return _native_sequential(self, native_batch_norm2d(self.bn))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, pool_size={self.pool_size}, "
            f"pool_stride={self.pool_stride}, ceil_mode={self.ceil_mode}, pool_padding={self.pool_padding}"
        )
