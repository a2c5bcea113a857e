"""Which ``torch.func`` transforms are running the current call.

Under ``torch.func.vmap`` the batch-norm ops and dropout run as the native composition they
replace: the batch-norm schemas mutate running statistics, which functorch's per-example
fallback refuses where native batch norm has a batching rule, and native dropout's rule draws
as vmap's ``randomness`` says on every device. So a fused layer vmaps wherever its native one
does (an ensemble over stacked weights, per-example gradients, batch norm without running
statistics or in evaluation), and fails where native fails, with native's message.
"""

from __future__ import annotations

import torch
from torch._C._functorch import TransformType, get_interpreter_stack


def under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is running this call, at any depth of nested transforms
    (``vmap(grad(f))`` included). False while ``torch.compile`` traces: dynamo cannot trace
    the interpreter stack (a graph break, an error with ``fullgraph=True``), and it traces
    vmap as an op of its own."""
    if torch.compiler.is_compiling():
        return False
    stack = get_interpreter_stack()  # None outside every transform
    return stack is not None and any(interpreter.key() == TransformType.Vmap for interpreter in stack)
