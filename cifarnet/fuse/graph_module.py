"""The GraphModule :func:`cifarnet.fuse` makes of a traced module: it takes over the module's
whole state, and runs the module's own ``forward`` for the inputs its graph does not hold
(a branch check fails)."""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.fx.node import has_side_effect
from torch.overrides import handle_torch_function, has_torch_function

from cifarnet.fuse._torch_internals import (
    _graph_module_class,
    _has_hooks,
    _keep_through_copies,
    _rename_graph_module,
    _set_module_state,
    _with_hooks_of,
)
from cifarnet.fuse.layers import _BatchNormByReference, _FusedChainLayer


# What nn.Module.__init__ sets: the GraphModule takes these over from the traced module.
_MODULE_STATE = frozenset(vars(nn.Module()))


def _graph_module(
    module: nn.Module, graph: torch.fx.Graph, mode: bool | None = None, traced_into: tuple[str, ...] = ()
) -> GraphModule:
    """A GraphModule running ``graph`` that takes over ``module``'s whole state; ``graph`` holds
    ``module.forward`` in training (``mode`` True) or evaluation mode only, or either (None),
    with the forwards of the submodules named by ``traced_into`` in it.

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
    traced_modules = tuple(module.get_submodule(name) for name in traced_into)
    if not isinstance(module, GraphModule):  # a GraphModule's class holds no forward to go back to
        preserved["_traced_from"] = _TracedFrom(type(module), tuple(preserved), mode, traced_into, traced_modules)
    elif mode is not None and "_traced_from" in preserved:
        # a fused GraphModule traced again: its graph now holds this mode
        preserved["_traced_from"] = dataclasses.replace(
            preserved["_traced_from"], mode=mode, traced_into=traced_into, traced_modules=traced_modules
        )
    _set_module_state(graph_module, {**state, **preserved})
    _keep_through_copies(graph_module, type(module).__name__, preserved)
    return graph_module


@dataclasses.dataclass(frozen=True)
class _TracedFrom:
    """The class of the module a GraphModule replaced and the names of its plain attributes:
    unfuse makes an instance of that class again, as deepcopy and pickle make one. ``mode``:
    the one train/eval mode the graph holds where forward branches on it (None: both);
    ``traced_into``: the submodules whose forward the graph holds (in that mode too), and
    ``traced_modules`` those modules, as fuse found them."""

    cls: type
    attributes: tuple[str, ...]
    mode: bool | None = None
    traced_into: tuple[str, ...] = ()
    traced_modules: tuple[nn.Module, ...] = ()

    def holds_modes_of(self, module: nn.Module) -> bool:
        """Whether the graph holds ``module``'s forward in the train/eval modes its modules are
        in now: where it holds one mode, the module and the submodules traced into are in it
        (and are still there)."""
        if self.mode is None:
            return True
        submodules = (_submodule_or_none(module, name) for name in self.traced_into)
        return module.training == self.mode and all(
            submodule is not None and submodule.training == self.mode for submodule in submodules
        )

    def traced_modules_changed(self, module: nn.Module) -> bool:
        """Whether a module the graph traced into was replaced or has hooks since (which the
        graph, holding its forward's code, would not call)."""
        return any(
            _submodule_or_none(module, name) is not traced or _has_hooks(traced)
            for name, traced in zip(self.traced_into, self.traced_modules)
        )


def _submodule_or_none(module: nn.Module, name: str) -> nn.Module | None:
    """``module.get_submodule(name)``, or None where there is none (replaced or deleted since).

    NB: walks the children's dictionaries itself: get_submodule took 10 us a name, which the
    checks of every call would have paid some 40 times for a ResNet-18."""
    for part in name.split(".") if name else ():
        module = module._modules.get(part)
        if module is None:
            return None
    return module


def _fused_layers(graph_module: GraphModule) -> tuple[tuple[str, _FusedChainLayer], ...]:
    """``(path, layer)`` of each fused layer that ``graph_module``'s graph calls."""
    targets = dict.fromkeys(node.target for node in graph_module.graph.nodes if node.op == "call_module")
    layers = ((target, _submodule_or_none(graph_module, target)) for target in targets)
    return tuple((target, layer) for target, layer in layers if isinstance(layer, _FusedChainLayer))


def _changed_since_fusing(graph_module: _FusedGraphModule) -> bool:
    """Whether the graph no longer computes what the module's own forward would: a module it
    traced into, a fused layer or a module of a fused chain was replaced or has hooks since
    fusing (fuse leaves hooked modules unfused, so these hooks came after it). A hook on a
    fused layer expects the convolution's output, not the chain's."""
    if graph_module._traced_from.traced_modules_changed(graph_module):
        return True
    for target, layer in graph_module._fused_layers:
        if _submodule_or_none(graph_module, target) is not layer or _has_hooks(layer):
            return True
        for name, member in getattr(layer, "_members", ()):  # not recorded in models pickled before
            if _submodule_or_none(graph_module, name) is not member or _has_hooks(member):
                return True
    return False


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

    def train(self, mode: bool = True):
        """``nn.Module.train``, or where the traced class has its own (one that keeps a batch
        norm frozen, say), that one, on :func:`_as_traced_class` of this module's state."""
        traced_from = vars(self).get("_traced_from")
        if traced_from is None or traced_from.cls.train is nn.Module.train:
            return super().train(mode)
        view = _as_traced_class(self)
        traced_from.cls.train(view, mode)
        _set_module_state(self, vars(view))  # its mode and any attribute train() set
        return self

    def recompile(self):
        python_code = super().recompile()
        cls = _graph_module_class(self)  # where recompile puts the graph's code
        cls.forward = _or_original_forward(cls.__dict__["forward"])
        # NB: in the instance's __dict__, as GraphModule keeps its graph: recompile runs again
        # whenever the graph changes (set, deep-copied, unpickled).
        self.__dict__["_buffers_before_checks"] = _buffers_before_last_check(self.graph)
        self.__dict__["_fused_layers"] = _fused_layers(self)
        return python_code

    def __reduce__(self):
        unpickle, arguments = super().__reduce__()
        return _unpickle_fused_graph_module, (unpickle, arguments)


def _or_original_forward(graph_forward):
    """``forward`` running the graph's code, or where a branch check fails, the module is in
    the train/eval mode the graph does not hold or its modules changed since fusing, the traced
    class's own ``forward`` on :func:`_original_view`."""

    # NB: wraps keeps the graph's signature where torch.fx and torch.export read it.
    @functools.wraps(graph_forward)
    def forward(self, *args, **kwargs):
        traced_from = self._traced_from
        if not traced_from.holds_modes_of(self) or _changed_since_fusing(self):
            return traced_from.cls.forward(_original_view(self), *args, **kwargs)
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
        return traced_from.cls.forward(_original_view(self), *args, **kwargs)

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
        if isinstance(called, _BatchNormByReference):  # its batch norm is not a child
            found.update((id(buffer), buffer) for buffer in called.bn.buffers())
    return list(found.values())


def _unpickle_fused_graph_module(unpickle, arguments) -> _FusedGraphModule:
    return _with_original_forward(unpickle(*arguments))


def _with_original_forward(graph_module: GraphModule) -> _FusedGraphModule:
    """A :class:`_FusedGraphModule` taking over ``graph_module``'s state and graph (an unpickled
    one: its class name and plain attributes kept through copies again, as when it was made)."""
    fused = _FusedGraphModule.__new__(_FusedGraphModule)
    _set_module_state(fused, vars(graph_module))
    class_name = type(graph_module).__name__
    _rename_graph_module(class_name, fused)
    fused.graph = graph_module.graph  # takes the graph over and compiles it
    # NB: pickle keeps the attributes but not GraphModule.meta nor the deepcopy hooks, so a
    # deepcopy (unfuse makes one) would drop the class name and _traced_from.
    traced_from = vars(fused).get("_traced_from")
    if traced_from is not None:
        preserved = {name: vars(fused)[name] for name in (*traced_from.attributes, "_traced_from") if name in vars(fused)}
        _keep_through_copies(fused, class_name, preserved)
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
    left as it is; the batch norms, ReLUs and pools of its chains are where they always were
    (or whatever replaced them), and the convolutions hold the fused layers' hooks.
    """
    view = _as_traced_class(graph_module)
    _set_module_state(view, {"_modules": dict(view._modules)})
    copies = {id(view)}
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        layer = _submodule_or_none(graph_module, node.target)  # None: its parent was replaced
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
        owner._modules[name] = _with_hooks_of(layer, layer.to_conv2d())
    return view


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A second ``module`` object with the same attributes (not GraphModule's ``__copy__``,
    which rebuilds a GraphModule from what its graph uses)."""
    copied = object.__new__(type(module))
    _set_module_state(copied, vars(module))
    return copied
