"""Builds cifarnet._C with torch.utils.cpp_extension and ninja.

Environment (none of it needed: by default the build finds a usable CUDA toolkit by itself,
see tools/cuda_toolkit.py, and builds the CPU kernels only, saying why, when there is none):
  CIFARNET_CUDA=0        build the CPU kernels only, even where a CUDA toolkit is installed.
  CIFARNET_CUDA=1        require the CUDA kernels: fail with the reason when they cannot be built.
  CUDA_HOME              the CUDA toolkit to try first.
  TORCH_CUDA_ARCH_LIST   GPU targets. Default: the visible GPUs' own, and on a machine without
                         one every target of torch's own CUDA build (the targets it was compiled
                         for, e.g. 7.5;8.0;8.6;9.0;10.0;12.0+PTX; see
                         tools/cuda_toolkit.torch_cuda_arch_names), so an extension built on a login
                         node runs on whichever GPU torch itself runs on. One target is
                         several times faster to compile (CI sets 9.0).
  MAX_JOBS               parallel compile jobs (ninja).

Build against the torch you run: `pip install --no-build-isolation .` after installing torch
(see docs/build.md); a second torch inside an isolated build environment is the classic cause of
undefined-symbol errors at import.
"""

import glob
import os
import sys

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_toolkit import (  # noqa: E402
    all_targets_notice,
    arch_list_of,
    find_cuda_toolkit,
    tell_user,
    torch_cuda_arch_names,
    torch_cuda_major,
)


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def nvidia_wheel_include_dirs():
    """Include folders of the nvidia-* wheels a CUDA build of torch from PyPI depends on.

    ATen's CUDA headers include cuBLAS', cuSPARSE's and cuDNN's; a toolkit with only nvcc and
    the runtime (as on CI) lacks them, while these wheels carry them.
    """
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(d for root in spec.submodule_search_locations for d in glob.glob(os.path.join(root, "*", "include")))


def cuda_toolkit_root():
    """The CUDA toolkit to compile the CUDA kernels with, or None to build the CPU kernels only."""
    request = os.environ.get("CIFARNET_CUDA", "")
    if request not in ("", "0", "1"):
        sys.exit(f"cifarnet: CIFARNET_CUDA must be 0, 1 or unset, got {request!r}")
    if request == "0":
        return None
    torch_major = torch_cuda_major()
    if torch_major is None:
        import torch

        reason = f"torch {torch.__version__} is a CPU-only build"
    else:
        search = find_cuda_toolkit(torch_major)
        if search.root is not None:
            print(f"cifarnet: compiling the CUDA kernels with CUDA {search.version} at {search.root}")
            return search.root
        reason = f"no usable CUDA {torch_major}.x toolkit ({search.explain()})"
    if request == "1":
        sys.exit(f"cifarnet: CIFARNET_CUDA=1 asks for the CUDA kernels, but {reason}")
    print(f"cifarnet: {reason}: building the CPU kernels only")
    return None


def extension():
    cpp_sources = sources("csrc/**/*.cpp")
    cuda_sources = sources("csrc/**/*.cu")
    cuda_root = cuda_toolkit_root()
    use_cuda = cuda_root is not None
    # -Wno-psabi: the vector loops pass 64-byte vectors between always-inlined functions, for
    # which GCC warns about an ABI that never comes into play.
    cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi"]
    link_flags = ["-fopenmp"]
    if not use_cuda:
        return cpp_extension.CppExtension(
            "cifarnet._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    import torch

    # NB: torch's extension builder reads its module-level guess, not the environment, when it
    # compiles and links; both are set so that nvcc and libcudart come from the same toolkit.
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_root
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        arch_list = arch_list_of(torch_cuda_arch_names())
        if arch_list is None:
            sys.exit(f"cifarnet: no GPU visible and torch {torch.__version__} names no CUDA targets; set TORCH_CUDA_ARCH_LIST")
        tell_user(all_targets_notice(len(cuda_sources), arch_list))
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    cuda_version = torch.version.cuda or "unknown"
    defines = ["-DCIFARNET_WITH_CUDA", f'-DCIFARNET_CUDA_VERSION="{cuda_version}"']
    return cpp_extension.CUDAExtension(
        "cifarnet._C",
        cpp_sources + cuda_sources,
        include_dirs=nvidia_wheel_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": ["-O3", "--expt-relaxed-constexpr"] + defines},
        extra_link_args=link_flags,
    )


class BuildExtension(cpp_extension.BuildExtension):
    """ninja build whose objects persist in build/ (pip would use a fresh temp dir each time),
    so reinstalling an unchanged tree compiles nothing and an edit recompiles one file."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
