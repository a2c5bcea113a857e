"""Tracing a module's ``forward`` with ``torch.fx`` for :func:`cifarnet.fuse`: one graph for
training and evaluation (or, where forward branches on the mode, for the module's own mode),
every way through its branches on traced values tried, buffers left as they were."""

from __future__ import annotations

import inspect
import linecache
import operator
import os
import typing
import warnings

import torch
import torch.fx
from torch import nn

from cifarnet.fuse._torch_internals import _has_hooks, _tensor_version
from cifarnet.fuse.graph_module import _MODULE_STATE, _check_branch
from cifarnet.fuse.patterns import _is_leaf, _qualified


# Ways through forward's branches tried per mode before giving up on tracing a module.
_MAX_TRACES = 16


class _Untraceable(Exception):
    """torch.fx cannot give one graph for a module's forward; the message says why."""


class _Proxy(torch.fx.Proxy):
    """torch.fx's Proxy, recording augmented assignment as what it is: ``out += identity`` is
    ``operator.iadd`` in the graph, as in the module's code. torch.fx's own Proxy has no
    in-place operators, so Python falls back to ``out = out + identity``: a fused ResNet's every
    block then allocates a fresh activation for the sum (page faults where malloc returns freed
    memory), where the original adds into its batch norm's output."""


def _record_in_place(name: str):
    operation = getattr(operator, name)

    def in_place(self: _Proxy, other):
        return self.tracer.create_proxy("call_function", operation, (self, other), {})

    in_place.__name__ = f"__{name}__"
    return in_place


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
              "iand", "ior", "ixor", "ilshift", "irshift"):
    setattr(_Proxy, f"__{_name}__", _record_in_place(_name))


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with cifarnet's layers and hooked modules as leaves, which follows a
    plan at branches and records the modules it traces into.

    At the i-th branch on a traced value (``if input.dim() != 4:``) it takes ``plan[i]``
    (False past the plan's end), records where the branch is and what it took, and puts a
    :func:`_check_branch` of the condition's value in the graph.

    A module with hooks stays a call in the graph, so that its hooks run at every call (traced
    into, they would run once, on tracing's proxies). A forward that switches grad mode or
    autocast (``with torch.no_grad():``) raises :class:`_ModeSwitch`: the graph would not
    record the switch.
    """

    # NB: plan has a default because torch.fx unpickles a GraphModule by tracing its code again
    # with (a subclass of) the graph's tracer class, made without arguments.
    def __init__(self, plan: tuple[bool, ...] = ()) -> None:
        super().__init__()
        self.plan = plan
        self.taken: list[bool] = []
        self.branches: list[str] = []
        self.traced_into: list[str] = []  # the modules whose forward became part of the graph
        self.modes = _grad_and_autocast_modes()

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return _is_leaf(module) or _has_hooks(module)

    def call_module(self, module: nn.Module, forward, args, kwargs):
        if not self.is_leaf_module(module, ""):
            self.traced_into.append(self.path_of_module(module))
        return super().call_module(module, forward, args, kwargs)

    def create_node(self, *args, **kwargs) -> torch.fx.Node:
        if _grad_and_autocast_modes() != self.modes:
            raise _ModeSwitch(
                "forward switches grad mode or autocast (torch.no_grad, torch.autocast, ...), "
                "which a torch.fx graph does not record"
            )
        return super().create_node(*args, **kwargs)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)

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


class _ModeSwitch(Exception):
    """Tracing met an operation run in another grad mode or autocast state than forward's start."""


def _grad_and_autocast_modes() -> tuple:
    """What ``torch.no_grad``, ``torch.inference_mode`` and ``torch.autocast`` set."""
    autocast = tuple(
        (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")
    )
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast


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


def _trace_branches(module: nn.Module) -> tuple[torch.fx.Graph, list[str], list[str]]:
    """The one graph of ``module.forward`` in its current mode, the branches it assumes and
    the modules traced into.

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
        except _ModeSwitch as error:  # on any way through forward: no graph can hold it
            raise _Untraceable(str(error)) from None
        except Exception as error:  # this way raises, or cannot be traced: either rules it out
            failures.append(error)
        else:
            complete.append((tracer.taken, graph, tracer.branches, tracer.traced_into))
        # The branches past the plan took False: their True side is still to be tried.
        plans += [tuple(tracer.taken[:index]) + (True,) for index in range(len(plan), len(tracer.taken))]
    else:
        if plans:
            raise _Untraceable(f"forward branches on traced values more than {_MAX_TRACES} ways")
    if not complete:
        raise _Untraceable(_describe(failures[0]))
    if len(complete) > 1:
        (first, _, branches, _), (second, _, _, _) = complete[:2]
        index = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        where = branches[index].rsplit(" is ", 1)[0]
        raise _Untraceable(f"forward takes either branch at {where} depending on the input")
    _, graph, branches, traced_into = complete[0]
    return graph, branches, traced_into


class _Traced(typing.NamedTuple):
    graph: torch.fx.Graph
    checks: list[str]  # the branch conditions the graph assumes
    mode: bool | None  # the train/eval mode the graph holds (True: training); None: both
    traced_into: tuple[str, ...]  # the submodules whose forward is part of the graph


def _trace(module: nn.Module) -> _Traced:
    """The graph of ``module.forward``, which must not change a buffer or a plain attribute of
    a module outside the graph (a fused model would silently differ), its kept checks, the mode
    it holds and the submodules traced into.

    ``forward`` is traced in training and in evaluation mode. Where the two graphs differ (a
    branch on ``self.training``: auxiliary outputs, stochastic depth), the graph of the mode
    ``module`` is in is kept, and that mode (True: training) is returned; None where one graph
    holds both. A module fused so before is traced in the mode its graph holds, whatever mode
    it is in (its own forward, in the other, cannot be traced)."""
    modes = {submodule: submodule.training for submodule in module.modules()}
    held = getattr(vars(module).get("_traced_from"), "mode", None)
    # (owner's name, owner, name, tensor, version, copy) of every buffer: tracing runs forward's Python code,
    # and what it does to a buffer is undone and makes the module untraceable.
    buffers = [
        (owner_name, owner, name, buffer, _tensor_version(buffer), buffer.clone())
        for owner_name, owner in module.named_modules()
        for name, buffer in owner._buffers.items()
        if buffer is not None
    ]
    # Likewise what it assigns to a plain attribute (a call counter, a cached value); what a
    # train() of the module's own sets is put back too, but is no reason to give up.
    before_train = _attribute_values(module)
    changed = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracing's own warnings say nothing to the user
            traced = {}
            for training in (True, False) if held is None else (held,):
                module.train(training)
                before_forward = _attribute_values(module)
                traced[training] = _trace_branches(module)
                changed += _restore_attributes(before_forward)
    finally:
        for submodule, training in modes.items():
            submodule.training = training
        _restore_attributes(before_train)
        changed_buffers = []
        for owner_name, owner, name, buffer, version, saved in buffers:
            if owner._buffers.get(name) is not buffer or _tensor_version(buffer) != version:
                changed_buffers.append(f"buffer {_qualified(owner_name, name)}")
                owner._buffers[name] = buffer
                with torch.no_grad():
                    buffer.copy_(saved)
        changed[:0] = changed_buffers
    if changed:
        raise _Untraceable(f"forward changes the {changed[0]} outside the traced graph")
    if held is not None:
        mode = held
    elif traced[True][0].python_code("self").src != traced[False][0].python_code("self").src:
        mode = modes[module]
    else:
        mode = None
    graph, checks, traced_into = traced[True if mode is None else mode]
    _resolve_string_annotations(graph, type(module).forward)
    return _Traced(graph, checks, mode, tuple(dict.fromkeys(traced_into)))


def _attribute_values(module: nn.Module) -> list[tuple[str, nn.Module, dict]]:
    """(name, submodule, its attributes other than nn.Module's own state: parameters, buffers,
    children, hooks, mode) of ``module`` and every submodule."""
    return [(name, owner, _plain_attributes(owner)) for name, owner in module.named_modules()]


def _plain_attributes(module: nn.Module) -> dict:
    """``module``'s attributes other than nn.Module's own state."""
    return {name: value for name, value in vars(module).items() if name not in _MODULE_STATE}


def _restore_attributes(saved: list[tuple[str, nn.Module, dict]]) -> list[str]:
    """Puts back the attributes :func:`_attribute_values` saved; the qualified names of those
    that had changed (assigned, added or deleted)."""
    changed = []
    for owner_name, owner, values in saved:
        now = _plain_attributes(owner)
        for key in sorted(now.keys() | values.keys()):
            if key in values and key in now and now[key] is values[key]:
                continue
            changed.append(f"attribute {_qualified(owner_name, key)}")
            if key in values:
                owner.__dict__[key] = values[key]
            else:
                del owner.__dict__[key]
    return changed


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
