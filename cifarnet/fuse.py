"""``cifarnet.fuse(model)``: the fused layers in any model, and ``cifarnet.unfuse`` to take them out.

:func:`fuse` finds every ``Conv2d -> ReLU -> MaxPool2d`` and ``Conv2d -> BatchNorm2d -> ReLU ->
MaxPool2d`` chain of a model and computes it with one fused op, keeping the trained tensors.

**State dicts keep their keys.** The modules that hold tensors stay where they are, so a fused
model's ``state_dict()`` has the original's keys in the original order and checkpoints load
both ways strictly:

- the convolution's position (``features.0``, ``conv1``) gets a fused layer
  (:class:`FusedConv2dReLUMaxPool2d` or :class:`FusedConv2dBatchNormReLUMaxPool2d`) that owns
  the convolution's own ``Parameter`` objects as ``weight`` and ``bias``;
- the batch norm stays registered at its position and the fused layer reads it at every call
  through a reference to the *module* (not a child, so no second key): module references see
  what ``.to()``, ``.double()`` and ``load_state_dict`` do to its buffers, and
  :func:`cifarnet.nn.batch_norm_arguments` applies torch's rules (mode, momentum,
  ``num_batches_tracked``) to it, so running statistics evolve exactly as unfused.

**Two ways to rewrite**, chosen per module:

- *Positions* (the model keeps its class). When every chain is a run of consecutive children of
  an ``nn.Sequential`` (``vgg11().features``), the positions are swapped in place: fused layer at
  the convolution's, a :class:`FusedBatchNorm2d` (the same parameters and buffers, an identity
  ``forward``) at the batch norm's, and :class:`FusedIdentity` at the ReLU's and the pool's;
  ``nn.Sequential.forward`` then computes the chain once, in its first child.
- *Graph* (the model becomes a ``torch.fx.GraphModule`` with the same class name). Chains
  written in ``forward`` (``F.relu``, ``torch.relu``, ``x.relu_()``, ``F.max_pool2d``,
  ``torch.max_pool2d``, modules called by attribute) are found in the model's ``torch.fx``
  graph; the convolution's node calls the fused layer and the other nodes are removed. The
  other modules stay registered untouched, and the GraphModule adopts the model's whole module
  tree, parameters, buffers, hooks and plain attributes, so every name, key and container
  (``model.features[0]``) is where it was.

Tracing decides both: it shows where each output goes, so a chain whose intermediate output is
used elsewhere is never fused. ``forward`` is traced in training and in evaluation mode and
must give one graph (no Python branch on ``self.training``) without touching a buffer outside
the graph. Input checks such as ``if input.dim() != 4: raise ValueError(...)`` do not stop the
trace: every way through ``forward``'s branches on traced values is tried, and when exactly
one of them traces (the others raise or cannot be traced) that one is kept, with each branch
condition checked at run time. An input that fails a check runs the module's own ``forward``
instead, on the same tensors with the graph's fused layers back to ``nn.Conv2d``: it raises
what the original raises (the ``ValueError``, or the user's own exception type) or, on a way
the graph does not hold, returns what the original returns. A module that cannot be traced
is left as it is, except that its plain ``nn.Sequential`` children are rewritten by position
and its other children are tried in turn; :func:`fuse` warns, naming it.

Chains the fused ops cannot compute (dilation, groups, padding modes, padded, dilated or
index-returning pools, windows over 255 elements, asymmetric ``'same'`` padding, batch-norm
subclasses, hooked modules, reused outputs, modules called more than once) stay unfused and are
listed, with the reason, in the :class:`FusionReport`.

:func:`unfuse` puts back ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU``, ``nn.MaxPool2d`` and the
modules' own classes (and so their own ``forward``), sharing the same tensors, for people
without cifarnet; it also turns the :mod:`cifarnet.nn` layers of any model into torch modules
(their ``to_native()``).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import inspect
import linecache
import operator
import os
import typing
import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import has_side_effect
from torch.overrides import handle_torch_function, has_torch_function

from cifarnet.nn import (
    BATCH_NORMS_2D,
    BatchNorm1d,
    BatchNorm2d,
    Conv2dBatchNormReLUMaxPool2d,
    Conv2dReLUMaxPool2d,
    Dropout,
    SyncBatchNorm2d,
    conv_bn_relu_pool_unfusable_reason,
    conv_relu_pool_unfusable_reason,
    share_batch_norm_state,
)

__all__ = [
    "Chain",
    "FusedBatchNorm2d",
    "FusedConv2dBatchNormReLUMaxPool2d",
    "FusedConv2dReLUMaxPool2d",
    "FusedIdentity",
    "FusionReport",
    "fuse",
    "unfuse",
]

# The functions a chain's ReLU and pool may be written with in forward, by the name unfuse
# calls them again with (F.max_pool2d itself cannot be pickled inside a fused layer).
_RELU_FUNCTIONS = {F.relu: "torch.nn.functional.relu", torch.relu: "torch.relu", torch.relu_: "torch.relu_"}
_RELU_METHODS = ("relu", "relu_")
_MAX_POOL_FUNCTIONS = {
    F.max_pool2d: "torch.nn.functional.max_pool2d",
    F.max_pool2d_with_indices: "torch.nn.functional.max_pool2d_with_indices",  # return_indices=True
    torch.max_pool2d: "torch.max_pool2d",
}
_FUNCTIONS_BY_NAME = {name: function for table in (_RELU_FUNCTIONS, _MAX_POOL_FUNCTIONS) for function, name in table.items()}
# F.max_pool2d's and torch.max_pool2d's parameters after the input, in order.
_MAX_POOL_PARAMETERS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")

# Batch norms whose forward is torch's batch norm (synchronized or not: the fused layer
# synchronizes as its batch norm does); a subclass may compute something else.
_FUSABLE_BATCH_NORMS = (nn.BatchNorm2d, BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm2d)

# Ways through forward's branches tried per mode before giving up on tracing a module.
_MAX_TRACES = 16

# What nn.Module.__init__ sets: the GraphModule takes these over from the traced module.
_MODULE_STATE = frozenset(vars(nn.Module()))


# --------------------------------------------------------------------------------------------
# Private torch behaviour fuse relies on, each in one helper here (where no public API does
# the same). tests/test_torch_internals.py checks each against the installed torch, so that a
# release that changes one fails there, naming it, rather than somewhere deep inside fuse.


def _tensor_version(tensor: Tensor) -> int:
    """How many in-place writes ``tensor`` has had (``Tensor._version``)."""
    # NB: no public counterpart: comparing values would miss a write of equal values, which
    # forward would repeat at every call where the graph would not.
    return tensor._version


def _set_module_state(module: nn.Module, state: dict) -> None:
    """Puts ``state`` (a module's attributes, by name) into ``module`` as they are: no copy,
    no registration as a child, parameter or buffer.

    nn.Module keeps its whole state in its instance ``__dict__`` (``_parameters``,
    ``_buffers``, ``_modules``, hooks, ``training``, plain attributes): taking over another
    module's dictionaries makes ``module`` hold the very same tensors, children and hooks,
    which ``load_state_dict`` (copies values) and ``setattr`` (registers, copies nothing of
    hooks or order) cannot do.
    """
    module.__dict__.update(state)


def _graph_module_class(graph_module: GraphModule) -> type:
    """The class GraphModule makes for each of its instances (``GraphModule.__new__``), on
    which ``recompile`` installs the graph's ``forward``; renaming it renames only this one."""
    return type(graph_module)


def _rename_graph_module(name: str, graph_module: GraphModule) -> None:
    _graph_module_class(graph_module).__name__ = name


def _keep_through_copies(graph_module: GraphModule, class_name: str, attributes: dict) -> None:
    """Makes ``copy.deepcopy`` and pickle of ``graph_module`` keep its class name and its
    plain ``attributes``, which GraphModule's own ``__deepcopy__`` and ``__reduce__`` rebuild
    from what the graph calls alone (and name "GraphModule").

    torch.fx's own ways: deepcopy restores the attributes under a key of ``meta`` and runs
    the registered deepcopy hooks; unpickling names the class by ``_graphmodule_cls_name``.
    """
    if attributes:
        graph_module.meta[torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY] = attributes
    _set_module_state(graph_module, {"_graphmodule_cls_name": class_name})
    graph_module._register_deepcopy_hook(functools.partial(_rename_graph_module, class_name))


# --------------------------------------------------------------------------------------------
# The modules a fused model holds


@dataclasses.dataclass(frozen=True)
class _Step:
    """A call a graph-fused layer replaced after its convolution, as unfuse puts it back."""

    op: str  # "call_module", "call_function" or "call_method"
    target: str  # module path in the GraphModule, key of _FUNCTIONS_BY_NAME, or method name
    args: tuple  # the arguments after the chain's tensor
    kwargs: dict


class _FusedChainLayer:
    """What a fused layer at a convolution's position remembers of the chain it replaced."""

    def _remember(self, conv: nn.Conv2d, names: tuple[str, ...], steps: tuple[_Step, ...]) -> None:
        self.fuses = tuple(names)
        self.steps = tuple(steps)  # empty when rewritten by position: the positions remember
        self._conv_arguments = {
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "kernel_size": conv.kernel_size,
            "stride": conv.stride,
            "padding": conv.padding,  # may be 'same' or 'valid', which the fused layer resolved
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
    def from_chain(cls, conv: nn.Conv2d, pool: nn.MaxPool2d, names, steps=()) -> FusedConv2dReLUMaxPool2d:
        """The fused layer of ``conv -> ReLU -> pool``, sharing ``conv``'s parameters.

        Args:
            conv, pool: the chain's modules (``pool`` built from ``F.max_pool2d``'s arguments
                when the chain pools functionally); ``ValueError`` if they cannot be fused.
            names: the chain's qualified names, for ``repr`` and reports.
            steps: how to call the chain's other nodes again (graph rewriting only).
        """
        fused = cls.from_modules(conv, pool)
        fused._remember(conv, names, steps)
        return fused

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._fuses_repr()}"


class FusedConv2dBatchNormReLUMaxPool2d(_FusedChainLayer, Conv2dBatchNormReLUMaxPool2d):
    """:class:`cifarnet.nn.Conv2dBatchNormReLUMaxPool2d` at an ``nn.Conv2d``'s position whose
    batch norm is not a child but the module at the batch norm's own position.

    Owns the convolution's ``Parameter`` objects as ``weight`` and ``bias``; ``bn`` is the batch
    norm module registered elsewhere in the model (``features.1``, ``bn1``), read at each call,
    so its parameters and buffers keep their keys there, and ``.to()``, ``.double()``, the
    batch norm's train/eval mode and ``load_state_dict`` all reach the computation. Moving or
    converting this layer *alone* does not move ``bn``: apply such methods to the model.
    Made by :func:`fuse`.

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
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: nn.MaxPool2d, names, steps=()
    ) -> FusedConv2dBatchNormReLUMaxPool2d:
        """The fused layer of ``conv -> bn -> ReLU -> pool``: shares ``conv``'s parameters and
        reads ``bn``'s tensors; arguments as in :meth:`FusedConv2dReLUMaxPool2d.from_chain`."""
        fused = cls.from_modules(conv, bn, pool)
        fused._remember(conv, names, steps)
        return fused

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self._batch_norm

    def _set_batch_norm(self, bn: nn.BatchNorm2d) -> None:
        # NB: not through nn.Module.__setattr__, which would register bn as a child and add
        # "bn.*" keys; bn is registered (once) at its own position in the model.
        _set_module_state(self, {"_batch_norm": bn})

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
        if hasattr(self, "process_group"):
            native = share_batch_norm_state(nn.SyncBatchNorm, self)
            native.process_group = self.process_group
            return native
        return share_batch_norm_state(nn.BatchNorm2d, self)

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


# --------------------------------------------------------------------------------------------
# The report


@dataclasses.dataclass(frozen=True)
class Chain:
    """A conv -> [batch norm ->] ReLU -> max-pool chain that :func:`fuse` found.

    Attributes:
        names: one per step, in order: the module's qualified name in the model, or for a
            function called in ``forward`` the ``torch.fx`` node's name (``relu``,
            ``max_pool2d_1``) after the traced module's (``backbone.relu``).
        reason: why it was left unfused, or None if it was fused.
    """

    names: tuple[str, ...]
    reason: str | None = None

    def __str__(self) -> str:
        chain = " -> ".join(self.names)
        return chain if self.reason is None else f"{chain}: {self.reason}"


@dataclasses.dataclass
class FusionReport:
    """What :func:`fuse` did to a model.

    Attributes:
        fused: the chains now computed by fused layers, in forward order.
        unfused: the chains left as they were, each with its reason.
        untraced: qualified name (``""``: the model) -> why ``torch.fx`` could not trace the
            module, for the modules fused only by position inside (see :func:`fuse`).
        checks: the branch conditions kept, as run-time checks, in the graphs of traced
            modules: where the condition is and the value the traced branch needs. An input
            that fails one runs the module's own ``forward`` (see :class:`_FusedGraphModule`).
    """

    fused: list[Chain] = dataclasses.field(default_factory=list)
    unfused: list[Chain] = dataclasses.field(default_factory=list)
    untraced: dict[str, str] = dataclasses.field(default_factory=dict)
    checks: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"cifarnet.fuse: fused {len(self.fused)} chain(s), left {len(self.unfused)} unfused"]
        lines += [f"  fused:      {chain}" for chain in self.fused]
        lines += [f"  unfused:    {chain}" for chain in self.unfused]
        lines += [f"  not traced: {name or '(model)'}: {why}" for name, why in self.untraced.items()]
        lines += [f"  check kept: {check}" for check in self.checks]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Public API


def fuse(model: nn.Module, *, inplace: bool = False, report: bool = False):
    """Computes every conv -> [batch norm ->] ReLU -> max-pool chain of ``model`` with one fused op.

    The chains may be ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU`` and ``nn.MaxPool2d``
    children of ``nn.Sequential`` containers at any depth, or calls in ``forward``: conv and
    batch-norm modules with ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu`` (in place
    or not) and ``nn.MaxPool2d``, ``F.max_pool2d``, ``torch.max_pool2d``. The result computes the
    same function with the same parameters, buffers, train/eval modes, device and dtype, and has
    the same ``state_dict`` keys; see the module docstring for how. Synchronized batch norms
    (``nn.SyncBatchNorm``, :class:`cifarnet.nn.SyncBatchNorm2d`: models converted by either
    ``convert_sync_batchnorm``) give fused layers that synchronize over the same group.

    Args:
        model: the model; modules are rewritten in place on a deep copy unless ``inplace``.
        inplace: rewrite ``model``'s modules themselves instead of a deep copy's. Use the
            returned module: where ``model`` itself is traced, a new GraphModule runs its
            (rewritten) modules, and ``model`` no longer computes what it did.
        report: also return a :class:`FusionReport`.

    Returns:
        The fused model: ``model`` (or its copy) with its positions rewritten, or a
        ``torch.fx.GraphModule`` named after ``model``'s class where chains had to be
        rewritten in the graph of ``forward``; with ``report=True``, ``(model, report)``.

    Warns:
        UserWarning naming each module ``torch.fx`` could not trace (inside which only
        ``nn.Sequential`` children are rewritten), with the reason.

    The fused ops take float32 and float64 tensors on the CPU (CUDA kernels are to come).
    A GraphModule's forward is its graph: call it, not the custom submodules whose code was
    traced into it (their convolutions now also normalise, rectify and pool).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    fusion = FusionReport()
    fused = _fuse_module(model, "", fusion)
    for name, why in fusion.untraced.items():
        where = "the model" if not name else repr(name)
        warnings.warn(
            f"cifarnet.fuse: cannot trace {where} with torch.fx ({why}); fused only the chains of the "
            "nn.Sequential containers and traceable submodules inside it",
            stacklevel=2,
        )
    return (fused, fusion) if report else fused


def unfuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Undoes :func:`fuse`: plain torch modules and calls again, holding the same tensors.

    Fused layers become ``nn.Conv2d``; by position, :class:`FusedBatchNorm2d` becomes
    ``nn.BatchNorm2d`` (also where the original was a :class:`cifarnet.nn.BatchNorm2d`;
    ``nn.SyncBatchNorm`` where it was synchronized) and
    :class:`FusedIdentity` the ``nn.ReLU`` or ``nn.MaxPool2d`` it replaced; in graphs, the
    batch-norm, ReLU and pooling calls are put back after the convolution. Modules that
    ``fuse`` turned into GraphModules become instances of their own classes again, running
    their own ``forward`` (a GraphModule given to ``fuse`` stays one, its graph unfused).
    Layers of :mod:`cifarnet.nn` that ``fuse`` did not make (a model written with them, or
    one such layer given as ``model``) become their ``to_native()``: ``nn.BatchNorm1d`` and
    ``nn.BatchNorm2d``, and GraphModules of torch calls for the conv layers, holding the same
    tensors under the same names. A forward that calls :mod:`cifarnet.ops` itself is code,
    not a layer, and stays as it is.

    Args:
        model: any model: one returned by :func:`fuse`, or one built with :mod:`cifarnet.nn`.
        inplace: rewrite ``model`` itself rather than a deep copy.

    Returns:
        The unfused model, with the same ``state_dict`` keys.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for module in list(model.modules()):
        if isinstance(module, GraphModule):
            _unfuse_graph(module)
    _unfuse_children(model)
    model = _untraced(model)
    return model.to_native() if isinstance(model, _LAYERS) else model


# The layers of cifarnet.nn, each with a to_native() that computes it with torch alone.
_LAYERS = (Conv2dReLUMaxPool2d, Conv2dBatchNormReLUMaxPool2d, BatchNorm1d, BatchNorm2d, Dropout)


def _unfuse_children(module: nn.Module) -> None:
    """Replaces, at every depth below ``module``, what fuse put in by what it replaced, and the
    layers of cifarnet.nn by their ``to_native()``."""
    for name, child in list(module._modules.items()):
        if isinstance(child, _FusedChainLayer):  # before _LAYERS: the chain's other positions come back too
            native = child.to_conv2d()
        elif isinstance(child, FusedBatchNorm2d):
            native = child.to_batch_norm2d()
        elif isinstance(child, FusedIdentity):
            native = child.original.train(child.training)
        elif isinstance(child, _LAYERS):
            native = child.to_native()
        else:
            if child is not None:
                _unfuse_children(child)
            continue
        setattr(module, name, native)


# --------------------------------------------------------------------------------------------
# Finding chains


@dataclasses.dataclass
class _Candidate:
    """A chain found in a graph or an nn.Sequential, before it is fused."""

    names: tuple[str, ...]
    conv: nn.Module
    bn: nn.Module | None
    relu: nn.Module | None  # None where forward calls a function
    pool: nn.Module  # built from the call's arguments where forward calls a function
    nodes: tuple[Node, ...] = ()  # graph chains only
    reason: str | None = None


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_leaf(module: nn.Module) -> bool:
    """Modules fuse neither traces into nor looks inside: torch.nn's layers and cifarnet's."""
    if type(module).__module__ in ("cifarnet.nn", __name__):
        return True
    torch_layer = type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))
    return torch_layer and not isinstance(module, nn.Sequential)


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fusability_reason(candidate: _Candidate) -> str | None:
    """Why the fused ops cannot compute ``candidate``'s modules, or None."""
    conv, bn, pool = candidate.conv, candidate.bn, candidate.pool
    if bn is None:
        reason = conv_relu_pool_unfusable_reason(conv, pool)
    else:
        reason = conv_bn_relu_pool_unfusable_reason(conv, bn, pool)
        if reason is None and type(bn) not in _FUSABLE_BATCH_NORMS:
            reason = f"{type(bn).__name__} is a subclass of nn.BatchNorm2d, whose forward may differ"
    if reason is not None:
        return reason
    # One module per name; None where forward calls a function (it has no hooks).
    modules = (conv, *([] if bn is None else [bn]), candidate.relu, pool)
    for name, module in zip(candidate.names, modules, strict=True):
        hooked = module is not None and (
            module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
        )
        if hooked:
            return f"{name} has hooks, which the fused layer would not call"
    return None


def _relu_call(node: Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _max_pool_call(node: Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), nn.MaxPool2d)
    return node.op == "call_function" and node.target in _MAX_POOL_FUNCTIONS


def _batch_norm_call(node: Node, root: nn.Module) -> bool:
    return node.op == "call_module" and isinstance(root.get_submodule(node.target), BATCH_NORMS_2D)


def _called_module(node: Node | None, root: nn.Module) -> nn.Module | None:
    return root.get_submodule(node.target) if node is not None and node.op == "call_module" else None


def _next_call(node: Node, matches, root: nn.Module) -> Node | None:
    """The first user of ``node`` that matches and takes ``node`` as its input tensor."""
    for user in node.users:
        if user.args and user.args[0] is node and matches(user, root):
            return user
    return None


def _max_pool_module(node: Node) -> nn.MaxPool2d:
    """The ``nn.MaxPool2d`` equivalent to a ``F.max_pool2d``/``torch.max_pool2d`` call."""
    values = dict(zip(_MAX_POOL_PARAMETERS, node.args[1:]))
    values.update(node.kwargs)
    stride = values.get("stride")
    return nn.MaxPool2d(
        values.get("kernel_size"),
        None if stride in (None, [], ()) else stride,  # torch.max_pool2d's stride=[] is the window
        values.get("padding", 0),
        values.get("dilation", 1),
        bool(values.get("return_indices", False)),
        bool(values.get("ceil_mode", False)),
    )


def _graph_chains(graph: torch.fx.Graph, root: nn.Module, prefix: str) -> list[_Candidate]:
    """Every conv -> [bn ->] relu -> max-pool chain of ``graph`` (traced from ``root``), in
    order, with the reason why it cannot be fused where it cannot."""
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    chains = []
    for conv_node in graph.nodes:
        if conv_node.op != "call_module" or not isinstance(root.get_submodule(conv_node.target), nn.Conv2d):
            continue
        bn_node = _next_call(conv_node, _batch_norm_call, root)
        relu_node = _next_call(bn_node or conv_node, _relu_call, root)
        pool_node = relu_node and _next_call(relu_node, _max_pool_call, root)
        if pool_node is None:
            continue
        nodes = tuple(node for node in (conv_node, bn_node, relu_node, pool_node) if node is not None)
        names = tuple(_qualified(prefix, node.target if node.op == "call_module" else node.name) for node in nodes)
        modules = [_called_module(node, root) for node in (conv_node, bn_node, relu_node, pool_node)]
        candidate = _Candidate(names, *modules, nodes)
        dynamic = [node for node in nodes[1:] if len(node.all_input_nodes) > 1]
        reused = [(node, name) for node, name in zip(nodes[:-1], names) if len(node.users) > 1]
        # Modules with state must be called once; a shared nn.ReLU or nn.MaxPool2d may be reused.
        stateful = [(node, name) for node, name in zip(nodes, names) if node in (conv_node, bn_node)]
        repeated = [(node, name) for node, name in stateful if calls[node.target] > 1]
        if reused:
            node, name = reused[0]
            others = ", ".join(_qualified(prefix, user.name) for user in node.users if user not in nodes)
            candidate.reason = f"the output of {name} is also used by {others}"
        elif repeated:
            node, name = repeated[0]
            candidate.reason = f"{name} is called {calls[node.target]} times in forward"
        elif dynamic:
            candidate.reason = f"the arguments of {_qualified(prefix, dynamic[0].name)} are computed in forward"
        if candidate.pool is None and candidate.reason is None:
            candidate.pool = _max_pool_module(pool_node)
        if candidate.reason is None:
            candidate.reason = _fusability_reason(candidate)
        chains.append(candidate)
    return chains


def _sequential_chains(sequential: nn.Sequential, prefix: str) -> list[tuple[list[str], _Candidate]]:
    """The chains among consecutive children of ``sequential`` (child names, candidate)."""
    children = list(sequential._modules.items())
    chains, index = [], 0
    while index < len(children):
        names = [name for name, _ in children[index : index + 4]]
        modules = [module for _, module in children[index : index + 4]]
        has_bn = len(modules) > 1 and isinstance(modules[1], BATCH_NORMS_2D)
        length = 4 if has_bn else 3
        names, modules = names[:length], modules[:length]
        matches = (
            len(modules) == length
            and isinstance(modules[0], nn.Conv2d)
            and type(modules[-2]) is nn.ReLU
            and isinstance(modules[-1], nn.MaxPool2d)
        )
        if not matches:
            index += 1
            continue
        candidate = _Candidate(
            tuple(_qualified(prefix, name) for name in names),
            modules[0],
            modules[1] if has_bn else None,
            modules[-2],
            modules[-1],
        )
        candidate.reason = _fusability_reason(candidate)
        chains.append((names, candidate))
        index += length
    return chains


def _sequential_positions(root: nn.Module, candidate: _Candidate, calls: collections.Counter) -> tuple[str, list[str]] | None:
    """``(parent path, child names)`` when a graph chain is a run of consecutive children of a
    plain ``nn.Sequential``, each called once, so that it can be rewritten by position."""
    if any(node.op != "call_module" or calls[node.target] != 1 for node in candidate.nodes):
        return None
    parents, names = zip(*(node.target.rpartition(".")[::2] for node in candidate.nodes))
    if len(set(parents)) != 1 or not _is_plain_sequential(root.get_submodule(parents[0])):
        return None
    children = list(root.get_submodule(parents[0])._modules)
    start = children.index(names[0])
    if children[start : start + len(names)] != list(names):
        return None
    return parents[0], list(names)


# --------------------------------------------------------------------------------------------
# Fusing


def _fuse_module(module: nn.Module, name: str, report: FusionReport) -> nn.Module:
    """``module`` with its chains fused: the same object, or a GraphModule replacing it."""
    if type(module).forward is nn.Module.forward:  # a container that is not called: ModuleList, ...
        _fuse_children(module, name, report)
        return module
    if _is_leaf(module):
        return module
    try:
        graph, checks = _trace(module)
    except _Untraceable as error:
        report.untraced[name] = str(error)
        if _is_plain_sequential(module):
            _fuse_sequential(module, name, report)
        _fuse_children(module, name, report)
        return module
    chains = _graph_chains(graph, module, name)
    report.unfused += [Chain(chain.names, chain.reason) for chain in chains if chain.reason is not None]
    fusable = [chain for chain in chains if chain.reason is None]
    report.fused += [Chain(chain.names) for chain in fusable]
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    positions = [_sequential_positions(module, chain, calls) for chain in fusable]
    if all(position is not None for position in positions):
        for (parent, children), chain in zip(positions, fusable):
            _fuse_positions(module.get_submodule(parent), children, chain)
        return module
    graph_module = _graph_module(module, graph)
    for chain in fusable:
        _fuse_in_graph(graph_module, chain)
    graph_module.graph.lint()
    graph_module.recompile()
    report.checks += [f"{name or type(module).__name__}: {check}" for check in checks]
    return graph_module


def _fuse_children(module: nn.Module, name: str, report: FusionReport) -> None:
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        fused = _fuse_module(child, _qualified(name, child_name), report)
        if fused is not child:
            setattr(module, child_name, fused)


def _fuse_sequential(sequential: nn.Sequential, name: str, report: FusionReport) -> None:
    """Fuses the chains of consecutive children of an untraced ``nn.Sequential`` by position,
    taking ``nn.Sequential.forward``'s word that each output only feeds the next child."""
    for children, chain in _sequential_chains(sequential, name):
        if chain.reason is None:
            _fuse_positions(sequential, children, chain)
            report.fused.append(Chain(chain.names))
        else:
            report.unfused.append(Chain(chain.names, chain.reason))


def _fuse_positions(parent: nn.Module, children: list[str], chain: _Candidate) -> None:
    """Rewrites a chain of consecutive children of a plain nn.Sequential by position."""
    conv_name = chain.names[0]
    replacements = [FusedIdentity(chain.relu, conv_name), FusedIdentity(chain.pool, conv_name)]
    if chain.bn is None:
        fused = FusedConv2dReLUMaxPool2d.from_chain(chain.conv, chain.pool, chain.names)
    else:
        fused_bn = FusedBatchNorm2d.from_batch_norm(chain.bn, conv_name)
        fused = FusedConv2dBatchNormReLUMaxPool2d.from_chain(chain.conv, fused_bn, chain.pool, chain.names)
        replacements.insert(0, fused_bn)
    for child, module in zip(children, [fused, *replacements]):
        setattr(parent, child, module)


def _step(node: Node) -> _Step:
    if node.op == "call_function":
        return _Step(node.op, {**_RELU_FUNCTIONS, **_MAX_POOL_FUNCTIONS}[node.target], node.args[1:], dict(node.kwargs))
    return _Step(node.op, node.target, node.args[1:], dict(node.kwargs))


def _fuse_in_graph(graph_module: GraphModule, chain: _Candidate) -> None:
    """Makes the chain's convolution node call the fused layer and removes its other nodes."""
    conv_node, *rest = chain.nodes
    steps = tuple(_step(node) for node in rest)
    if chain.bn is None:
        fused = FusedConv2dReLUMaxPool2d.from_chain(chain.conv, chain.pool, chain.names, steps)
    else:
        fused = FusedConv2dBatchNormReLUMaxPool2d.from_chain(chain.conv, chain.bn, chain.pool, chain.names, steps)
    graph_module.set_submodule(conv_node.target, fused)
    rest[-1].replace_all_uses_with(conv_node)
    for node in reversed(rest):
        graph_module.graph.erase_node(node)


def _graph_module(module: nn.Module, graph: torch.fx.Graph) -> GraphModule:
    """A GraphModule running ``graph`` that takes over ``module``'s whole state.

    ``GraphModule(module, graph)`` alone copies only what the graph calls, into bare
    containers; taking over ``module``'s dictionaries keeps every submodule (called or not),
    parameter, buffer and hook under its name, in its order and container type.
    """
    # The module's own forward stays at hand for the inputs the graph does not hold, where
    # there is one: a GraphModule given to fuse has nothing to go back to.
    has_original = not isinstance(module, GraphModule) or "_traced_from" in vars(module)
    graph_module_class = _FusedGraphModule if has_original else GraphModule
    graph_module = graph_module_class(module, graph, class_name=type(module).__name__)
    state = {key: value for key, value in vars(module).items() if key in _MODULE_STATE}
    preserved = {
        key: value
        for key, value in vars(module).items()
        if key not in _MODULE_STATE and key not in vars(graph_module) and key != "forward"
    }
    if not isinstance(module, GraphModule):  # a GraphModule's class holds no forward to go back to
        preserved["_traced_from"] = _TracedFrom(type(module), tuple(preserved))
    _set_module_state(graph_module, {**state, **preserved})
    _keep_through_copies(graph_module, type(module).__name__, preserved)
    return graph_module


@dataclasses.dataclass(frozen=True)
class _TracedFrom:
    """The class of the module a GraphModule replaced and the names of its plain attributes:
    unfuse makes an instance of that class again, as deepcopy and pickle make one."""

    cls: type
    attributes: tuple[str, ...]


def _untraced(module: nn.Module) -> nn.Module:
    """``module`` with the GraphModules fuse made in it (or as it) back in their classes."""
    for name, child in list(module._modules.items()):
        restored = child if child is None else _untraced(child)
        if restored is not child:
            setattr(module, name, restored)
    original = _as_traced_class(module) if isinstance(module, GraphModule) else None
    return module if original is None else original


def _unfuse_graph(graph_module: GraphModule) -> None:
    """Puts back the calls that fused layers in ``graph_module``'s graph replaced."""
    graph = graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        fused = graph_module.get_submodule(node.target)
        if not isinstance(fused, _FusedChainLayer) or not fused.steps:
            continue
        users = list(node.users)
        previous = node
        for step in fused.steps:
            target = _FUNCTIONS_BY_NAME[step.target] if step.op == "call_function" else step.target
            with graph.inserting_after(previous):
                previous = graph.create_node(step.op, target, (previous, *step.args), step.kwargs)
        for user in users:
            user.replace_input_with(node, previous)
        changed = True
    if changed:
        graph.lint()
        graph_module.recompile()


# --------------------------------------------------------------------------------------------
# Inputs a fused graph does not hold: the module's own forward


class _UntracedBranch(AssertionError):
    """An input takes a branch of forward that the fused graph does not hold (the message says
    which); :class:`_FusedGraphModule` answers it with the module's own forward."""


@has_side_effect  # NB: as torch._assert: dead-code elimination must keep it
def _check_branch(holds, message: str) -> None:
    """``torch._assert`` for the branch conditions of fused graphs, raising :class:`_UntracedBranch`.

    Traceable as ``torch._assert`` is: a Proxy (torch.fx tracing the graph's code again, when
    unpickling or fusing twice) records the call instead of running it.
    """
    if type(holds) is not Tensor and has_torch_function((holds,)):
        return handle_torch_function(_check_branch, (holds,), holds, message)
    if not holds:
        raise _UntracedBranch(message)


class _FusedGraphModule(GraphModule):
    """The GraphModule :func:`fuse` makes of a traced module: its graph where the input takes
    the branches the graph holds, the module's own ``forward`` everywhere else.

    Where one of the graph's branch checks fails (an input ``forward`` rejects, or a branch
    that could not be traced), the module's class's own ``forward`` runs on
    :func:`_original_view`, from the start: the caller gets the original's own exception
    (``ValueError``, not an ``AssertionError``), or its result. The buffers the graph may have
    changed before the failed check (a batch norm's running statistics, in training) are put
    back first, so that the original's forward changes them once, as it would unfused.
    """

    def recompile(self):
        python_code = super().recompile()
        cls = _graph_module_class(self)  # where recompile puts the graph's code
        cls.forward = _or_original_forward(cls.__dict__["forward"])
        # NB: in the instance's __dict__, as GraphModule keeps its graph: recompile runs again
        # whenever the graph changes (set, deep-copied, unpickled).
        self.__dict__["_buffers_before_checks"] = _buffers_before_last_check(self.graph)
        return python_code

    def __reduce__(self):
        unpickle, arguments = super().__reduce__()
        return _unpickle_fused_graph_module, (unpickle, arguments)


def _or_original_forward(graph_forward):
    """``forward`` running the graph's code, or where a branch check fails, the traced class's
    own ``forward`` on :func:`_original_view`."""

    # NB: wraps keeps the graph's signature where torch.fx and torch.export read it.
    @functools.wraps(graph_forward)
    def forward(self, *args, **kwargs):
        saved = [(buffer, buffer.clone()) for buffer in _named_buffers(self, self._buffers_before_checks)]
        try:
            return graph_forward(self, *args, **kwargs)
        except _UntracedBranch:
            pass
        # Outside the except clause, so that the original's own exception is not shown as
        # raised while handling the check's.
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        return self._traced_from.cls.forward(_original_view(self), *args, **kwargs)

    return forward


def _buffers_before_last_check(graph: torch.fx.Graph) -> tuple[str, ...]:
    """The qualified names of the modules and attributes that ``graph`` calls or reads before
    its last branch check: the buffers among them are all it can change before a check fails.
    Empty for the usual graph, whose checks (on the input) come first."""
    nodes = list(graph.nodes)
    checks = [index for index, node in enumerate(nodes) if node.op == "call_function" and node.target is _check_branch]
    if not checks:
        return ()
    return tuple(dict.fromkeys(node.target for node in nodes[: checks[-1]] if node.op in ("call_module", "get_attr")))


def _named_buffers(module: nn.Module, names: tuple[str, ...]) -> list[Tensor]:
    """The buffers of (or named by) each of ``names`` in ``module``, each once."""
    found = {}
    for name in names:
        try:
            called = module.get_submodule(name)
        except AttributeError:  # a get_attr: a buffer, a parameter or a constant
            try:
                buffer = module.get_buffer(name)
            except AttributeError:
                continue
            found[id(buffer)] = buffer
            continue
        found.update((id(buffer), buffer) for buffer in called.buffers())
        if isinstance(called, FusedConv2dBatchNormReLUMaxPool2d):  # its batch norm is not a child
            found.update((id(buffer), buffer) for buffer in called.bn.buffers())
    return list(found.values())


def _unpickle_fused_graph_module(unpickle, arguments) -> _FusedGraphModule:
    return _with_original_forward(unpickle(*arguments))


def _with_original_forward(graph_module: GraphModule) -> _FusedGraphModule:
    """A :class:`_FusedGraphModule` taking over ``graph_module``'s state and graph."""
    fused = _FusedGraphModule.__new__(_FusedGraphModule)
    _set_module_state(fused, vars(graph_module))
    _rename_graph_module(type(graph_module).__name__, fused)
    fused.graph = graph_module.graph  # takes the graph over and compiles it
    return fused


def _as_traced_class(graph_module: GraphModule) -> nn.Module | None:
    """An instance of the class ``graph_module`` was traced from, over ``graph_module``'s own
    state (the same dictionaries of parameters, buffers, modules and hooks); None for a
    GraphModule that fuse was given."""
    traced_from = vars(graph_module).get("_traced_from")
    if traced_from is None:
        return None
    original = traced_from.cls.__new__(traced_from.cls)
    state = vars(graph_module)
    _set_module_state(original, {key: state[key] for key in (*_MODULE_STATE, *traced_from.attributes) if key in state})
    return original


def _original_view(graph_module: _FusedGraphModule) -> nn.Module:
    """What ``graph_module`` was before fusing, sharing every tensor and module with it: an
    instance of the traced class whose graph-fused layers are ``nn.Conv2d`` again.

    The modules on the way to those layers are shallow copies, so ``graph_module`` itself is
    left as it is; the batch norms, ReLUs and pools of its chains are where they always were.
    """
    view = _as_traced_class(graph_module)
    _set_module_state(view, {"_modules": dict(view._modules)})
    copies = {id(view)}
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        layer = graph_module.get_submodule(node.target)
        if not isinstance(layer, _FusedChainLayer) or not layer.steps:
            continue
        *path, name = node.target.split(".")
        owner = view
        for part in path:
            child = owner._modules[part]
            if id(child) not in copies:
                child = _shallow_copy(child)
                _set_module_state(child, {"_modules": dict(child._modules)})
                copies.add(id(child))
                owner._modules[part] = child
            owner = child
        owner._modules[name] = layer.to_conv2d()
    return view


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A second ``module`` object with the same attributes (not GraphModule's ``__copy__``,
    which rebuilds a GraphModule from what its graph uses)."""
    copied = object.__new__(type(module))
    _set_module_state(copied, vars(module))
    return copied


# --------------------------------------------------------------------------------------------
# Tracing


class _Untraceable(Exception):
    """torch.fx cannot give one graph for a module's forward; the message says why."""


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with cifarnet's layers as leaves, which follows a plan at branches.

    At the i-th branch on a traced value (``if input.dim() != 4:``) it takes ``plan[i]``
    (False past the plan's end), records where the branch is and what it took, and puts a
    :func:`_check_branch` of the condition's value in the graph.
    """

    # NB: plan has a default because torch.fx unpickles a GraphModule by tracing its code again
    # with (a subclass of) the graph's tracer class, made without arguments.
    def __init__(self, plan: tuple[bool, ...] = ()) -> None:
        super().__init__()
        self.plan = plan
        self.taken: list[bool] = []
        self.branches: list[str] = []

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return _is_leaf(module)

    def to_bool(self, condition: torch.fx.Proxy) -> bool:
        value = self.plan[len(self.taken)] if len(self.taken) < len(self.plan) else False
        where = _caller_source()
        earlier = sum(branch.startswith(where) for branch in self.branches)
        if earlier:  # `if a or b:` branches twice on one line
            where = f"{where} (condition {earlier + 1})"
        self.taken.append(value)
        self.branches.append(f"{where} is {value}")
        holds = self.create_proxy("call_function", operator.eq, (condition, value), {})
        message = (
            f"{type(self.root).__name__}.forward as fused by cifarnet.fuse needs {where} to be {value}; "
            "the original forward raises (or could not be traced) otherwise"
        )
        self.create_proxy("call_function", _check_branch, (holds, message), {})
        return value


def _caller_source() -> str:
    """``file:line (source)`` of the innermost frame outside torch.fx and this file."""
    fx_directory = os.path.dirname(torch.fx.__file__)
    frame = inspect.currentframe()
    while frame is not None and (frame.f_code.co_filename.startswith(fx_directory) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "a branch"
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} `{line}`"


def _describe(error: Exception) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:200]}"


def _trace_branches(module: nn.Module) -> tuple[torch.fx.Graph, list[str]]:
    """The one graph of ``module.forward`` in its current mode, and the branches it assumes.

    Tries every way through forward's branches on traced values, depth first; exactly one
    must trace to the end.
    """
    plans: list[tuple[bool, ...]] = [()]
    complete, failures = [], []
    for _ in range(_MAX_TRACES):
        if not plans:
            break
        plan = plans.pop()
        tracer = _Tracer(plan)
        try:
            graph = tracer.trace(module)
        except Exception as error:  # this way raises, or cannot be traced: either rules it out
            failures.append(error)
        else:
            complete.append((tracer.taken, graph, tracer.branches))
        # The branches past the plan took False: their True side is still to be tried.
        plans += [tuple(tracer.taken[:index]) + (True,) for index in range(len(plan), len(tracer.taken))]
    else:
        if plans:
            raise _Untraceable(f"forward branches on traced values more than {_MAX_TRACES} ways")
    if not complete:
        raise _Untraceable(_describe(failures[0]))
    if len(complete) > 1:
        (first, _, branches), (second, _, _) = complete[:2]
        index = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        where = branches[index].rsplit(" is ", 1)[0]
        raise _Untraceable(f"forward takes either branch at {where} depending on the input")
    _, graph, branches = complete[0]
    return graph, branches


def _trace(module: nn.Module) -> tuple[torch.fx.Graph, list[str]]:
    """The graph of ``module.forward``, which must not depend on train/eval mode nor change a
    buffer outside the graph (a fused model would silently differ), and its kept checks."""
    modes = {submodule: submodule.training for submodule in module.modules()}
    # (owner's name, owner, name, tensor, version, copy) of every buffer: tracing runs forward's Python code,
    # and what it does to a buffer is undone and makes the module untraceable.
    buffers = [
        (owner_name, owner, name, buffer, _tensor_version(buffer), buffer.clone())
        for owner_name, owner in module.named_modules()
        for name, buffer in owner._buffers.items()
        if buffer is not None
    ]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracing's own warnings say nothing to the user
            traced = []
            for training in (True, False):
                module.train(training)
                traced.append(_trace_branches(module))
    finally:
        for submodule, training in modes.items():
            submodule.training = training
        changed = []
        for owner_name, owner, name, buffer, version, saved in buffers:
            if owner._buffers.get(name) is not buffer or _tensor_version(buffer) != version:
                changed.append(_qualified(owner_name, name))
                owner._buffers[name] = buffer
                with torch.no_grad():
                    buffer.copy_(saved)
    if changed:
        raise _Untraceable(f"forward changes the buffer {changed[0]} outside the traced graph")
    (train_graph, checks), (eval_graph, _) = traced
    if train_graph.python_code("self").src != eval_graph.python_code("self").src:
        raise _Untraceable("forward takes different branches in training and in evaluation mode")
    _resolve_string_annotations(train_graph, type(module).forward)
    return train_graph, checks


def _resolve_string_annotations(graph: torch.fx.Graph, forward) -> None:
    """Gives the graph's input and output the types ``forward``'s annotations name, where they
    are strings (``from __future__ import annotations``), or none where they do not resolve.

    torch.fx keeps such annotations as strings, and torch 2.11 cannot pickle the GraphModule
    then (``AttributeError: 'str' object has no attribute '__name__'``; 2.14 can).
    """
    try:
        hints = typing.get_type_hints(forward)
    except Exception:  # a name the annotation's module does not define, or not a function
        hints = {}
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = hints.get("return" if node.op == "output" else node.target)
