"""Functional API of the fused ops: thin wrappers over ``torch.ops.cifarnet``.

Each function normalises its arguments to the op schema and calls the op through the
dispatcher, so autograd, ``torch.compile`` and device kernels come with it. Like torch's own
functionals, each first hands ``__torch_function__`` overrides (a ``torch.fx`` Proxy, a tensor
subclass, a TorchFunctionMode) the call itself: the Python around the op (unbatched inputs)
branches on the input, which a ``torch.fx`` trace could not follow.

One module per op holds its wrapper, the fake kernels of its private ops (shapes, dtypes and
strides for ``torch.compile``) and its ONNX translation.
"""

from cifarnet.ops import _onnx
from cifarnet.ops.batch_norm import batch_norm
from cifarnet.ops.batch_norm_relu_conv2d import batch_norm_relu_conv2d
from cifarnet.ops.conv2d_batch_norm_relu_max_pool2d import conv2d_batch_norm_relu_max_pool2d
from cifarnet.ops.conv2d_relu_max_pool2d import conv2d_relu_max_pool2d
from cifarnet.ops.dropout import dropout, dropout_seed

_onnx.register_when_exporting()  # NB: after every op module has added its translations

__all__ = [
    "batch_norm",
    "batch_norm_relu_conv2d",
    "conv2d_batch_norm_relu_max_pool2d",
    "conv2d_relu_max_pool2d",
    "dropout",
    "dropout_seed",
]
