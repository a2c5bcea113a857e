#!/usr/bin/env bash
# The project's test command: the Python suite, then the C++ suite (CTest) against the same
# torch. Extra arguments go to pytest. Run from anywhere, inside the environment cifarnet is
# installed in.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pytest "$@"

torch_prefix=$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
# A CUDA build of torch makes find_package(Torch) look for the toolkit; name it explicitly so a
# stale cache entry cannot win.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME"
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure
