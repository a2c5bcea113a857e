"""cifarnet: fused conv2d / batch norm / ReLU / max-pool ops for PyTorch (C++ and CUDA), their
drop-in modules, and the CIFAR-10 ConvNet study they speed up.

The library is what this package imports: :mod:`cifarnet.ops` (the functional ops),
:mod:`cifarnet.nn` (the modules) and :func:`fuse` / :func:`unfuse` (the model rewriter). The
study's application (its ConvNet, data, training and commands) is :mod:`cifarnet.study`,
which imports the library and is never imported by it.
"""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from cifarnet import _C  # noqa: F401  (registers the ops with the dispatcher)
from cifarnet import _cpu
from cifarnet import nn, ops
from cifarnet.fuse import fuse, unfuse  # NB: the functions shadow the module: import names from cifarnet.fuse

__version__ = "0.1.0"


def build_info() -> dict:
    """How the extension was built and what it runs on.

    Keys: ``cuda`` (CUDA kernels compiled in) and ``cuda_version``, ``torch_version`` (built
    against), ``cpu_isa`` (the instruction set the CPU kernels' vector loops run with here),
    ``parallel`` (threading), and ``cpu``: the CPU's ``model``, the instruction sets found
    (``isa``: AVX2, AVX-512, AVX512-BF16, AMX-BF16, ...) and ``last_level_cache_bytes``.
    """
    return {**_C.build_info(), "cpu": _cpu.cpu_info()}


__all__ = ["build_info", "fuse", "nn", "ops", "unfuse"]
