"""Private torch behaviour fuse relies on, each in one helper here (where no public API does
the same). tests/test_torch_internals.py checks each against the installed torch, so that a
release that changes one fails there, naming it, rather than somewhere deep inside fuse."""

from __future__ import annotations

import functools

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx import GraphModule


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


# nn.Module's hook dictionaries (the handles users hold remove from these very objects).
_HOOKS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)  # fmt: skip


def _with_hooks_of(layer: nn.Module, native: nn.Module) -> nn.Module:
    """``native`` (a module that computes what ``layer`` computes) holding ``layer``'s hooks,
    so that they run on it as they ran on ``layer``."""
    _set_module_state(native, {name: vars(layer)[name] for name in _HOOKS if name in vars(layer)})
    return native


def _has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has its own forward or backward hooks (called only by its ``__call__``)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)
