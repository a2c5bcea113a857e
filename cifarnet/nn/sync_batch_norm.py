"""Synchronized batch norm as modules: ``SyncBatchNorm1d``, ``SyncBatchNorm2d``,
``SyncConv2dBatchNormReLUMaxPool2d``, and ``convert_sync_batchnorm`` for models of cifarnet
layers (and on the CPU)."""

from __future__ import annotations

from torch import Tensor, nn

from cifarnet._sync_batch_norm import sync_batch_norm
from cifarnet.nn._fx import leaf_call
from cifarnet.nn.batch_norm import (
    BatchNorm1d,
    BatchNorm2d,
    batch_norm_arguments,
    batch_norm_sync_group,
    native_sync_batch_norm,
    share_batch_norm_state,
)
from cifarnet.nn.conv2d_batch_norm_relu_max_pool2d import Conv2dBatchNormReLUMaxPool2d


class _SynchronizedBatchNorm:
    """What :class:`SyncBatchNorm1d` and :class:`SyncBatchNorm2d` share: the process group,
    the synchronized training forward, and their unsynchronized and native forms."""

    _unsynchronized: type  # the cifarnet batch norm it computes where nothing synchronizes
    _native: type  # the torch.nn batch norm of the same rank

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
        **keywords,  # torch.nn batch norms' keyword-only ones: bias=True since torch 2.14
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **keywords)
        self.process_group = process_group
        self.fallback_class = self._unsynchronized

    @classmethod
    def from_batch_norm(cls, bn: nn.modules.batchnorm._BatchNorm, process_group=None):
        """The synchronized counterpart of ``bn`` (a torch.nn batch norm of this rank, this
        module's ``fallback_class``, or the cifarnet one), holding its very parameters and
        buffers and its mode."""
        sync = share_batch_norm_state(cls, bn)
        sync.process_group = process_group
        sync.fallback_class = getattr(bn, "fallback_class", cls._native if type(bn) is cls._native else cls._unsynchronized)
        return sync

    def forward(self, input: Tensor) -> Tensor:
        call = leaf_call(self, input)  # a leaf of torch.fx traces, as nn.SyncBatchNorm is
        if call is not None:
            return call
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
        return native_sync_batch_norm(self)


class SyncBatchNorm2d(_SynchronizedBatchNorm, BatchNorm2d):
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

    _unsynchronized = BatchNorm2d
    _native = nn.BatchNorm2d


class SyncBatchNorm1d(_SynchronizedBatchNorm, BatchNorm1d):
    """:class:`BatchNorm1d` synchronized as :class:`SyncBatchNorm2d` is (a classifier head's
    batch norm, say); exactly :class:`BatchNorm1d`, or ``nn.BatchNorm1d`` where it was made from
    one, where nothing synchronizes.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as in
            ``nn.BatchNorm1d``.
        process_group: the ``torch.distributed`` group; None means the default group.

    Shape:
        input ``[N, C]`` or ``[N, C, L]`` (this process's part of the batch) -> output of the
        same shape.
    """

    _unsynchronized = BatchNorm1d
    _native = nn.BatchNorm1d


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
        sync.training = layer.training  # not .train(): bn keeps its own mode
        return sync

    @property
    def process_group(self):
        return self.bn.process_group



def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``module`` with its batch norms synchronized over ``process_group``: the counterpart of
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for models of :mod:`cifarnet.nn` layers
    and on the CPU.

    ``nn.BatchNorm2d`` and :class:`BatchNorm2d` become :class:`SyncBatchNorm2d`,
    ``nn.BatchNorm1d`` and :class:`BatchNorm1d` :class:`SyncBatchNorm1d`,
    :class:`Conv2dBatchNormReLUMaxPool2d` becomes :class:`SyncConv2dBatchNormReLUMaxPool2d`;
    the new modules hold the very ``Parameter`` and buffer objects of the old (optimisers keep
    working, nothing is re-initialised) under the same state_dict keys, in the same mode.
    Containers are changed in place, as torch's converter does; the returned module is
    ``module`` itself unless ``module`` is converted. Models fused by :func:`cifarnet.fuse`
    convert too (their fused layers then read the converted batch norms). Modules that are
    already synchronized (:class:`SyncBatchNorm2d`, ``nn.SyncBatchNorm``), subclasses of
    torch's batch norms (whose forward may differ) and ``nn.BatchNorm3d`` (cifarnet has no 3-D
    layers; ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` converts it for GPUs) are left as
    they are.

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
    if type(module) in (nn.BatchNorm2d, BatchNorm2d):
        converted = SyncBatchNorm2d.from_batch_norm(module, process_group)
    elif type(module) in (nn.BatchNorm1d, BatchNorm1d):
        converted = SyncBatchNorm1d.from_batch_norm(module, process_group)
    elif hasattr(type(module), "_to_sync_batch_norm"):
        # NB: a module that converts itself (cifarnet.fuse's FusedBatchNorm2d): fuse imports this
        # module, so this module does not name fuse's classes.
        converted = module._to_sync_batch_norm(process_group)
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
