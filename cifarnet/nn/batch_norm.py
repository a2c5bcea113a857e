"""``BatchNorm1d`` and ``BatchNorm2d`` over :func:`cifarnet.ops.batch_norm`, and the batch-norm
rules the other layers share: the arguments a module normalises with, its process group, and
modules that hold another's very tensors."""

from __future__ import annotations

from torch import Tensor, nn

from cifarnet import ops
from cifarnet._sync_batch_norm import synchronizing_group
from cifarnet.nn._fx import leaf_call


def counts_batches(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether a call of ``bn`` counts its batch in ``num_batches_tracked`` (torch.nn's rule)."""
    return bn.training and bn.track_running_stats and bn.num_batches_tracked is not None


def batch_norm_arguments(bn: nn.modules.batchnorm._BatchNorm) -> dict:
    """The running statistics, mode and momentum a batch-norm module normalises with.

    torch.nn's rules, in one place for every module here: counts the batch in
    ``num_batches_tracked`` when training with running statistics; ``momentum=None`` means a
    cumulative average (momentum ``1 / num_batches_tracked``); without running statistics the
    batch statistics are used in evaluation too.
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if counts_batches(bn):
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


def native_sync_batch_norm(bn: nn.modules.batchnorm._BatchNorm) -> nn.SyncBatchNorm:
    """A ``torch.nn.SyncBatchNorm`` over ``bn``'s very tensors, mode and ``process_group``."""
    native = share_batch_norm_state(nn.SyncBatchNorm, bn)
    native.process_group = bn.process_group
    return native


def native_batch_norm2d(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """The torch.nn batch norm computing ``bn`` over its very tensors and mode:
    ``nn.SyncBatchNorm`` over the same group where ``bn`` synchronizes (it has a
    ``process_group``: torch's, cifarnet's, fuse's), else ``nn.BatchNorm2d``."""
    to_native = getattr(bn, "to_native", None)
    if to_native is not None:  # cifarnet's: BatchNorm2d -> nn.BatchNorm2d, SyncBatchNorm2d -> nn.SyncBatchNorm
        return to_native()
    if hasattr(bn, "process_group"):
        return native_sync_batch_norm(bn)
    return share_batch_norm_state(nn.BatchNorm2d, bn)


def _batch_norm_forward(bn: nn.modules.batchnorm._BatchNorm, input: Tensor) -> Tensor:
    """The forward of :class:`BatchNorm1d` and :class:`BatchNorm2d`: torch's input check, then
    :func:`cifarnet.ops.batch_norm` with the module's tensors and mode."""
    call = leaf_call(bn, input)  # a leaf of torch.fx traces, as nn.BatchNorm is
    if call is not None:
        return call
    bn._check_input_dim(input)
    return ops.batch_norm(input, weight=bn.weight, bias=bn.bias, **batch_norm_arguments(bn))


class BatchNorm1d(nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by :func:`cifarnet.ops.batch_norm`.

    Same constructor arguments, parameters and buffers (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so state_dicts load both ways.

    Shape:
        input ``[N, C]`` or ``[N, C, L]`` -> output of the same shape.
    """

    def forward(self, input: Tensor) -> Tensor:
        return _batch_norm_forward(self, input)

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
        return _batch_norm_forward(self, input)

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
