"""``batch_norm``: batch normalisation; its functional wrapper, the fake kernels of its private
ops (forward, backward, running statistics, and the phase ops synchronized batch norm runs
between its collectives) and its ONNX translation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from cifarnet import _C  # noqa: F401  (defines the op)
from cifarnet.ops._layout import (
    batch_norm_grad_input_memory_format,
    batch_norm_memory_format,
    batch_norm_stats_dtype,
    channel_stats,
    empty_like_layout,
)
from cifarnet.ops._onnx import BACKWARD, EXPORT_IN_EVAL_MODE, no_onnx_translation, onnx_translation, per_channel_or
from cifarnet.ops._transforms import under_vmap


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
        input (Tensor[N, C, *]): float32, float64, bfloat16 or float16, any layout. With
            16-bit input the weight, bias and running statistics may be float32, as native
            batch norm allows; the output takes the input's dtype.
        running_mean, running_var (Tensor[C], optional): updated in place in training;
            required in evaluation.
        weight, bias (Tensor[C], optional): the affine transform after normalisation.
        training (bool): use batch statistics.
        momentum (float): weight of the batch statistics in the running ones.
        eps (float): added to the variance.

    Returns:
        Tensor[N, C, *]: same shape and dtype as ``input``, in native batch norm's layout: the
        memory format ``input`` is dense in (contiguous, channels_last or channels_last_3d),
        else its suggested one.
    """
    tensors = (input, running_mean, running_var, weight, bias)
    if has_torch_function(tensors):
        return handle_torch_function(
            batch_norm, tensors, input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    if input.numel() == 0 or under_vmap():
        # NB: F.batch_norm takes empty inputs (of any rank, even (0,)) in training too, where
        # the op needs two values per channel; it also decides which empty shapes are valid.
        # Under vmap, native's batching rule (see cifarnet.ops._transforms).
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.ops.cifarnet.batch_norm.default(
        input, running_mean, running_var, weight, bias, bool(training), float(momentum), float(eps)
    )


@torch.library.register_fake("cifarnet::_batch_norm_forward")
def _batch_norm_forward_fake(input, mean, var, weight, bias, training, eps, relu=False):
    torch._check(input.dim() >= 2, lambda: f"input must have at least 2 dimensions (N, C, ...), got {input.dim()}-D")
    for name, tensor in (("running_mean", mean), ("running_var", var), ("weight", weight), ("bias", bias)):
        torch._check(
            tensor is None or tensor.device == input.device,
            lambda: f"{name} is on {tensor.device} but input is on {input.device}",
        )
    return (empty_like_layout(input, batch_norm_memory_format(input)), *channel_stats(input, input.shape[1]))


@torch.library.register_fake("cifarnet::_batch_norm_backward")
def _batch_norm_backward_fake(grad_output, input, save_mean, save_var, weight, training, eps, output_mask, relu_output=None):
    # The parameters' gradients in the statistics dtype (the autograd formula casts each to
    # its parameter's dtype).
    channels = input.shape[1]
    grad_dtype = batch_norm_stats_dtype(input)
    return (
        empty_like_layout(input, batch_norm_grad_input_memory_format(input, grad_output)) if output_mask[0] else None,
        input.new_empty(channels, dtype=grad_dtype) if output_mask[1] else None,
        input.new_empty(channels, dtype=grad_dtype) if output_mask[2] else None,
    )


@torch.library.register_fake("cifarnet::_batch_norm_update_running_stats")
def _batch_norm_update_running_stats_fake(running_mean, running_var, save_mean, save_var, momentum, count):
    return None


# The phase ops of synchronized batch norm (cifarnet/_sync_batch_norm.py).


@torch.library.register_fake("cifarnet::_batch_norm_stats")
def _batch_norm_stats_fake(input):
    torch._check(input.dim() >= 2, lambda: f"input must have at least 2 dimensions (N, C, ...), got {input.dim()}-D")
    return channel_stats(input, input.shape[1])


@torch.library.register_fake("cifarnet::_batch_norm_backward_reduce")
def _batch_norm_backward_reduce_fake(grad_output, input, mean):
    return channel_stats(input, input.shape[1])


@torch.library.register_fake("cifarnet::_batch_norm_backward_elementwise")
def _batch_norm_backward_elementwise_fake(grad_output, input, mean, var, weight, sum_dy, sum_dy_xmu, count, eps):
    return empty_like_layout(input, batch_norm_grad_input_memory_format(input, grad_output))


@onnx_translation(torch.ops.cifarnet._batch_norm_forward.default)
def _batch_norm_forward_onnx(input, mean, var, weight, bias, training, eps, relu=False):
    """``cifarnet::_batch_norm_forward`` in evaluation as ``BatchNormalization`` (then ``Relu``
    with ``relu``).

    Returns ``(output, save_mean, save_var)`` like the op; in evaluation the saved statistics
    are the running ones (only the backward reads them, so the exported graph drops them).
    """
    from onnxscript import opset18 as op

    if training:
        raise NotImplementedError(
            "cifarnet::_batch_norm_forward with batch statistics (a model in training mode, or a batch "
            f"norm without running statistics) has no ONNX translation; {EXPORT_IN_EVAL_MODE} with running statistics"
        )
    mean = per_channel_or(mean, 0.0, input)
    var = per_channel_or(var, 1.0, input)
    output = op.BatchNormalization(
        input, per_channel_or(weight, 1.0, input), per_channel_or(bias, 0.0, input), mean, var, epsilon=eps
    )
    if relu:
        output = op.Relu(output)
    # NB: new values (Identity), not the inputs themselves: the exporter names each output.
    return output, op.Identity(mean), op.Identity(var)


# The ops a model reaches in training only, or for gradients: no ONNX translation, a message.
no_onnx_translation(torch.ops.cifarnet._batch_norm_backward.default, *BACKWARD)
no_onnx_translation(
    torch.ops.cifarnet._batch_norm_update_running_stats.default,
    "the update of batch norm's running statistics in training",
)
no_onnx_translation(
    torch.ops.cifarnet._batch_norm_stats.default, "the statistics of synchronized batch norm in training"
)
no_onnx_translation(torch.ops.cifarnet._batch_norm_backward_reduce.default, *BACKWARD)
no_onnx_translation(torch.ops.cifarnet._batch_norm_backward_elementwise.default, *BACKWARD)
