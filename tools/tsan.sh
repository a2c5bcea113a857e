#!/usr/bin/env bash
# The C++ tests (tests/cpp/test_ops.cpp) under ThreadSanitizer, with two OpenMP threads: a data
# race between the CPU kernels' threads fails the run. Builds build/tsan (a few minutes the
# first time). Run from anywhere, inside the environment torch is installed in. Exit status:
# non-zero on a race report or a failed check.
#
# NB: torch's libgomp is not instrumented, so TSan cannot see its barriers:
# tests/cpp/tsan_openmp.cpp, linked into this build only, tells TSan where OpenMP regions start
# and end. The address space is unrandomised (setarch -R): TSan's shadow memory needs the fixed
# layout that high-entropy ASLR on recent kernels breaks.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_prefix=$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build/tsan -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCIFARNET_SANITIZER=thread -DCUDA_TOOLKIT_ROOT_DIR="$(python tools/cuda_toolkit.py)" >/dev/null
cmake --build build/tsan --target test_cifarnet_ops -- -j"${MAX_JOBS:-2}"
OMP_NUM_THREADS=2 TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1 ${TSAN_OPTIONS:-}" \
  setarch "$(uname -m)" -R build/tsan/test_cifarnet_ops "$@"
