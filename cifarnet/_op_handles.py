"""The internal dispatcher ops under the public functions, as handles, for the tests and
benchmark scripts that call them directly (one list, so a renamed op breaks every caller at
import)."""

from __future__ import annotations

import torch

import cifarnet._C  # noqa: F401  (registers the ops)

WITH_ARGMAX_OP = torch.ops.cifarnet.conv2d_relu_max_pool2d_with_argmax.default
CONV_BACKWARD_OP = torch.ops.cifarnet._conv2d_relu_max_pool2d_backward.default
BN_FORWARD_OP = torch.ops.cifarnet._batch_norm_forward.default
BN_BACKWARD_OP = torch.ops.cifarnet._batch_norm_backward.default
TRAINING_OP = torch.ops.cifarnet._conv2d_batch_norm_relu_max_pool2d_training.default
TRAINING_BACKWARD_OP = torch.ops.cifarnet._conv2d_batch_norm_relu_max_pool2d_training_backward.default
BN_RELU_CONV_TRAINING_OP = torch.ops.cifarnet._batch_norm_relu_conv2d_training.default
BN_RELU_CONV_TRAINING_BACKWARD_OP = torch.ops.cifarnet._batch_norm_relu_conv2d_training_backward.default
