"""Fusing: :func:`fuse` rewrites each module's chains by position (in an ``nn.Sequential``) or
in its traced graph."""

from __future__ import annotations

import collections
import copy
import dataclasses
import warnings

from torch import nn
from torch.fx import GraphModule, Node

from cifarnet.fuse.graph_module import _graph_module
from cifarnet.fuse.layers import (
    FusedBatchNorm2d,
    FusedBatchNormReLUConv2d,
    FusedConv2dBatchNormReLUMaxPool2d,
    FusedConv2dReLUMaxPool2d,
    FusedIdentity,
    _Step,
)
from cifarnet.fuse.patterns import (
    _MAX_POOL_FUNCTIONS,
    _RELU_FUNCTIONS,
    _Candidate,
    _graph_chains,
    _is_leaf,
    _is_plain_sequential,
    _qualified,
    _sequential_chains,
    _sequential_positions,
)
from cifarnet.fuse.report import FusionReport
from cifarnet.fuse.tracing import _trace, _Untraceable


def fuse(model: nn.Module, *, inplace: bool = False, report: bool = False, bn_relu_conv: bool = True):
    """Computes every conv -> [batch norm ->] ReLU -> max-pool chain of ``model`` with one fused
    op, and every batch norm -> ReLU -> conv chain (a ResNet block's, a DenseNet layer's) with
    another.

    The chains may be ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU`` and ``nn.MaxPool2d``
    children of ``nn.Sequential`` containers at any depth, or calls in ``forward``: conv and
    batch-norm modules with ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu`` (in place
    or not) and ``nn.MaxPool2d``, ``F.max_pool2d``, ``torch.max_pool2d``. A pool chain's fused
    layer keeps the pooled output and its argmax for the backward, not the convolution's output;
    a batch norm -> ReLU -> conv layer (:class:`cifarnet.nn.BatchNormReLUConv2d`) keeps the
    batch norm's input, not the rectified tensor, which its backward recomputes. A convolution
    that heads a pool chain fuses with its pool. The result computes the
    same function with the same parameters, buffers, train/eval modes, device and dtype, and has
    the same ``state_dict`` keys; see :mod:`cifarnet.fuse` for how. Synchronized batch norms
    (``nn.SyncBatchNorm``, :class:`cifarnet.nn.SyncBatchNorm2d`: models converted by either
    ``convert_sync_batchnorm``) give fused layers that synchronize over the same group.

    Args:
        model: the model; modules are rewritten in place on a deep copy unless ``inplace``.
        inplace: rewrite ``model``'s modules themselves instead of a deep copy's. Use the
            returned module: where ``model`` itself is traced, a new GraphModule runs its
            (rewritten) modules, and ``model`` no longer computes what it did.
        report: also return a :class:`FusionReport`.
        bn_relu_conv: also fuse batch norm -> ReLU -> conv chains (``False``: pool chains only).

    Returns:
        The fused model: ``model`` (or its copy) with its positions rewritten, or a
        ``torch.fx.GraphModule`` named after ``model``'s class where chains had to be
        rewritten in the graph of ``forward``; with ``report=True``, ``(model, report)``.

    Warns:
        UserWarning naming each module ``torch.fx`` could not trace (inside which only
        ``nn.Sequential`` children are rewritten), with the reason.

    The fused ops run on the CPU and on CUDA, in float32, float64, bfloat16 and float16.
    A GraphModule's forward is its graph: call it, not the custom submodules whose code was
    traced into it (their convolutions now also normalise, rectify and pool).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    fusing = _Fusing(FusionReport(), bn_relu_conv, _parents(model))
    fused = _fuse_module(model, "", fusing)
    fusion = fusing.report
    for name, why in fusion.untraced.items():
        where = "the model" if not name else repr(name)
        warnings.warn(
            f"cifarnet.fuse: cannot trace {where} with torch.fx ({why}); fused only the chains of the "
            "nn.Sequential containers and traceable submodules inside it",
            stacklevel=2,
        )
    return (fused, fusion) if report else fused


@dataclasses.dataclass
class _Fusing:
    """What one :func:`fuse` call knows as it goes through the model."""

    report: FusionReport
    bn_relu_conv: bool
    parents: collections.Counter  # id(module): how many modules hold it as a child
    # id(module): (module, what fusing made of it): a module held twice is fused once
    done: dict[int, tuple[nn.Module, nn.Module]] = dataclasses.field(default_factory=dict)


def _parents(model: nn.Module) -> collections.Counter:
    return collections.Counter(
        id(child) for parent in model.modules() for child in parent._modules.values() if child is not None
    )


def _fuse_module(module: nn.Module, name: str, fusing: _Fusing) -> nn.Module:
    """``module`` with its chains fused: the same object, or a GraphModule replacing it; a
    module reached again under another name gets what it got the first time."""
    module_and_fused = fusing.done.get(id(module))
    if module_and_fused is not None and module_and_fused[0] is module:
        return module_and_fused[1]
    fused = _fuse_module_once(module, name, fusing)
    fusing.done[id(module)] = (module, fused)
    return fused


def _fuse_module_once(module: nn.Module, name: str, fusing: _Fusing) -> nn.Module:
    report = fusing.report
    if type(module).forward is nn.Module.forward:  # a container that is not called: ModuleList, ...
        _fuse_children(module, name, fusing)
        return module
    if _is_leaf(module):
        return module
    try:
        traced = _trace(module)
    except _Untraceable as error:
        report.untraced[name] = str(error)
        if _is_plain_sequential(module):
            _fuse_sequential(module, name, fusing)
        _fuse_children(module, name, fusing)
        return module
    graph, checks, mode = traced.graph, traced.checks, traced.mode
    chains = _graph_chains(graph, module, name, fusing.bn_relu_conv)
    for chain in chains:
        chain.reason = chain.reason or _shared_module(chain, fusing)
    report.unfused += [chain.reported() for chain in chains if chain.reason is not None]
    fusable = [chain for chain in chains if chain.reason is None]
    report.fused += [chain.reported() for chain in fusable]
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    positions = [_sequential_positions(module, chain, calls) for chain in fusable]
    if all(position is not None for position in positions):
        for (parent, children), chain in zip(positions, fusable):
            _fuse_positions(module.get_submodule(parent), children, chain)
        _fuse_called_modules(module, graph, name, fusing)
        return module
    graph_module = _graph_module(module, graph, mode, traced.traced_into)
    for chain in fusable:
        _fuse_in_graph(graph_module, chain)
    graph_module.graph.lint()
    graph_module.recompile()
    _fuse_called_modules(graph_module, graph_module.graph, name, fusing)
    if mode is not None:
        checks = [f"forward branches on the mode: the graph holds {_MODE_NAMES[mode]} mode; in {_MODE_NAMES[not mode]} "
                  "mode the module's own forward runs, unfused", *checks]
    report.checks += [f"{name or type(module).__name__}: {check}" for check in checks]
    return graph_module


_MODE_NAMES = {True: "training", False: "evaluation"}


def _fuse_called_modules(module: nn.Module, graph, name: str, fusing: _Fusing) -> None:
    """Fuses inside the modules ``graph`` calls rather than traces into (those with hooks)."""
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        called = module.get_submodule(node.target)
        if _is_leaf(called):
            continue
        fused = _fuse_module(called, _qualified(name, node.target), fusing)
        if fused is not called:
            module.set_submodule(node.target, fused)


def _fuse_children(module: nn.Module, name: str, fusing: _Fusing) -> None:
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        fused = _fuse_module(child, _qualified(name, child_name), fusing)
        if fused is not child:
            setattr(module, child_name, fused)


def _fuse_sequential(sequential: nn.Sequential, name: str, fusing: _Fusing) -> None:
    """Fuses the chains of consecutive children of an untraced ``nn.Sequential`` by position,
    taking ``nn.Sequential.forward``'s word that each output only feeds the next child."""
    for children, chain in _sequential_chains(sequential, name, fusing.bn_relu_conv):
        chain.reason = chain.reason or _shared_module(chain, fusing)
        if chain.reason is None:
            _fuse_positions(sequential, children, chain)
            fusing.report.fused.append(chain.reported())
        else:
            fusing.report.unfused.append(chain.reported())


def _shared_module(chain: _Candidate, fusing: _Fusing) -> str | None:
    """Why ``chain`` is left: its convolution or batch norm is also a child of another module,
    which would keep the original beside the fused layer (a batch norm rewritten by position
    would part from it at the first ``.to()``); None where neither is."""
    conv_name, bn_name = (chain.names[-1], chain.names[0]) if chain.bn_relu_conv else chain.names[:2]
    for name, module in ((conv_name, chain.conv), (bn_name, chain.bn)):
        if module is not None and fusing.parents[id(module)] > 1:
            return f"{name} is shared: a child of {fusing.parents[id(module)]} modules"
    return None


def _fuse_positions(parent: nn.Module, children: list[str], chain: _Candidate) -> None:
    """Rewrites a chain of consecutive children of a plain nn.Sequential by position."""
    if chain.bn_relu_conv:
        conv_name = chain.names[-1]
        fused_bn = FusedBatchNorm2d.from_batch_norm(chain.bn, conv_name)
        fused = FusedBatchNormReLUConv2d.from_chain(fused_bn, chain.conv, chain.names)
        for child, module in zip(children, [fused_bn, FusedIdentity(chain.relu, conv_name), fused]):
            setattr(parent, child, module)
        return
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
    called = ((node.target, graph_module.get_submodule(node.target)) for node in chain.nodes if node.op == "call_module")
    members = tuple((target, module) for target, module in called if module is not chain.conv)
    if chain.bn_relu_conv:
        bn_node, relu_node, conv_node = chain.nodes
        steps = (_step(bn_node), _step(relu_node))
        fused = FusedBatchNormReLUConv2d.from_chain(chain.bn, chain.conv, chain.names, steps, members)
        graph_module.set_submodule(conv_node.target, fused)
        conv_node.update_arg(0, bn_node.args[0])  # read now: an earlier rewrite may have replaced it
        graph_module.graph.erase_node(relu_node)
        graph_module.graph.erase_node(bn_node)
        return
    conv_node, *rest = chain.nodes
    steps = tuple(_step(node) for node in rest)
    if chain.bn is None:
        fused = FusedConv2dReLUMaxPool2d.from_chain(chain.conv, chain.pool, chain.names, steps, members)
    else:
        fused = FusedConv2dBatchNormReLUMaxPool2d.from_chain(chain.conv, chain.bn, chain.pool, chain.names, steps, members)
    graph_module.set_submodule(conv_node.target, fused)
    rest[-1].replace_all_uses_with(conv_node)
    for node in reversed(rest):
        graph_module.graph.erase_node(node)
