"""Finding chains: the conv -> [batch norm ->] ReLU -> max-pool and batch norm -> ReLU -> conv
chains of a traced graph or of an ``nn.Sequential``'s children, and whether the fused ops can
compute each."""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

import cifarnet.nn as cnn
from cifarnet.fuse import layers as fused_layers
from cifarnet.fuse._torch_internals import _has_hooks
from cifarnet.fuse.report import Chain
from cifarnet.nn import (
    BATCH_NORMS_2D,
    BatchNorm2d,
    SyncBatchNorm2d,
    bn_relu_conv_unfusable_reason,
    conv_bn_relu_pool_unfusable_reason,
    conv_relu_pool_unfusable_reason,
)


# The functions a chain's ReLU and pool may be written with in forward, by the name unfuse
# calls them again with (F.max_pool2d itself cannot be pickled inside a fused layer).
_RELU_FUNCTIONS = {F.relu: "torch.nn.functional.relu", torch.relu: "torch.relu", torch.relu_: "torch.relu_"}
_RELU_METHODS = ("relu", "relu_")
_MAX_POOL_FUNCTIONS = {
    F.max_pool2d: "torch.nn.functional.max_pool2d",
    # What F.max_pool2d(..., return_indices=True) records; it returns indices however called.
    F.max_pool2d_with_indices: "torch.nn.functional.max_pool2d_with_indices",
    torch.max_pool2d: "torch.max_pool2d",
}
_FUNCTIONS_BY_NAME = {name: function for table in (_RELU_FUNCTIONS, _MAX_POOL_FUNCTIONS) for function, name in table.items()}
# F.max_pool2d's and torch.max_pool2d's parameters after the input, in order.
_MAX_POOL_PARAMETERS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")

# Batch norms whose forward is torch's batch norm (synchronized or not: the fused layer
# synchronizes as its batch norm does); a subclass may compute something else.
_FUSABLE_BATCH_NORMS = (nn.BatchNorm2d, BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm2d)


@dataclasses.dataclass
class _Candidate:
    """A chain found in a graph or an nn.Sequential, before it is fused: conv -> [bn ->] ReLU ->
    pool, or (``bn_relu_conv``) bn -> ReLU -> conv; ``names`` and ``nodes`` in that order."""

    names: tuple[str, ...]
    conv: nn.Module
    bn: nn.Module | None
    relu: nn.Module | None  # None where forward calls a function
    pool: nn.Module | None  # built from the call's arguments where forward calls a function; None in bn -> ReLU -> conv
    nodes: tuple[Node, ...] = ()  # graph chains only
    reason: str | None = None
    bn_relu_conv: bool = False

    def reported(self) -> Chain:
        return Chain(self.names, self.reason, "bn_relu_conv" if self.bn_relu_conv else "pool")


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_leaf(module: nn.Module) -> bool:
    """Modules fuse neither traces into nor looks inside: torch.nn's layers and cifarnet's."""
    defined_in = type(module).__module__
    if defined_in == fused_layers.__name__ or defined_in.startswith(f"{cnn.__name__}."):
        return True
    torch_layer = type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))
    return torch_layer and not isinstance(module, nn.Sequential)


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fusability_reason(candidate: _Candidate) -> str | None:
    """Why the fused ops cannot compute ``candidate``'s modules, or None."""
    conv, bn, pool = candidate.conv, candidate.bn, candidate.pool
    if candidate.bn_relu_conv:
        reason = bn_relu_conv_unfusable_reason(bn, conv)
    elif bn is None:
        reason = conv_relu_pool_unfusable_reason(conv, pool)
    else:
        reason = conv_bn_relu_pool_unfusable_reason(conv, bn, pool)
    if reason is None and bn is not None and type(bn) not in _FUSABLE_BATCH_NORMS:
        reason = f"{type(bn).__name__} is a subclass of nn.BatchNorm2d, whose forward may differ"
    if reason is not None:
        return reason
    # One module per name; None where forward calls a function (it has no hooks).
    if candidate.bn_relu_conv:
        modules = (bn, candidate.relu, conv)
    else:
        modules = (conv, *([] if bn is None else [bn]), candidate.relu, pool)
    for name, module in zip(candidate.names, modules, strict=True):
        if module is not None and _has_hooks(module):
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


def _conv_call(node: Node, root: nn.Module) -> bool:
    return node.op == "call_module" and isinstance(root.get_submodule(node.target), nn.Conv2d)


def _node_names(nodes: tuple[Node, ...], prefix: str) -> tuple[str, ...]:
    """A chain's names: each called module's qualified name, or a function call's node name."""
    return tuple(_qualified(prefix, node.target if node.op == "call_module" else node.name) for node in nodes)


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
    if node.target is F.max_pool2d_with_indices:
        values["return_indices"] = True
    stride = values.get("stride")
    return nn.MaxPool2d(
        values.get("kernel_size"),
        None if stride in (None, [], ()) else stride,  # torch.max_pool2d's stride=[] is the window
        values.get("padding", 0),
        values.get("dilation", 1),
        bool(values.get("return_indices", False)),
        bool(values.get("ceil_mode", False)),
    )


def _graph_chains(graph: torch.fx.Graph, root: nn.Module, prefix: str, bn_relu_conv: bool = True) -> list[_Candidate]:
    """Every conv -> [bn ->] relu -> max-pool chain of ``graph`` (traced from ``root``) and,
    with ``bn_relu_conv``, every bn -> relu -> conv chain, in the order of their first calls,
    with the reason why each cannot be fused where it cannot.

    A convolution heading a pool chain that fuses is not also fused with the batch norm and
    ReLU before it: the pool chain keeps less for the backward (its output is pooled)."""
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    chains = []
    for conv_node in graph.nodes:
        if not _conv_call(conv_node, root):
            continue
        bn_node = _next_call(conv_node, _batch_norm_call, root)
        relu_node = _next_call(bn_node or conv_node, _relu_call, root)
        pool_node = relu_node and _next_call(relu_node, _max_pool_call, root)
        if pool_node is None:
            continue
        nodes = tuple(node for node in (conv_node, bn_node, relu_node, pool_node) if node is not None)
        names = _node_names(nodes, prefix)
        modules = [_called_module(node, root) for node in (conv_node, bn_node, relu_node, pool_node)]
        candidate = _Candidate(names, *modules, nodes)
        candidate.reason = _graph_reason(candidate, (conv_node, bn_node), calls, prefix)
        if candidate.pool is None and candidate.reason is None:
            candidate.pool = _max_pool_module(pool_node)
        if candidate.reason is None:
            candidate.reason = _fusability_reason(candidate)
        chains.append(candidate)
    if bn_relu_conv:
        pooled = {chain.nodes[0]: chain for chain in chains if chain.reason is None}
        chains += _graph_bn_relu_convs(graph, root, prefix, calls, pooled)
    order = {node: index for index, node in enumerate(graph.nodes)}
    return sorted(chains, key=lambda chain: order[chain.nodes[0]])


def _graph_bn_relu_convs(graph, root, prefix, calls, pooled: dict[Node, _Candidate]) -> list[_Candidate]:
    """The bn -> relu -> conv chains of ``graph``; ``pooled``: the pool chains that fuse, by
    their convolution's node."""
    chains = []
    for bn_node in graph.nodes:
        if not _batch_norm_call(bn_node, root):
            continue
        relu_node = _next_call(bn_node, _relu_call, root)
        conv_node = relu_node and _next_call(relu_node, _conv_call, root)
        if conv_node is None:
            continue
        nodes = (bn_node, relu_node, conv_node)
        names = _node_names(nodes, prefix)
        bn, relu, conv = (_called_module(node, root) for node in nodes)
        candidate = _Candidate(names, conv, bn, relu, None, nodes, bn_relu_conv=True)
        candidate.reason = _graph_reason(candidate, (bn_node, conv_node), calls, prefix)
        if candidate.reason is None and conv_node in pooled:
            candidate.reason = _heads_pool_chain(pooled[conv_node])
        if candidate.reason is None:
            candidate.reason = _fusability_reason(candidate)
        chains.append(candidate)
    return chains


def _heads_pool_chain(pool_chain: _Candidate) -> str:
    """Why a bn -> ReLU -> conv chain is left: its convolution fuses with its pool instead."""
    return f"{pool_chain.names[0]} heads the fused chain {' -> '.join(pool_chain.names)}"


def _graph_reason(candidate: _Candidate, stateful: tuple[Node | None, ...], calls: collections.Counter, prefix: str) -> str | None:
    """Why the graph does not let ``candidate`` fuse: an output used outside the chain, a
    module with state (``stateful``: the conv and bn nodes) called more than once, or call
    arguments computed in forward."""
    nodes, names = candidate.nodes, candidate.names
    reused = [(node, name) for node, name in zip(nodes[:-1], names) if len(node.users) > 1]
    # Modules with state must be called once; a shared nn.ReLU or nn.MaxPool2d may be reused.
    repeated = [(node, name) for node, name in zip(nodes, names) if node in stateful and calls[node.target] > 1]
    dynamic = [node for node in nodes[1:] if len(node.all_input_nodes) > 1]
    if reused:
        node, name = reused[0]
        others = ", ".join(_qualified(prefix, user.name) for user in node.users if user not in nodes)
        return f"the output of {name} is also used by {others}"
    if repeated:
        node, name = repeated[0]
        return f"{name} is called {calls[node.target]} times in forward"
    if dynamic:
        return f"the arguments of {_qualified(prefix, dynamic[0].name)} are computed in forward"
    return None


def _sequential_chains(sequential: nn.Sequential, prefix: str, bn_relu_conv: bool = True) -> list[tuple[list[str], _Candidate]]:
    """The chains among consecutive children of ``sequential`` (child names, candidate), in
    order: conv -> [bn ->] ReLU -> pool, and with ``bn_relu_conv`` bn -> ReLU -> conv, as
    :func:`_graph_chains` finds them in graphs."""
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
    if bn_relu_conv:
        pooled = {names[0]: candidate for names, candidate in chains if candidate.reason is None}
        for index in range(len(children) - 2):
            (bn_name, bn), (relu_name, relu), (conv_name, conv) = children[index : index + 3]
            if not (isinstance(bn, BATCH_NORMS_2D) and type(relu) is nn.ReLU and isinstance(conv, nn.Conv2d)):
                continue
            names = [bn_name, relu_name, conv_name]
            candidate = _Candidate(tuple(_qualified(prefix, name) for name in names), conv, bn, relu, None, bn_relu_conv=True)
            if conv_name in pooled:
                candidate.reason = _heads_pool_chain(pooled[conv_name])
            else:
                candidate.reason = _fusability_reason(candidate)
            chains.append((names, candidate))
    order = {name: index for index, (name, _) in enumerate(children)}
    return sorted(chains, key=lambda chain: order[chain[0][0]])


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
