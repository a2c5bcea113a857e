#!/usr/bin/env bash
# The project's test command: the Python suite, then the C++ suite (CTest) against the same
# torch. Extra arguments go to pytest. Run from anywhere, inside the environment cifarnet is
# installed in.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pytest "$@"

torch_prefix=$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix"
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure
