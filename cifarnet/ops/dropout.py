"""``dropout``: training dropout with a counter-based (Philox) mask in one pass; its functional
wrapper, the fake kernels of the op and of its autograd formula's ops, and its ONNX
translation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from cifarnet import _C  # noqa: F401  (defines the op)
from cifarnet.ops._onnx import BACKWARD, no_onnx_translation, onnx_translation
from cifarnet.ops._transforms import under_vmap

_SEED_BOUND = 2**63 - 1


def dropout_seed(generator: torch.Generator | None = None) -> Tensor:
    """An explicit seed for :func:`dropout`'s mask, drawn from ``generator`` (default: torch's
    default CPU generator, which ``torch.manual_seed`` seeds): a one-element int64 CPU tensor.

    Raises:
        ValueError: ``generator`` is not a CPU generator.
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"dropout's generator must be a CPU generator (it draws a seed on the host), got one on {generator.device}")
    # NB: no generator argument at all where there is none: torch.export then records
    # aten.randint.low, which the ONNX exporter translates (it has no randint.low_generator).
    options = {} if generator is None else {"generator": generator}
    return torch.randint(-_SEED_BOUND, _SEED_BOUND, (1,), dtype=torch.int64, **options)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """``F.dropout(input, p, training)`` with a counter-based mask, in one pass.

    In training each element is zeroed with probability ``p`` and the others are multiplied by
    ``1 / (1 - p)``, with native dropout's arithmetic (the factor rounded to the input's dtype;
    a dropped NaN stays NaN, as ``x * 0``). The mask comes from Philox4x32-10 over each
    element's row-major index, where native CPU dropout draws a Bernoulli number per element:
    one pass instead of three, the same mask for a key whatever the thread count and layout,
    and a backward that recomputes the mask rather than keeping it. Its key:

    - on CUDA, without ``generator``: the CUDA generator's Philox seed and offset, read on the
      device, as native dropout reads them: a CUDA graph (``torch.cuda.graph``,
      ``torch.compile(mode="reduce-overhead")``) draws a new mask at every replay, no call
      waits for the GPU, and ``torch.cuda.manual_seed`` or ``torch.cuda.set_rng_state`` give
      the same masks again;
    - on the CPU, or with ``generator``: a seed drawn on the host from ``generator`` (default:
      torch's default CPU generator) at each call (see :func:`dropout_seed`), the same mask for
      that seed on the CPU and on CUDA (a CUDA graph would replay that one mask).

    The masks differ from native dropout's for the same ``torch.manual_seed``. Outside training,
    or with ``p == 0``, returns ``input`` itself, as ``F.dropout`` does. On devices without a
    cifarnet kernel (neither CPU nor CUDA) it calls ``F.dropout``.

    Args:
        input (Tensor): float32, float64, bfloat16 or float16, any shape and layout (the
            output takes ``torch.empty_like(input)``'s layout, as ``F.dropout``'s does).
        p (float): probability of an element to be zeroed, in [0, 1].
        training (bool): apply dropout (``False``: return ``input``).
        generator (torch.Generator, optional): a CPU generator to draw the seed from.

    Raises:
        ValueError: ``p`` outside [0, 1], or ``generator`` not a CPU generator.
    """
    if has_torch_function((input,)):
        return handle_torch_function(dropout, (input,), input, p, training, generator)
    # F.dropout's checks and exception types: a ValueError out of range, a RuntimeError for NaN.
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if math.isnan(p):
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    if input.device.type not in ("cpu", "cuda") or (generator is None and under_vmap()):
        # Under vmap, native's batching rule draws as vmap's `randomness` says (its default,
        # "error", refuses); see cifarnet.ops._transforms.
        return F.dropout(input, p, True)
    # NB: on the CPU the seed stays a host draw: the masks of a torch.manual_seed are those of
    # earlier releases, and a compiled graph draws it with the other random ops.
    seed = None if input.device.type == "cuda" and generator is None else dropout_seed(generator)
    return torch.ops.cifarnet.dropout.default(input, seed, float(p))


# Native dropout's layout: the input's strides where it is dense, else its suggested format.
@torch.library.register_fake("cifarnet::dropout")
def _dropout_fake(input, seed=None, p=0.5):
    return torch.empty_like(input)


@torch.library.register_fake("cifarnet::_dropout_forward")
def _dropout_forward_fake(input, p):
    return torch.empty_like(input), input.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("cifarnet::_dropout_backward")
def _dropout_backward_fake(grad_output, seed_offset, p):
    return torch.empty_like(grad_output)


@onnx_translation(torch.ops.cifarnet.dropout.default)
def _dropout_onnx(input, seed=None, p=0.5):
    """``cifarnet::dropout`` (dropout in training) as ONNX ``Dropout`` in training mode, what
    ``nn.Dropout`` in training exports as: the runtime draws the mask (not the Philox mask of
    ``seed`` or of torch's generator, which the exported graph drops)."""
    from onnxscript import opset18 as op

    if len(input.shape) == 0:  # as torch's own translation of aten::dropout does
        output, _ = op.Dropout(op.Reshape(input, op.Constant(value_ints=[-1])), p, True)
        return op.Squeeze(output)
    output, _ = op.Dropout(input, p, True)
    return output


# The autograd formula's ops (what a model that takes gradients reaches): no ONNX translation.
no_onnx_translation(
    torch.ops.cifarnet._dropout_forward.default, "dropout's forward for autograd", "export under torch.no_grad()"
)
no_onnx_translation(torch.ops.cifarnet._dropout_backward.default, *BACKWARD)
