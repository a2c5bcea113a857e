"""How ``torch.fx`` records cifarnet's layers whose forward depends on the train/eval mode: as a
call of the layer, the way it records torch.nn's."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn


def leaf_call(module: nn.Module, input) -> torch.fx.Proxy | None:
    """A ``call_module`` node of ``module`` on ``input`` when a ``torch.fx`` tracer traces
    ``module``'s forward inside the model it traces; ``None`` otherwise (real or fake tensors:
    eager mode, ``torch.compile``, ``torch.export``; or ``module`` is the traced root itself,
    which torch.fx traces into as it does a torch.nn root).

    The forward of a layer whose computation depends on ``self.training`` starts with
    ``call = leaf_call(self, input)`` and returns ``call`` when it is not ``None``; the traced
    GraphModule then calls the layer itself, which reads its mode at each call and follows
    ``.train()`` / ``.eval()``.

    NB: torch.fx's default tracer decides by where a module's class is defined: modules of
    ``torch.nn`` are leaves (``Tracer.is_leaf_module``), any other is traced into, which reads
    ``self.training`` once and leaves it in the graph as a constant (``training=True`` for
    ever). torch.fx has no public registry of leaf modules (``torch.fx.wrap`` is for free
    functions), so the layer records its own call, with the public ``Tracer.path_of_module``
    and ``Tracer.create_proxy``, inside the scope ``Tracer.call_module`` has opened for it:
    the node the tracer records for a leaf.
    """
    if not isinstance(input, torch.fx.Proxy) or not isinstance(input.tracer, torch.fx.Tracer):
        return None
    tracer = input.tracer
    try:
        path = tracer.path_of_module(module)
    except NameError:  # not a submodule of the traced root (forward called by hand)
        return None
    if not path:  # the root
        return None
    return tracer.create_proxy("call_module", path, (input,), {})
