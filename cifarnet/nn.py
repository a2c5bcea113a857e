"""Drop-in modules over the fused ops, with torch.nn's parameter names and initialisation."""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from cifarnet import _C, ops
from cifarnet._arguments import pair
from cifarnet._sync_batch_norm import sync_batch_norm, sync_conv2d_batch_norm_relu_max_pool2d, synchronizing_group

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2dBatchNormReLUMaxPool2d",
    "Conv2dReLUMaxPool2d",
    "Dropout",
    "SyncBatchNorm2d",
    "SyncConv2dBatchNormReLUMaxPool2d",
    "convert_sync_batchnorm",
]


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """``conv.padding`` as two ints; 'same' only where it is symmetric (odd kernels)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        if any(k % 2 == 0 for k in conv.kernel_size):
            raise ValueError(
                f"conv.padding='same' with the even kernel_size {conv.kernel_size} pads asymmetrically, "
                "which the fused op does not support"
            )
        return (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
    return tuple(conv.padding)


def conv_relu_pool_unfusable_reason(conv: nn.Module, pool: nn.Module) -> str | None:
    """Why ``(conv, ReLU, pool)`` cannot become a ``Conv2dReLUMaxPool2d``, or None if it can."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if type(pool) is not nn.MaxPool2d:
        return f"{type(pool).__name__} is not an nn.MaxPool2d"
    if tuple(conv.dilation) != (1, 1):
        return f"conv.dilation={tuple(conv.dilation)}; the fused op needs dilation 1"
    if conv.groups != 1:
        return f"conv.groups={conv.groups}; the fused op needs groups=1"
    if conv.padding_mode != "zeros":
        return f"conv.padding_mode={conv.padding_mode!r}; the fused op pads with zeros"
    if conv.padding == "same" and any(k % 2 == 0 for k in conv.kernel_size):
        return f"conv.padding='same' with even kernel_size {conv.kernel_size} is asymmetric"
    if pair(pool.padding, "pool.padding") != [0, 0]:
        return f"pool.padding={pool.padding}; the fused op pools without padding"
    if pair(pool.dilation, "pool.dilation") != [1, 1]:
        return f"pool.dilation={pool.dilation}; the fused op pools without dilation"
    if pool.return_indices:
        return "pool.return_indices=True; the fused op returns only the pooled values"
    window = pair(pool.kernel_size, "pool.kernel_size")
    if window[0] * window[1] > _C.MAX_POOL_WINDOW_ELEMENTS:
        return (
            f"pool.kernel_size={pool.kernel_size} has {window[0] * window[1]} elements; "
            f"at most {_C.MAX_POOL_WINDOW_ELEMENTS} are supported"
        )
    return None


class Conv2dReLUMaxPool2d(nn.Module):
    """``nn.Conv2d`` -> ``nn.ReLU`` -> ``nn.MaxPool2d`` as one layer.

    Parameters are named and initialised as in ``nn.Conv2d`` (``weight``, ``bias``), so an
    ``nn.Conv2d`` state_dict loads into it and the same seed gives the same weights.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias: as in ``nn.Conv2d``
            (dilation 1, groups 1, zero padding).
        pool_size, pool_stride, ceil_mode: as ``kernel_size``, ``stride`` and ``ceil_mode`` of
            ``nn.MaxPool2d``; ``pool_stride=None`` means ``pool_size``.

    Shape:
        input ``[N, C_in, H, W]`` -> output ``[N, C_out, H_out, W_out]``; an unbatched input
        ``[C_in, H, W]`` -> ``[C_out, H_out, W_out]``, as ``nn.Conv2d`` and ``nn.MaxPool2d`` take it.
    """

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
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(pair(kernel_size, "kernel_size"))
        self.stride = tuple(pair(stride, "stride"))
        self.padding = tuple(pair(padding, "padding"))
        self.pool_size = tuple(pair(pool_size, "pool_size"))
        self.pool_stride = self.pool_size if pool_stride is None else tuple(pair(pool_stride, "pool_stride"))
        self.ceil_mode = bool(ceil_mode)
        self.weight = nn.Parameter(torch.empty((out_channels, in_channels, *self.kernel_size), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation, in the same order, so one seed gives both the same weights.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            if fan_in != 0:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, pool: nn.MaxPool2d) -> Conv2dReLUMaxPool2d:
        """The fused layer of an existing ``(conv, pool)`` pair (a ReLU between them implied).

        The new module shares ``conv``'s parameters (same ``Parameter`` objects, so optimisers
        keep working) and takes its device, dtype and train/eval mode. Raises ``ValueError``
        when the pair cannot be fused (dilation, groups, padding modes, pool padding, ...).
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
        fused.padding = _conv_padding(conv)
        fused.pool_size = tuple(pair(pool.kernel_size, "pool.kernel_size"))
        fused.pool_stride = fused.pool_size if pool.stride is None else tuple(pair(pool.stride, "pool.stride"))
        fused.ceil_mode = bool(pool.ceil_mode)
        fused.weight = conv.weight
        if conv.bias is None:
            fused.register_parameter("bias", None)
        else:
            fused.bias = conv.bias
        fused.train(conv.training)
        return fused

    def forward(self, input: Tensor) -> Tensor:
        return ops.conv2d_relu_max_pool2d(
            input, self.weight, self.bias, self.stride, self.padding, self.pool_size, self.pool_stride, self.ceil_mode
        )

    def to_native(self) -> nn.Module:
        """This layer computed by torch alone: ``F.conv2d -> F.relu -> F.max_pool2d``.

        A ``torch.fx.GraphModule`` holding this layer's own ``weight`` and ``bias``
        ``Parameter`` objects under the same names, so the state_dict keys stay and a
        checkpoint loads both ways; it needs nothing of cifarnet to run, pickle or export.
        """
        return _native_chain(self, None)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, pool_size={self.pool_size}, "
            f"pool_stride={self.pool_stride}, ceil_mode={self.ceil_mode}"
        )


def batch_norm_arguments(bn: nn.modules.batchnorm._BatchNorm) -> dict:
    """The running statistics, mode and momentum a batch-norm module normalises with.

    torch.nn's rules, in one place for every module here: counts the batch in
    ``num_batches_tracked`` when training with running statistics; ``momentum=None`` means a
    cumulative average (momentum ``1 / num_batches_tracked``); without running statistics the
    batch statistics are used in evaluation too.
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    update_running = not bn.training or bn.track_running_stats
    return {
        "running_mean": bn.running_mean if update_running else None,
        "running_var": bn.running_var if update_running else None,
        "training": use_batch_stats,
        "momentum": momentum,
        "eps": bn.eps,
    }


def share_batch_norm_state(cls: type, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A ``cls`` instance (a batch-norm class) holding ``bn``'s very tensors and its mode.

    Its parameters and buffers are ``bn``'s own objects under the same names, so optimisers and
    state_dicts see no difference.
    """
    shared = cls.__new__(cls)
    nn.Module.__init__(shared)
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        setattr(shared, name, getattr(bn, name))
    for name, parameter in bn._parameters.items():
        shared.register_parameter(name, parameter)
    for name, buffer in bn._buffers.items():
        shared.register_buffer(name, buffer, persistent=name not in bn._non_persistent_buffers_set)
    shared.train(bn.training)
    return shared


class BatchNorm1d(nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by :func:`cifarnet.ops.batch_norm`.

    Same constructor arguments, parameters and buffers (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so state_dicts load both ways.

    Shape:
        input ``[N, C]`` or ``[N, C, L]`` -> output of the same shape.
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return ops.batch_norm(input, weight=self.weight, bias=self.bias, **batch_norm_arguments(self))

    def to_native(self) -> nn.BatchNorm1d:
        """A ``torch.nn.BatchNorm1d`` holding this module's very parameters and buffers, and its mode."""
        return share_batch_norm_state(nn.BatchNorm1d, self)


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by :func:`cifarnet.ops.batch_norm`.

    Same constructor arguments, parameters and buffers (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so state_dicts load both ways.

    Shape:
        input ``[N, C, H, W]`` (contiguous or channels_last) -> output of the same shape.
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return ops.batch_norm(input, weight=self.weight, bias=self.bias, **batch_norm_arguments(self))

    def to_native(self) -> nn.BatchNorm2d:
        """A ``torch.nn.BatchNorm2d`` holding this module's very parameters and buffers, and its mode."""
        return share_batch_norm_state(nn.BatchNorm2d, self)


def batch_norm_sync_group(bn: nn.Module):
    """The process group a batch norm module synchronizes its batch statistics over now, or
    None when it normalises its own process's batch alone.

    A batch norm is synchronized when it has a ``process_group`` attribute
    (:class:`SyncBatchNorm2d`, ``torch.nn.SyncBatchNorm``, and what :func:`cifarnet.fuse` makes
    of them); it communicates only in training, under an initialised ``torch.distributed``
    with more than one process in the group (``process_group=None``: the default group).
    """
    if not bn.training or not hasattr(bn, "process_group"):
        return None
    return synchronizing_group(bn.process_group)


def conv2d_batch_norm_module_relu_max_pool2d(
    input: Tensor, weight: Tensor, bias: Tensor | None, bn: nn.Module, stride, padding, pool_size, pool_stride, ceil_mode
) -> Tensor:
    """conv2d -> ``bn`` -> ReLU -> max_pool2d in one fused op, ``bn`` being a batch-norm module
    whose tensors, mode and momentum are used (and its running statistics updated): with the
    statistics of the whole batch over its process group where ``bn`` is synchronized (see
    :func:`batch_norm_sync_group`), else :func:`cifarnet.ops.conv2d_batch_norm_relu_max_pool2d`."""
    group = batch_norm_sync_group(bn)
    arguments = batch_norm_arguments(bn)
    if group is not None:
        return sync_conv2d_batch_norm_relu_max_pool2d(
            input, weight, bias, arguments["running_mean"], arguments["running_var"], bn.weight, bn.bias,
            arguments["momentum"], arguments["eps"], stride, padding, pool_size, pool_stride, ceil_mode, group,
        )  # fmt: skip
    return ops.conv2d_batch_norm_relu_max_pool2d(
        input, weight, bias, bn_weight=bn.weight, bn_bias=bn.bias, stride=stride, padding=padding,
        pool_size=pool_size, pool_stride=pool_stride, ceil_mode=ceil_mode, **arguments,
    )  # fmt: skip


class SyncBatchNorm2d(BatchNorm2d):
    """:class:`BatchNorm2d` whose training statistics are those of the whole batch spread over
    the processes of ``process_group``, as ``torch.nn.SyncBatchNorm`` (which refuses CPU
    tensors) computes them; on any device the ops run on.

    Each process passes its own part of the batch (the parts may differ in size, one may be
    empty); every process of the group must call the module the same number of times. The
    running statistics take the whole batch's mean and unbiased variance. In evaluation, and
    where there is nothing to synchronize (``torch.distributed`` not initialised, or a group
    of one process), it is exactly :class:`BatchNorm2d`, or ``nn.BatchNorm2d`` where it was made
    from one (``fallback_class``: the same op calls as before the conversion). Same parameters
    and buffers as ``nn.BatchNorm2d``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as in
            ``nn.BatchNorm2d``.
        process_group: the ``torch.distributed`` group; None means the default group.

    Shape:
        input ``[N, C, H, W]`` (this process's part of the batch) -> output of the same shape.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        self.fallback_class = BatchNorm2d

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, process_group=None) -> SyncBatchNorm2d:
        """The synchronized counterpart of ``bn`` (an ``nn.BatchNorm2d``, this module's
        ``fallback_class``, or a :class:`BatchNorm2d`), holding its very parameters and buffers
        and its mode."""
        sync = share_batch_norm_state(cls, bn)
        sync.process_group = process_group
        sync.fallback_class = getattr(bn, "fallback_class", nn.BatchNorm2d if type(bn) is nn.BatchNorm2d else BatchNorm2d)
        return sync

    def forward(self, input: Tensor) -> Tensor:
        group = batch_norm_sync_group(self)
        if group is None:
            return self.fallback_class.forward(self, input)
        self._check_input_dim(input)
        arguments = batch_norm_arguments(self)
        return sync_batch_norm(
            input,
            arguments["running_mean"],
            arguments["running_var"],
            self.weight,
            self.bias,
            arguments["momentum"],
            arguments["eps"],
            group,
        )

    def to_native(self) -> nn.SyncBatchNorm:
        """A ``torch.nn.SyncBatchNorm`` over the same group, holding this module's very
        parameters and buffers, and its mode."""
        native = share_batch_norm_state(nn.SyncBatchNorm, self)
        native.process_group = self.process_group
        return native


@torch.fx.wrap  # a call in torch.fx graphs, not a branch on a traced value
def _check_batch_norm2d_input(input: Tensor) -> None:
    """``nn.BatchNorm2d``'s rank check, with its message: the native conv -> batch norm chain
    takes no unbatched input."""
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
        pool_size, pool_stride, ceil_mode: as in :class:`Conv2dReLUMaxPool2d`.

    Shape:
        input ``[N, C_in, H, W]`` -> output ``[N, C_out, H_out, W_out]``. An unbatched input
        raises ``ValueError``, as ``nn.BatchNorm2d`` does in the native chain
        (:func:`cifarnet.ops.conv2d_batch_norm_relu_max_pool2d` takes it as a batch of one).
    """

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
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        conv = Conv2dReLUMaxPool2d(
            in_channels, out_channels, kernel_size, stride, padding, bias, pool_size, pool_stride, ceil_mode, device, dtype
        )
        self._adopt(conv, BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device, dtype))

    def _adopt(self, conv: Conv2dReLUMaxPool2d, bn: nn.BatchNorm2d) -> None:
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "pool_size", "pool_stride", "ceil_mode"):
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
        ``conv``'s train/eval mode. Raises ``ValueError`` when the chain cannot be fused.
        """
        reason = conv_bn_relu_pool_unfusable_reason(conv, bn, pool)
        if reason is not None:
            raise ValueError(f"cannot fuse {conv}, {bn} and {pool}: {reason}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._adopt(Conv2dReLUMaxPool2d.from_modules(conv, pool), bn)
        fused.train(conv.training)
        return fused

    def forward(self, input: Tensor) -> Tensor:
        _check_batch_norm2d_input(input)
        return conv2d_batch_norm_module_relu_max_pool2d(
            input, self.weight, self.bias, self.bn, self.stride, self.padding, self.pool_size, self.pool_stride, self.ceil_mode
        )

    def to_native(self) -> nn.Module:
        """This layer computed by torch alone: ``F.conv2d -> nn.BatchNorm2d -> F.relu ->
        F.max_pool2d``.

        A ``torch.fx.GraphModule`` holding this layer's ``weight`` and ``bias`` and, as ``bn``,
        an ``nn.BatchNorm2d`` over the batch norm's very tensors (its mode too): the same
        state_dict keys, and nothing of cifarnet needed to run, pickle or export it.
        """
        return _native_chain(self, share_batch_norm_state(nn.BatchNorm2d, self.bn))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}, pool_size={self.pool_size}, "
            f"pool_stride={self.pool_stride}, ceil_mode={self.ceil_mode}"
        )


class SyncConv2dBatchNormReLUMaxPool2d(Conv2dBatchNormReLUMaxPool2d):
    """:class:`Conv2dBatchNormReLUMaxPool2d` whose batch norm is synchronized: in training, the
    statistics are those of the whole batch spread over the processes of ``process_group``.

    Its ``bn`` is a :class:`SyncBatchNorm2d` (same state_dict keys as the unsynchronized
    layer). Per training step: the convolution and this process's statistics, one
    ``all_gather`` of them, the normalise -> ReLU -> pool epilogue; in the backward, one
    ``all_reduce`` of two per-channel sums. It saves what the fused op saves (the input, the
    pre-normalisation convolution output, the statistics and the one-byte argmax). In evaluation,
    and where there is nothing to synchronize (``torch.distributed`` not initialised, or a group
    of one process), it calls exactly the ops :class:`Conv2dBatchNormReLUMaxPool2d` calls.

    Args:
        as :class:`Conv2dBatchNormReLUMaxPool2d`, and ``process_group`` (None: the default
        group).

    Shape:
        input ``[N, C_in, H, W]`` (this process's part of the batch; N may differ per process,
        and be 0) -> output ``[N, C_out, H_out, W_out]``.
    """

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bn = SyncBatchNorm2d.from_batch_norm(self.bn, process_group)

    @classmethod
    def from_layer(cls, layer: Conv2dBatchNormReLUMaxPool2d, process_group=None) -> SyncConv2dBatchNormReLUMaxPool2d:
        """The synchronized counterpart of ``layer``: its very parameters and buffers (its
        ``bn`` becomes a :class:`SyncBatchNorm2d` over them), its geometry and mode."""
        sync = cls.__new__(cls)
        nn.Module.__init__(sync)
        bn = layer.bn if isinstance(layer.bn, SyncBatchNorm2d) else SyncBatchNorm2d.from_batch_norm(layer.bn, process_group)
        sync._adopt(layer, bn)
        sync.train(layer.training)
        return sync

    @property
    def process_group(self):
        return self.bn.process_group

    def to_native(self) -> nn.Module:
        """As :meth:`Conv2dBatchNormReLUMaxPool2d.to_native`, with a ``torch.nn.SyncBatchNorm``
        over the same group as ``bn``."""
        return _native_chain(self, self.bn.to_native())


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``module`` with its batch norms synchronized over ``process_group``: the counterpart of
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for models of :mod:`cifarnet.nn` layers
    and on the CPU.

    ``nn.BatchNorm2d`` and :class:`BatchNorm2d` become :class:`SyncBatchNorm2d`,
    :class:`Conv2dBatchNormReLUMaxPool2d` becomes :class:`SyncConv2dBatchNormReLUMaxPool2d`;
    the new modules hold the very ``Parameter`` and buffer objects of the old (optimisers keep
    working, nothing is re-initialised) under the same state_dict keys, in the same mode.
    Containers are changed in place, as torch's converter does; the returned module is
    ``module`` itself unless ``module`` is converted. Models fused by :func:`cifarnet.fuse`
    convert too (their fused layers then read the converted batch norms). Modules that are
    already synchronized (:class:`SyncBatchNorm2d`, ``nn.SyncBatchNorm``) and subclasses of
    ``nn.BatchNorm2d`` (whose forward may differ) are left as they are.

    Args:
        module: the model.
        process_group: the ``torch.distributed`` group to synchronize over; None means the
            default group (the group is looked up at each forward, so ``module`` may be
            converted before ``torch.distributed.init_process_group``).

    Returns:
        the converted module. Without an initialised ``torch.distributed``, or in a group of
        one process, it computes exactly what ``module`` computed.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    replaced: dict[int, nn.Module] = {}
    converted = _convert_sync_batchnorm(module, process_group, replaced)
    # Layers fused by cifarnet.fuse read a batch norm registered elsewhere in the model (not a
    # child): point them at its converted module.
    for layer in converted.modules():
        if isinstance(layer, Conv2dBatchNormReLUMaxPool2d) and "bn" not in layer._modules and id(layer.bn) in replaced:
            layer._set_batch_norm(replaced[id(layer.bn)])
    return converted


def _convert_sync_batchnorm(module: nn.Module, process_group, replaced: dict[int, nn.Module]) -> nn.Module:
    from cifarnet.fuse import FusedBatchNorm2d  # NB: fuse imports this module

    if type(module) in (nn.BatchNorm2d, BatchNorm2d):
        converted = SyncBatchNorm2d.from_batch_norm(module, process_group)
    elif type(module) is FusedBatchNorm2d:
        converted = FusedBatchNorm2d.from_batch_norm(module, module.computed_by)
        converted.process_group = process_group  # the fused layer computing it synchronizes
    elif type(module) is Conv2dBatchNormReLUMaxPool2d:
        converted = SyncConv2dBatchNormReLUMaxPool2d.from_layer(module, process_group)
    else:
        converted = module
    if converted is not module:
        replaced[id(module)] = converted
    for name, child in list(module._modules.items()):
        if child is not None:
            converted.add_module(name, _convert_sync_batchnorm(child, process_group, replaced))
    return converted


def _native_chain(layer: Conv2dReLUMaxPool2d | Conv2dBatchNormReLUMaxPool2d, bn: nn.BatchNorm2d | None) -> nn.Module:
    """The GraphModule of ``layer.to_native()``: conv -> [bn ->] ReLU -> max pool in torch calls.

    NB: a GraphModule rather than an ``nn.Sequential`` of torch layers, whose keys
    (``0.weight``) would differ from the layer's (``weight``): the convolution's parameters
    stay attributes of the module itself, read by ``F.conv2d``.
    """
    root = nn.Module()
    root.weight = layer.weight
    root.bias = layer.bias
    graph = torch.fx.Graph()
    output = graph.placeholder("input")
    weight = graph.get_attr("weight")  # first: GraphModule registers in this order, the state_dict's
    bias = None if layer.bias is None else graph.get_attr("bias")
    output = graph.call_function(F.conv2d, (output, weight, bias, layer.stride, layer.padding))
    if bn is not None:
        root.bn = bn
        output = graph.call_module("bn", (output,))
    output = graph.call_function(F.relu, (output,))
    output = graph.call_function(
        F.max_pool2d, (output, layer.pool_size, layer.pool_stride), {"ceil_mode": layer.ceil_mode}
    )
    graph.output(output)
    native = torch.fx.GraphModule(root, graph)
    native.training = layer.training  # not .train(): bn keeps its own mode, as in the layer
    return native


class Dropout(nn.Dropout):
    """``nn.Dropout`` computed by :func:`cifarnet.ops.dropout`: one pass with a counter-based
    mask, where native CPU dropout takes three (draw, scale, multiply). Same arguments, same
    behaviour in evaluation mode (the input itself), no state; its masks differ from native's
    for the same ``torch.manual_seed``. With ``inplace=True`` the result is written back into
    the input, as ``nn.Dropout(inplace=True)`` leaves it."""

    def forward(self, input: Tensor) -> Tensor:
        output = ops.dropout(input, self.p, self.training)
        if self.inplace and output is not input:
            return input.copy_(output)
        return output

    @classmethod
    def from_dropout(cls, dropout: nn.Dropout) -> Dropout:
        """The cifarnet counterpart of an ``nn.Dropout`` (same ``p``, ``inplace`` and mode)."""
        module = cls(dropout.p, dropout.inplace)
        module.train(dropout.training)
        return module

    def to_native(self) -> nn.Dropout:
        """An ``nn.Dropout`` with this module's arguments and mode."""
        module = nn.Dropout(self.p, self.inplace)
        module.train(self.training)
        return module
