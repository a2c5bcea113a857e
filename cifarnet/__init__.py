"""cifarnet: fused conv2d / batch norm / ReLU / max-pool ops for PyTorch (C++ and CUDA), their
drop-in modules, and the CIFAR-10 ConvNet study they speed up."""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from cifarnet import _C  # noqa: F401  (registers the ops with the dispatcher)
from cifarnet import _meta_registrations  # noqa: F401
from cifarnet import nn, ops
from cifarnet.fuse import fuse, unfuse  # NB: the functions shadow the module: import names from cifarnet.fuse

__version__ = "0.1.0"


def build_info() -> dict:
    """How the extension was built: CUDA kernels compiled in, torch version, threading."""
    return _C.build_info()


__all__ = ["build_info", "fuse", "nn", "ops", "unfuse"]
