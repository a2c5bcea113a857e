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
