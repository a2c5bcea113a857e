#!/usr/bin/env bash
# The Python tests against a build of the extension with AddressSanitizer and
# UndefinedBehaviorSanitizer: an out-of-bounds access, a use after free or undefined behaviour
# in the CPU kernels aborts the run with the sanitizer's report. The tracked files of this
# working tree are copied to build/asan/src (CIFARNET_ASAN_TREE elsewhere) and built there
# without CUDA (about 15 minutes on two cores the first time, only what changed after). Run
# from anywhere, inside the environment torch is installed in, with pytest's arguments:
#   bash tools/asan.sh tests/test_winograd.py tests/test_batch_norm.py
#
# NB: the sanitizer runtimes must be loaded before anything else (LD_PRELOAD), libstdc++ with
# them, or the first C++ exception of an uninstrumented library (triton's import throws one)
# trips ASan's __cxa_throw interceptor. vptr checks are off: torch's own classes carry no
# sanitizer type information, so they would report its objects.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=${CIFARNET_ASAN_TREE:-build/asan/src}
mkdir -p "$tree"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$tree"  # keeps mtimes: ninja rebuilds what changed
sanitize="-fsanitize=address,undefined -fno-sanitize=vptr -fno-omit-frame-pointer"
(cd "$tree" && CFLAGS="$sanitize" LDFLAGS="-fsanitize=address,undefined" CIFARNET_CUDA=0 \
  python setup.py build_ext --inplace >"$PWD/asan_build.log" 2>&1) ||
  { echo "asan.sh: the sanitized build failed, see $tree/asan_build.log" >&2; exit 1; }
cd "$tree"
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)" \
  ASAN_OPTIONS="detect_leaks=0:${ASAN_OPTIONS:-}" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:${UBSAN_OPTIONS:-}" \
  python -m pytest -p no:cacheprovider "$@"
