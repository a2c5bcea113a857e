"""Functional API of the fused ops: thin wrappers over ``torch.ops.cifarnet``.

Each function normalises its arguments to the op schema and calls the op through the
dispatcher, so autograd, ``torch.compile`` and device kernels come with it. Like torch's own
functionals, each first hands ``__torch_function__`` overrides (a ``torch.fx`` Proxy, a tensor
subclass, a TorchFunctionMode) the call itself: the Python around the op (unbatched inputs)
branches on the input, which a ``torch.fx`` trace could not follow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from cifarnet._arguments import pair

__all__ = ["batch_norm", "conv2d_batch_norm_relu_max_pool2d", "conv2d_relu_max_pool2d", "dropout", "dropout_seed"]


def _is_unbatched(input: Tensor) -> bool:
    """Whether ``input`` is an unbatched ``(C, H, W)`` image rather than an ``(N, C, H, W)``
    batch, the two ranks ``F.conv2d`` and ``F.max_pool2d`` take; raises on any other."""
    if input.dim() not in (3, 4):
        raise RuntimeError(
            f"input must be a 3-D (unbatched) or 4-D (batched) tensor, got {input.dim()}-D tensor of shape "
            f"{list(input.shape)}"
        )
    return input.dim() == 3


def conv2d_relu_max_pool2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    pool_size=2,
    pool_stride=None,
    ceil_mode: bool = False,
) -> Tensor:
    """Convolution, ReLU and max pooling in one op.

    Computes ``F.max_pool2d(F.relu(F.conv2d(input, weight, bias, stride, padding)),
    pool_size, pool_stride, ceil_mode=ceil_mode)`` without materialising the convolution
    output: the backward keeps only ``input``, ``weight`` and a one-byte window argmax.
    Ties and NaN are resolved as native ``max_pool2d`` resolves them, so gradients match.

    Args:
        input (Tensor[N, C_in, H, W] or Tensor[C_in, H, W]): float32, float64, bfloat16 or
            float16 (16-bit data are computed in float32); contiguous or channels_last. An
            unbatched ``[C_in, H, W]`` input is computed as a batch of one, as ``F.conv2d``
            and ``F.max_pool2d`` compute it. Under ``torch.autocast`` input, weight and bias
            are cast to the autocast dtype.
        weight (Tensor[C_out, C_in, kH, kW]): same dtype and device as ``input``.
        bias (Tensor[C_out], optional): convolution bias.
        stride (int or (int, int)): convolution stride.
        padding (int or (int, int)): implicit zero padding of the convolution.
        pool_size (int or (int, int)): pooling window; at most 255 elements.
        pool_stride (int or (int, int), optional): pooling stride; ``None`` means ``pool_size``.
        ceil_mode (bool): round the pooled size up, as in ``F.max_pool2d``.

    Returns:
        Tensor[N, C_out, H_out, W_out] (Tensor[C_out, H_out, W_out] for an unbatched input): in
        the memory format native conv2d would give (channels_last if ``input`` or ``weight`` is
        channels_last).
    """
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(
            conv2d_relu_max_pool2d,
            (input, weight, bias),
            input,
            weight,
            bias,
            stride,
            padding,
            pool_size,
            pool_stride,
            ceil_mode,
        )
    unbatched = _is_unbatched(input)
    output = torch.ops.cifarnet.conv2d_relu_max_pool2d.default(
        input.unsqueeze(0) if unbatched else input,
        weight,
        bias,
        pair(stride, "stride"),
        pair(padding, "padding"),
        pair(pool_size, "pool_size"),
        [] if pool_stride is None else pair(pool_stride, "pool_stride"),
        bool(ceil_mode),
    )
    return output.squeeze(0) if unbatched else output


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalisation with ``torch.nn.functional.batch_norm``'s signature and semantics.

    Training normalises each channel with the batch mean and biased variance and, when
    running statistics are given, updates them in place:
    ``running = (1 - momentum) * running + momentum * batch`` (with the unbiased variance).
    Evaluation normalises with the running statistics. Statistics accumulate in double on
    the CPU; bfloat16 and float16 inputs are computed in float32. Takes the shapes
    ``F.batch_norm`` takes: ``[N, C]``, ``[N, C, L]``, ``[N, C, H, W]`` or more dimensions,
    and empty inputs (which ``F.batch_norm`` itself computes: there is nothing to normalise,
    and no statistics to update).

    Args:
        input (Tensor[N, C, *]): float32, float64, bfloat16 or float16; contiguous or
            channels_last. With 16-bit input the weight, bias and running statistics may be
            float32, as native batch norm allows; the output takes the input's dtype.
        running_mean, running_var (Tensor[C], optional): updated in place in training;
            required in evaluation.
        weight, bias (Tensor[C], optional): the affine transform after normalisation.
        training (bool): use batch statistics.
        momentum (float): weight of the batch statistics in the running ones.
        eps (float): added to the variance.

    Returns:
        Tensor[N, C, *]: same shape, dtype and memory format as ``input``.
    """
    tensors = (input, running_mean, running_var, weight, bias)
    if has_torch_function(tensors):
        return handle_torch_function(
            batch_norm, tensors, input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    if input.numel() == 0:
        # NB: F.batch_norm takes empty inputs (of any rank, even (0,)) in training too, where
        # the op needs two values per channel; it also decides which empty shapes are valid.
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.ops.cifarnet.batch_norm.default(
        input, running_mean, running_var, weight, bias, bool(training), float(momentum), float(eps)
    )


def conv2d_batch_norm_relu_max_pool2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride=1,
    padding=0,
    pool_size=2,
    pool_stride=None,
    ceil_mode: bool = False,
) -> Tensor:
    """Convolution, batch norm, ReLU and max pooling in one op.

    Computes ``F.max_pool2d(F.relu(F.batch_norm(F.conv2d(input, weight, bias, stride,
    padding), running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)),
    pool_size, pool_stride, ceil_mode=ceil_mode)``, updating the running statistics in
    training as :func:`batch_norm` does. The backward keeps the input, the convolution output,
    the per-channel statistics and a one-byte window argmax (no normalised or ReLU output, no
    int64 indices). In evaluation the batch norm is folded into the convolution.
    Dtypes as :func:`conv2d_relu_max_pool2d` for the convolution and as :func:`batch_norm` for
    the batch-norm parameters (float32 ones with bfloat16/float16 data, as autocast leaves them).

    Args:
        input (Tensor[N, C_in, H, W] or Tensor[C_in, H, W]), weight (Tensor[C_out, C_in, kH, kW]),
            bias (Tensor[C_out], optional), stride, padding: the convolution. An unbatched
            ``[C_in, H, W]`` input is computed as a batch of one (batch statistics over its
            ``H_conv x W_conv`` positions), as in :func:`conv2d_relu_max_pool2d`.
        running_mean, running_var, bn_weight, bn_bias (Tensor[C_out], optional), training,
            momentum, eps: the batch norm, as in :func:`batch_norm`.
        pool_size, pool_stride, ceil_mode: the max pooling, as in
            :func:`conv2d_relu_max_pool2d` (windows of at most 255 elements).

    Returns:
        Tensor[N, C_out, H_out, W_out] (Tensor[C_out, H_out, W_out] for an unbatched input): in
        the memory format native conv2d would give.
    """
    tensors = (input, weight, bias, running_mean, running_var, bn_weight, bn_bias)
    if has_torch_function(tensors):
        return handle_torch_function(
            conv2d_batch_norm_relu_max_pool2d,
            tensors,
            input,
            weight,
            bias,
            running_mean,
            running_var,
            bn_weight,
            bn_bias,
            training,
            momentum,
            eps,
            stride,
            padding,
            pool_size,
            pool_stride,
            ceil_mode,
        )
    unbatched = _is_unbatched(input)
    output = torch.ops.cifarnet.conv2d_batch_norm_relu_max_pool2d.default(
        input.unsqueeze(0) if unbatched else input,
        weight,
        bias,
        running_mean,
        running_var,
        bn_weight,
        bn_bias,
        bool(training),
        float(momentum),
        float(eps),
        pair(stride, "stride"),
        pair(padding, "padding"),
        pair(pool_size, "pool_size"),
        [] if pool_stride is None else pair(pool_stride, "pool_stride"),
        bool(ceil_mode),
    )
    return output.squeeze(0) if unbatched else output


_SEED_BOUND = 2**63 - 1


def dropout_seed(generator: torch.Generator | None = None) -> Tensor:
    """A seed for :func:`dropout`'s mask, drawn from ``generator`` (default: torch's default CPU
    generator, which ``torch.manual_seed`` seeds): a one-element int64 CPU tensor."""
    return torch.randint(-_SEED_BOUND, _SEED_BOUND, (1,), dtype=torch.int64, generator=generator)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """``F.dropout(input, p, training)`` with a counter-based mask, in one pass.

    In training each element is zeroed with probability ``p`` and the others are multiplied by
    ``1 / (1 - p)``, with native dropout's arithmetic (the factor rounded to the input's dtype;
    a dropped NaN stays NaN, as ``x * 0``). The mask comes from Philox4x32-10 keyed by a seed
    drawn from ``generator`` (see :func:`dropout_seed`) over each element's row-major index,
    where native CPU dropout draws a Bernoulli number per element: one pass instead of three,
    the same mask for a seed on the CPU and on CUDA, for any thread count and layout, and a
    backward that recomputes the mask rather than keeping it. The masks differ from native
    dropout's for the same ``torch.manual_seed``, and the seed is drawn on the host at each call
    (a CUDA graph captured in eager mode would replay one mask: use ``F.dropout`` inside
    captured graphs). Outside training, or with ``p == 0``, returns ``input`` itself, as
    ``F.dropout`` does. On devices without a cifarnet kernel (neither CPU nor CUDA) it calls
    ``F.dropout``.

    Args:
        input (Tensor): float32, float64, bfloat16 or float16, any shape; contiguous or
            channels_last (the output has the input's layout).
        p (float): probability of an element to be zeroed, in [0, 1].
        training (bool): apply dropout (``False``: return ``input``).
        generator (torch.Generator, optional): a CPU generator to draw the seed from.
    """
    if has_torch_function((input,)):
        return handle_torch_function(dropout, (input,), input, p, training, generator)
    if not 0.0 <= p <= 1.0:  # also refuses NaN
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    if input.device.type not in ("cpu", "cuda"):
        return F.dropout(input, p, True)
    return torch.ops.cifarnet.dropout.default(input, dropout_seed(generator), float(p))
