"""Autograd formulas of the ops (``torch.library.register_autograd``).

The forward saves only what its backward op needs: for conv2d -> ReLU -> max_pool2d, the
input, the weight and the one-byte window argmax (never the pre-pool activation).
"""

from __future__ import annotations

import torch


def _conv2d_relu_max_pool2d_setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode = inputs
    _, argmax = output
    ctx.save_for_backward(input, weight, argmax)
    ctx.geometry = (stride, padding, pool_size, pool_stride, ceil_mode)
    ctx.has_bias = bias is not None


def _conv2d_relu_max_pool2d_backward(ctx, grad_output, grad_argmax):
    input, weight, argmax = ctx.saved_tensors
    output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grad_input = grad_weight = grad_bias = None
    if any(output_mask):
        grad_input, grad_weight, grad_bias = torch.ops.cifarnet._conv2d_relu_max_pool2d_backward.default(
            grad_output, input, weight, argmax, *ctx.geometry, output_mask
        )
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


torch.library.register_autograd(
    "cifarnet::conv2d_relu_max_pool2d_with_argmax",
    _conv2d_relu_max_pool2d_backward,
    setup_context=_conv2d_relu_max_pool2d_setup_context,
)


def _batch_norm_forward_setup_context(ctx, inputs, output):
    input, mean, var, weight, bias, training, eps = inputs
    _, save_mean, save_var = output
    ctx.mark_non_differentiable(save_mean, save_var)
    ctx.save_for_backward(input, save_mean, save_var, weight)
    ctx.training, ctx.eps = training, eps
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _batch_norm_forward_backward(ctx, grad_output, grad_save_mean, grad_save_var):
    input, save_mean, save_var, weight = ctx.saved_tensors
    output_mask = [
        ctx.needs_input_grad[0],
        ctx.has_weight and ctx.needs_input_grad[3],
        ctx.has_bias and ctx.needs_input_grad[4],
    ]
    grad_input = grad_weight = grad_bias = None
    if any(output_mask):
        grad_input, grad_weight, grad_bias = torch.ops.cifarnet._batch_norm_backward.default(
            grad_output, input, save_mean, save_var, weight, ctx.training, ctx.eps, output_mask
        )
    # The running statistics are buffers: no gradient flows to them.
    return grad_input, None, None, grad_weight, grad_bias, None, None


torch.library.register_autograd(
    "cifarnet::_batch_norm_forward",
    _batch_norm_forward_backward,
    setup_context=_batch_norm_forward_setup_context,
)


def _conv2d_batch_norm_relu_max_pool2d_training_setup_context(ctx, inputs, output):
    input, weight, bias, bn_weight, bn_bias, eps, stride, padding, pool_size, pool_stride, ceil_mode = inputs
    _, argmax, conv_output, save_mean, save_var = output
    ctx.mark_non_differentiable(argmax, conv_output, save_mean, save_var)
    # The input, the pre-normalisation convolution output, the statistics and the one-byte
    # argmax: neither the normalised nor the ReLU output is kept.
    ctx.save_for_backward(input, weight, conv_output, save_mean, save_var, bn_weight, argmax)
    ctx.eps = eps
    ctx.geometry = (stride, padding, pool_size, pool_stride, ceil_mode)
    ctx.has = (bias is not None, bn_weight is not None, bn_bias is not None)


def _conv2d_batch_norm_relu_max_pool2d_training_backward(ctx, grad_output, *grads_of_saved):
    input, weight, conv_output, save_mean, save_var, bn_weight, argmax = ctx.saved_tensors
    has_bias, has_bn_weight, has_bn_bias = ctx.has
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[1], has_bias and needs[2], has_bn_weight and needs[3], has_bn_bias and needs[4]]
    grads = [None] * 5
    if any(output_mask):
        grads = torch.ops.cifarnet._conv2d_batch_norm_relu_max_pool2d_training_backward.default(
            grad_output,
            input,
            weight,
            conv_output,
            save_mean,
            save_var,
            bn_weight,
            argmax,
            ctx.eps,
            *ctx.geometry,
            output_mask,
        )
    return (*grads, None, None, None, None, None, None)


torch.library.register_autograd(
    "cifarnet::_conv2d_batch_norm_relu_max_pool2d_training",
    _conv2d_batch_norm_relu_max_pool2d_training_backward,
    setup_context=_conv2d_batch_norm_relu_max_pool2d_training_setup_context,
)
