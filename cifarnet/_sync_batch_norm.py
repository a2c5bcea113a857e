"""Synchronized batch norm: the batch statistics of the whole batch spread over the processes of
a ``torch.distributed`` group, for :class:`cifarnet.nn.SyncBatchNorm2d` and the fused
conv -> batch norm -> ReLU -> max-pool layer whose batch norm is synchronized.

The ops stay collective-free: each phase op works on this process's part of the batch, and the
``torch.autograd.Function``\\ s here put one collective between the phases.

- Forward: per-channel statistics of this process's part (count, mean, biased variance), one
  ``all_gather`` of ``(count, mean, M2 = count * variance)`` in float64, merged with the
  parallel-variance formula of Chan et al. (every term non-negative: no cancellation, exact
  for counts that differ per process, a process with no samples weighs nothing); then the
  normalisation (and ReLU and pooling) with the merged statistics. The running statistics take
  the merged mean and the unbiased variance of the whole batch, as ``torch.nn.SyncBatchNorm``.
- Backward: this process's ``sum(dy)`` and ``sum(dy * (x - mean))``, one ``all_gather`` of both
  in float64, summed in rank order, then the gradient with the whole batch's sums and count.
  The batch norm's parameter gradients are this process's share (its own sums), like every
  other parameter's: DistributedDataParallel's average of them over processes is the gradient
  of the average loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from cifarnet._arguments import check_bool, conv_padding, pair, pool_stride_pair

_ops = torch.ops.cifarnet


def synchronizing_group(process_group):
    """The group to synchronize over (``None`` meaning the default group), or None where there
    is nothing to synchronize: ``torch.distributed`` not initialised, or a group of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_world_size(group) == 1:
        return None
    return group


def _global_statistics(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, int]:
    """The whole batch's per-channel mean and biased variance (float64) and its count, from
    each process's ``count`` values per channel with ``mean`` and ``var``."""
    local = torch.stack([torch.full_like(mean, count, dtype=torch.float64), mean.double(), var.double() * count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    counts, means, m2s = torch.stack(gathered).unbind(1)  # each [processes, C]
    total = int(counts[:, 0].sum().item()) if counts.shape[1] > 0 else 0
    if total <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {total} over the "
            f"{len(gathered)} processes of the group (per process: {[int(c) for c in counts[:, 0].tolist()]})"
        )
    # Chan et al.: M2 = sum_i M2_i + sum_i n_i (mean_i - mean)^2, mean = sum_i n_i mean_i / n.
    global_mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - global_mean) ** 2).sum(0)
    return global_mean, m2 / total, total


def _sum_over_group(sum_dy: Tensor, sum_dy_xmu: Tensor, group) -> tuple[Tensor, Tensor]:
    """The whole batch's ``sum(dy)`` and ``sum(dy * (x - mean))`` (float64).

    One all_gather, then the sum in rank order on every process: for these few values an
    all_gather takes half the round trips of an all_reduce (measured on gloo, 2 processes:
    0.25 against 0.49 ms), and every process adds in the same order, so all get the same bits.
    """
    local = torch.stack([sum_dy.double(), sum_dy_xmu.double()])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return tuple(torch.stack(gathered).sum(0).unbind(0))


def _update_running_stats(running_mean, running_var, mean: Tensor, var: Tensor, momentum: float, count: int) -> None:
    if running_mean is None and running_var is None:
        return
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must both be given or both be None")
    _ops._batch_norm_update_running_stats(running_mean, running_var, mean, var, momentum, count)


def _parameter_dtypes(weight, bias) -> tuple:
    """The dtypes of a batch norm's affine parameters (None for one left out)."""
    return tuple(None if parameter is None else parameter.dtype for parameter in (weight, bias))


def _local_parameter_grads(sum_dy, sum_dy_xmu, var, eps, dtypes, needs):
    """(grad_weight, grad_bias) of a batch norm's affine parameters from this process's sums,
    each in its own parameter's dtype (``dtypes``, from :func:`_parameter_dtypes`), as native's:
    a float32 bias of 16-bit data gets a float32 gradient, with or without a weight."""
    weight_dtype, bias_dtype = dtypes
    grad_weight = (sum_dy_xmu * torch.rsqrt(var + eps)).to(weight_dtype) if needs[0] else None
    grad_bias = sum_dy.to(bias_dtype) if needs[1] else None
    return grad_weight, grad_bias


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group):
        mean, var = _ops._batch_norm_stats(input)
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        mean, var, total = _global_statistics(mean, var, count, group)
        _update_running_stats(running_mean, running_var, mean, var, momentum, total)
        output, _, _ = _ops._batch_norm_forward(input, mean, var, weight, bias, False, eps)
        ctx.save_for_backward(input, weight, mean, var)
        ctx.eps, ctx.group, ctx.count = eps, group, total
        ctx.parameter_dtypes = _parameter_dtypes(weight, bias)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, var = ctx.saved_tensors
        sum_dy, sum_dy_xmu = _ops._batch_norm_backward_reduce(grad_output, input, mean)
        grad_weight, grad_bias = _local_parameter_grads(
            sum_dy, sum_dy_xmu, var, ctx.eps, ctx.parameter_dtypes, ctx.needs_input_grad[1:3]
        )
        grad_input = None
        if ctx.needs_input_grad[0]:
            sum_dy, sum_dy_xmu = _sum_over_group(sum_dy, sum_dy_xmu, ctx.group)
            grad_input = _ops._batch_norm_backward_elementwise(
                grad_output, input, mean, var, weight, sum_dy, sum_dy_xmu, ctx.count, ctx.eps
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


class _SyncConv2dBatchNormReLUMaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps, geometry, group):
        conv_output, mean, var = _ops._conv2d_batch_norm_relu_max_pool2d_stats(input, weight, bias, *geometry)
        count = conv_output.shape[0] * conv_output.shape[2] * conv_output.shape[3]
        mean, var, total = _global_statistics(mean, var, count, group)
        _update_running_stats(running_mean, running_var, mean, var, momentum, total)
        output, argmax = _ops._conv2d_batch_norm_relu_max_pool2d_epilogue(
            input, weight, conv_output, mean, var, bn_weight, bn_bias, eps, *geometry
        )
        # As the fused op: the input, the pre-norm convolution output, the statistics and the
        # one-byte argmax; never the normalised or the ReLU output.
        ctx.save_for_backward(input, weight, conv_output, mean, var, bn_weight, argmax)
        ctx.eps, ctx.geometry, ctx.group, ctx.count = eps, geometry, group, total
        ctx.parameter_dtypes = _parameter_dtypes(bn_weight, bn_bias)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, conv_output, mean, var, bn_weight, argmax = ctx.saved_tensors
        # Both phases walk the gradient channels last: one copy here rather than one in each.
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
        sum_dy, sum_dy_xmu = _ops._conv2d_batch_norm_relu_max_pool2d_backward_reduce(
            grad_output, input, weight, conv_output, mean, argmax, *ctx.geometry
        )
        grad_bn_weight, grad_bn_bias = _local_parameter_grads(
            sum_dy, sum_dy_xmu, var, ctx.eps, ctx.parameter_dtypes, ctx.needs_input_grad[3:5]
        )
        conv_mask = list(ctx.needs_input_grad[:3])
        grad_input = grad_weight = grad_bias = None
        if any(conv_mask):
            sum_dy, sum_dy_xmu = _sum_over_group(sum_dy, sum_dy_xmu, ctx.group)
            grad_input, grad_weight, grad_bias = _ops._conv2d_batch_norm_relu_max_pool2d_backward_elementwise(
                grad_output, input, weight, conv_output, mean, var, bn_weight, argmax,
                sum_dy, sum_dy_xmu, ctx.count, ctx.eps, *ctx.geometry, conv_mask,
            )  # fmt: skip
        return grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, None, None, None, None, None, None


def _autocast_conv_arguments(input: Tensor, weight: Tensor, bias: Tensor | None):
    """input, weight and bias in the autocast dtype where autocast is on, as the fused op's
    autocast kernel casts them (the batch-norm tensors stay as they are)."""
    device = input.device.type
    if not torch.is_autocast_enabled(device):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return input.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def sync_batch_norm(input, running_mean, running_var, weight, bias, momentum: float, eps: float, group) -> Tensor:
    """Training batch norm of ``input`` (``Tensor[N, C, *]``, this process's part of the batch)
    with the statistics of the whole batch over ``group``; the running statistics (if given)
    are updated in place. Every process of the group must call it, with the same C."""
    return _SyncBatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps, group)


def sync_conv2d_batch_norm_relu_max_pool2d(
    input,
    weight,
    bias,
    running_mean,
    running_var,
    bn_weight,
    bn_bias,
    momentum,
    eps,
    stride,
    padding,
    pool_size,
    pool_stride,
    ceil_mode,
    pool_padding,
    group,
) -> Tensor:
    """:func:`cifarnet.ops.conv2d_batch_norm_relu_max_pool2d` in training, with the batch
    statistics of the whole batch over ``group`` (``input``: this process's ``Tensor[N, C_in,
    H, W]``, N may be 0). Every process of the group must call it."""
    input, weight, bias = _autocast_conv_arguments(input, weight, bias)
    input, padding = conv_padding(input, weight, stride, padding)
    # ints, pairs or padding strings, as cifarnet.ops.conv2d_batch_norm_relu_max_pool2d takes them
    geometry = (
        pair(stride, "stride"),
        padding,
        pair(pool_size, "pool_size"),
        pool_stride_pair(pool_stride),
        check_bool(ceil_mode, "ceil_mode"),
        pair(pool_padding, "pool_padding"),
    )
    return _SyncConv2dBatchNormReLUMaxPool2d.apply(
        input, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps, geometry, group
    )
