"""The modules a fused model holds: the fused layers at a convolution's position, and what
stands at the positions of the batch norm, ReLU and pool they compute."""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from cifarnet.fuse._torch_internals import _set_module_state
from cifarnet.nn import (
    BatchNormReLUConv2d,
    Conv2dBatchNormReLUMaxPool2d,
    Conv2dReLUMaxPool2d,
    native_batch_norm2d,
    share_batch_norm_state,
)


@dataclasses.dataclass(frozen=True)
class _Step:
    """A call a graph-fused layer replaced next to its convolution, as unfuse puts it back."""

    op: str  # "call_module", "call_function" or "call_method"
    target: str  # module path in the GraphModule, key of _FUNCTIONS_BY_NAME, or method name
    args: tuple  # the arguments after the chain's tensor
    kwargs: dict


class _FusedChainLayer:
    """What a fused layer at a convolution's position remembers of the chain it replaced."""

    # Where the chain's other calls stood: after the convolution, or before it (bn -> ReLU -> conv).
    steps_before_conv = False

    def _remember(
        self, conv: nn.Conv2d, names: tuple[str, ...], steps: tuple[_Step, ...], members: tuple[tuple[str, nn.Module], ...] = ()
    ) -> None:
        self.fuses = tuple(names)
        self.steps = tuple(steps)  # empty when rewritten by position: the positions remember
        # The chain's other modules, by their paths in the GraphModule, which its graph no longer
        # calls (graph rewriting only): replaced or hooked later, they send the model to its own
        # forward. NB: not children (each stays registered at its own position).
        _set_module_state(self, {"_members": tuple(members)})
        self._conv_arguments = {
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "kernel_size": conv.kernel_size,
            "stride": conv.stride,
            "padding": conv.padding,  # 'same' and 'valid' too, as the fused layer keeps them
            "dilation": conv.dilation,
            "groups": conv.groups,
            "bias": conv.bias is not None,
            "padding_mode": conv.padding_mode,
        }

    def to_conv2d(self) -> nn.Conv2d:
        """The ``nn.Conv2d`` this layer replaced, holding this layer's ``weight`` and ``bias``."""
        # Built on the meta device: its own initial tensors are thrown away at once.
        conv = nn.Conv2d(**self._conv_arguments, device="meta")
        conv.weight = self.weight
        conv.bias = self.bias
        conv.train(self.training)
        return conv

    def _fuses_repr(self) -> str:
        return f"fuses={' -> '.join(self.fuses)!r}"


class FusedConv2dReLUMaxPool2d(_FusedChainLayer, Conv2dReLUMaxPool2d):
    """:class:`cifarnet.nn.Conv2dReLUMaxPool2d` at an ``nn.Conv2d``'s position in a fused model.

    Owns the convolution's ``Parameter`` objects as ``weight`` and ``bias`` (the same
    state_dict keys) and remembers the chain it computes (``fuses``) for :func:`unfuse`.
    Made by :func:`fuse`.

    Shape:
        input ``[N, C_in, H, W]`` -> the pooled output ``[N, C_out, H_out, W_out]``.
    """

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("FusedConv2dReLUMaxPool2d is made by cifarnet.fuse; build a cifarnet.nn.Conv2dReLUMaxPool2d instead")

    @classmethod
    def from_chain(cls, conv: nn.Conv2d, pool: nn.MaxPool2d, names, steps=(), members=()) -> FusedConv2dReLUMaxPool2d:
        """The fused layer of ``conv -> ReLU -> pool``, sharing ``conv``'s parameters.

        Args:
            conv, pool: the chain's modules (``pool`` built from ``F.max_pool2d``'s arguments
                when the chain pools functionally); ``ValueError`` if they cannot be fused.
            names: the chain's qualified names, for ``repr`` and reports.
            steps: how to call the chain's other nodes again (graph rewriting only).
            members: ``(path, module)`` of the chain's other modules (graph rewriting only).
        """
        fused = cls.from_modules(conv, pool)
        fused._remember(conv, names, steps, members)
        return fused

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._fuses_repr()}"


class _BatchNormByReference:
    """A fused layer whose ``bn`` is the batch norm module registered at its own position in
    the model, read at each call, rather than a child.

    Its parameters and buffers keep their keys there, and ``.to()``, ``.double()``, the batch
    norm's train/eval mode and ``load_state_dict`` all reach the computation. Moving or
    converting the layer *alone* does not move ``bn``: apply such methods to the model.
    """

    # NB: torch.fx traces into such a layer (reading bn's tensors where bn is registered): a
    # GraphModule that called it as a leaf would hold neither bn's tensors nor bn's mode.
    _traced_as_leaf = False

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._batch_norm

    def _set_batch_norm(self, bn: nn.BatchNorm2d) -> None:
        # NB: not through nn.Module.__setattr__, which would register bn as a child and add
        # "bn.*" keys; bn is registered (once) at its own position in the model. A converter
        # that replaces it there (convert_sync_batchnorm) points the chain's members at it too.
        old = vars(self).get("_batch_norm")
        members = tuple((name, bn if member is old else member) for name, member in vars(self).get("_members", ()))
        _set_module_state(self, {"_batch_norm": bn, "_members": members})


class FusedConv2dBatchNormReLUMaxPool2d(_FusedChainLayer, _BatchNormByReference, Conv2dBatchNormReLUMaxPool2d):
    """:class:`cifarnet.nn.Conv2dBatchNormReLUMaxPool2d` at an ``nn.Conv2d``'s position whose
    batch norm is not a child but the module at the batch norm's own position.

    Owns the convolution's ``Parameter`` objects as ``weight`` and ``bias``; ``bn`` is the batch
    norm module registered elsewhere in the model (``features.1``, ``bn1``; see
    :class:`_BatchNormByReference`). Made by :func:`fuse`.

    Shape:
        input ``[N, C_in, H, W]`` -> the pooled output ``[N, C_out, H_out, W_out]``.
    """

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError(
            "FusedConv2dBatchNormReLUMaxPool2d is made by cifarnet.fuse; "
            "build a cifarnet.nn.Conv2dBatchNormReLUMaxPool2d instead"
        )

    @classmethod
    def from_chain(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: nn.MaxPool2d, names, steps=(), members=()
    ) -> FusedConv2dBatchNormReLUMaxPool2d:
        """The fused layer of ``conv -> bn -> ReLU -> pool``: shares ``conv``'s parameters and
        reads ``bn``'s tensors; arguments as in :meth:`FusedConv2dReLUMaxPool2d.from_chain`."""
        fused = cls.from_modules(conv, bn, pool)
        fused._remember(conv, names, steps, members)
        return fused

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._fuses_repr()}"


class FusedBatchNormReLUConv2d(_FusedChainLayer, _BatchNormByReference, BatchNormReLUConv2d):
    """:class:`cifarnet.nn.BatchNormReLUConv2d` at an ``nn.Conv2d``'s position whose batch norm
    is the module at the batch norm's own position, read at each call (see
    :class:`_BatchNormByReference`).

    The chain it replaces comes *before* the convolution: the graph calls this layer on the
    batch norm's input, and :func:`unfuse` puts the batch-norm and ReLU calls back in front of
    the ``nn.Conv2d``. Owns the convolution's ``Parameter`` objects as ``weight`` and ``bias``.
    Made by :func:`fuse`.

    Shape:
        input ``[N, C_in, H, W]`` (the batch norm's input) -> the convolution's output.
    """

    steps_before_conv = True

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("FusedBatchNormReLUConv2d is made by cifarnet.fuse; build a cifarnet.nn.BatchNormReLUConv2d instead")

    @classmethod
    def from_chain(cls, bn: nn.BatchNorm2d, conv: nn.Conv2d, names, steps=(), members=()) -> FusedBatchNormReLUConv2d:
        """The fused layer of ``bn -> ReLU -> conv``: shares ``conv``'s parameters and reads
        ``bn``'s tensors; ``steps`` are the batch-norm and ReLU calls, in order, that
        :func:`unfuse` puts back before the convolution (graph rewriting only)."""
        fused = cls.from_modules(bn, conv)
        fused._remember(conv, names, steps, members)
        return fused

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._fuses_repr()}"


class FusedBatchNorm2d(nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` whose normalisation the fused layer before it computes.

    Stands at a batch norm's position in an ``nn.Sequential`` after :func:`fuse`: holds the
    same ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked`` (the
    same keys), which the fused layer at ``computed_by`` reads and updates, and returns its
    input unchanged. Made from a synchronized batch norm, it keeps its ``process_group`` and the
    fused layer synchronizes. Convert batch norms with ``nn.SyncBatchNorm.convert_sync_batchnorm``
    before fusing, not after (a converted position would normalise a second time);
    :func:`cifarnet.nn.convert_sync_batchnorm` works before and after.

    Shape:
        input: any -> output: the input itself.
    """

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("FusedBatchNorm2d is made by cifarnet.fuse")

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, computed_by: str) -> FusedBatchNorm2d:
        """Holds ``bn``'s tensors (shared, not copied) and mode; ``computed_by`` names the fused
        layer that normalises."""
        fused = share_batch_norm_state(cls, bn)
        fused.computed_by = computed_by
        if hasattr(bn, "process_group"):
            fused.process_group = bn.process_group
        return fused

    def to_batch_norm2d(self) -> nn.BatchNorm2d | nn.SyncBatchNorm:
        """A plain ``nn.BatchNorm2d`` holding this module's tensors (an ``nn.SyncBatchNorm``
        over the same group where it is synchronized)."""
        return native_batch_norm2d(self)

    def _to_sync_batch_norm(self, process_group) -> FusedBatchNorm2d:
        """For :func:`cifarnet.nn.convert_sync_batchnorm`: this position synchronized over
        ``process_group`` (the fused layer computing it then synchronizes)."""
        converted = FusedBatchNorm2d.from_batch_norm(self, self.computed_by)
        converted.process_group = process_group
        return converted

    def forward(self, input: Tensor) -> Tensor:
        return input

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, computed_by={self.computed_by!r}"


class FusedIdentity(nn.Module):
    """Stands at an ``nn.ReLU``'s or ``nn.MaxPool2d``'s position in an ``nn.Sequential`` whose
    fused layer at ``computed_by`` has applied it: returns its input unchanged.

    Keeps the module it replaced as ``original`` (stateless; not a child, as it is no longer
    called) for :func:`unfuse`.

    Shape:
        input: any -> output: the input itself.
    """

    def __init__(self, original: nn.Module, computed_by: str) -> None:
        super().__init__()
        _set_module_state(self, {"original": original})  # not a child: no longer called
        self.computed_by = computed_by
        self.train(original.training)

    def forward(self, input: Tensor) -> Tensor:
        return input

    def extra_repr(self) -> str:
        return f"{self.original}, computed_by={self.computed_by!r}"
