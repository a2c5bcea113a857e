#!/usr/bin/env bash
# The project's test command: the import contract (lint-imports: imports only point down, no
# cycles; see pyproject.toml), the Python suite (pytest), then the C++ suite (CMake build and
# CTest) against the same torch. All always run. The exit status is non-zero if either failed,
# and the last line says which. Extra arguments go to pytest. Run from anywhere, inside the
# environment cifarnet is installed in.
set -uo pipefail
cd "$(dirname "$0")/.."

# Configures, builds and tests build/cmake. On failure, sets cpp_step to the step that failed.
cpp_suite() {
  local torch_prefix cuda_root
  cpp_step="finding torch's CMake prefix"
  torch_prefix=$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)') || return
  # The CUDA toolkit torch's CMake config looks for. Empty means none is usable, and CMake then
  # does without it. It is passed even when empty, so a value cached by an earlier run can't win.
  cpp_step="tools/cuda_toolkit.py"
  cuda_root=$(python tools/cuda_toolkit.py) || return
  cpp_step="CMake configure"
  cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" \
    -DCUDA_TOOLKIT_ROOT_DIR="$cuda_root" || return
  cpp_step="CMake build"
  cmake --build build/cmake || return
  cpp_step="CTest"
  ctest --test-dir build/cmake --output-on-failure
}

failed=()
lint-imports --no-cache || failed+=("lint-imports: the import contract (exit status $?)")
# The slowest tests are listed at the end, so that a CI log shows where its time went (a hung
# one fails after pyproject.toml's timeout instead).
python -m pytest --durations=15 "$@" || failed+=("pytest (exit status $?)")
cpp_suite || failed+=("C++ suite, at step: $cpp_step")

if ((${#failed[@]})); then
  printf 'run_tests.sh: FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "run_tests.sh: the import contract, pytest and the C++ suite passed"
