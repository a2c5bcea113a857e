"""Drop-in modules over the fused ops, with torch.nn's parameter names and initialisation: one
module per layer (``cifarnet.nn.Conv2dReLUMaxPool2d`` is defined in
``cifarnet/nn/conv2d_relu_max_pool2d.py``), all importable from here."""

from cifarnet.nn.batch_norm import (
    BatchNorm1d,
    BatchNorm2d,
    batch_norm_arguments,
    batch_norm_sync_group,
    native_batch_norm2d,
    share_batch_norm_state,
)
from cifarnet.nn.batch_norm_relu_conv2d import BatchNormReLUConv2d, bn_relu_conv_unfusable_reason
from cifarnet.nn.conv2d_batch_norm_relu_max_pool2d import (
    BATCH_NORMS_2D,
    Conv2dBatchNormReLUMaxPool2d,
    conv2d_batch_norm_module_relu_max_pool2d,
    conv_bn_relu_pool_unfusable_reason,
)
from cifarnet.nn.conv2d_relu_max_pool2d import Conv2dReLUMaxPool2d, conv_relu_pool_unfusable_reason
from cifarnet.nn.dropout import Dropout
from cifarnet.nn.sync_batch_norm import SyncBatchNorm1d, SyncBatchNorm2d, SyncConv2dBatchNormReLUMaxPool2d, convert_sync_batchnorm

# The public modules; the rules and helpers above are imported from here by cifarnet.fuse and
# the study.
__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNormReLUConv2d",
    "Conv2dBatchNormReLUMaxPool2d",
    "Conv2dReLUMaxPool2d",
    "Dropout",
    "SyncBatchNorm1d",
    "SyncBatchNorm2d",
    "SyncConv2dBatchNormReLUMaxPool2d",
    "convert_sync_batchnorm",
]
