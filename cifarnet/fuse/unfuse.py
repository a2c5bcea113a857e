"""``unfuse``: plain torch modules and calls again, holding the same tensors."""

from __future__ import annotations

import copy
import warnings

from torch import nn
from torch.fx import GraphModule

from cifarnet.fuse._torch_internals import _has_hooks, _with_hooks_of
from cifarnet.fuse.graph_module import _as_traced_class
from cifarnet.fuse.layers import FusedBatchNorm2d, FusedIdentity, _FusedChainLayer
from cifarnet.fuse.patterns import _FUNCTIONS_BY_NAME
from cifarnet.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNormReLUConv2d,
    Conv2dBatchNormReLUMaxPool2d,
    Conv2dReLUMaxPool2d,
    Dropout,
)


def unfuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Undoes :func:`fuse`: plain torch modules and calls again, holding the same tensors.

    Fused layers become ``nn.Conv2d``; by position, :class:`FusedBatchNorm2d` becomes
    ``nn.BatchNorm2d`` (also where the original was a :class:`cifarnet.nn.BatchNorm2d`;
    ``nn.SyncBatchNorm`` where it was synchronized) and
    :class:`FusedIdentity` the ``nn.ReLU`` or ``nn.MaxPool2d`` it replaced; in graphs, the
    batch-norm, ReLU and pooling calls are put back after the convolution (before it, for a
    batch norm -> ReLU -> conv chain). Modules that
    ``fuse`` turned into GraphModules become instances of their own classes again, running
    their own ``forward`` (a GraphModule given to ``fuse`` stays one, its graph unfused).
    Layers of :mod:`cifarnet.nn` that ``fuse`` did not make (a model written with them, or
    one such layer given as ``model``) become their ``to_native()``, holding the same tensors
    under the same names: ``nn.Dropout``, ``nn.BatchNorm1d``, ``nn.BatchNorm2d`` and
    ``nn.SyncBatchNorm``, and for each conv layer a ``torch.fx.GraphModule`` (not an
    ``nn.Conv2d``: the layer's ``weight`` and ``bias`` stay its own keys, where a child
    ``nn.Conv2d`` would add a prefix) that calls ``F.conv2d`` on them, then its children ``bn``
    (``nn.BatchNorm2d``), ``relu`` (``nn.ReLU``) and ``pool`` (``nn.MaxPool2d``); see
    :meth:`cifarnet.nn.Conv2dReLUMaxPool2d.to_native`, which keeps the layer's hooks. A forward
    that calls :mod:`cifarnet.ops` itself is code, not a layer, and stays as it is. Hooks
    registered on the modules ``fuse`` put in are dropped with a warning: the module put back
    computes another output (the ``nn.Conv2d`` where the fused layer pooled).

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
    dropped_hooks = _unfuse_children(model)
    if dropped_hooks:
        warnings.warn(
            f"cifarnet.unfuse: the hooks registered after fusing on {', '.join(dropped_hooks)} are dropped: "
            "the modules put back in their places compute other outputs",
            stacklevel=2,
        )
    model = _untraced(model)
    return _with_hooks_of(model, model.to_native()) if isinstance(model, _LAYERS) else model


# The layers of cifarnet.nn, each with a to_native() that computes it with torch alone.
_LAYERS = (Conv2dReLUMaxPool2d, Conv2dBatchNormReLUMaxPool2d, BatchNormReLUConv2d, BatchNorm1d, BatchNorm2d, Dropout)


def _unfuse_children(module: nn.Module, prefix: str = "", dropped_hooks: list[str] | None = None) -> list[str]:
    """Replaces, at every depth below ``module`` (named ``prefix``), what fuse put in by what it
    replaced, and the layers of cifarnet.nn by their ``to_native()``; returns the names of the
    modules fuse put in whose hooks were dropped with them."""
    dropped_hooks = [] if dropped_hooks is None else dropped_hooks
    for name, child in list(module._modules.items()):
        if isinstance(child, (_FusedChainLayer, FusedBatchNorm2d, FusedIdentity)) and _has_hooks(child):
            # fuse leaves hooked modules unfused, so these hooks came after it, and the module
            # put back computes another output (a convolution where the fused layer pooled).
            dropped_hooks.append(f"{prefix}{name}")
        if isinstance(child, _FusedChainLayer):  # before _LAYERS: the chain's other positions come back too
            native = child.to_conv2d()
        elif isinstance(child, FusedBatchNorm2d):
            native = child.to_batch_norm2d()
        elif isinstance(child, FusedIdentity):
            native = child.original.train(child.training)
        elif isinstance(child, _LAYERS):
            native = _with_hooks_of(child, child.to_native())
        else:
            if child is not None:
                _unfuse_children(child, f"{prefix}{name}.", dropped_hooks)
            continue
        setattr(module, name, native)
    return dropped_hooks


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
        if fused.steps_before_conv:
            previous = node.args[0]
            for step in fused.steps:
                with graph.inserting_before(node):
                    previous = _create_step(graph, step, previous)
            node.update_arg(0, previous)
        else:
            users = list(node.users)
            previous = node
            for step in fused.steps:
                with graph.inserting_after(previous):
                    previous = _create_step(graph, step, previous)
            for user in users:
                user.replace_input_with(node, previous)
        changed = True
    if changed:
        graph.lint()
        graph_module.recompile()


def _create_step(graph, step, input):
    """The node of ``step`` called on ``input``."""
    target = _FUNCTIONS_BY_NAME[step.target] if step.op == "call_function" else step.target
    return graph.create_node(step.op, target, (input, *step.args), step.kwargs)
