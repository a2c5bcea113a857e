#!/usr/bin/env bash
# Builds cifarnet against another torch release and runs the whole test suite with it (pytest and
# the C++ suite, tools/run_tests.sh), to check an end of the supported range (pyproject.toml)
# without the machine that has it. Usage, from the environment cifarnet is developed in:
#
#   tools/check_torch_release.sh 2.11.0 [pytest arguments]
#
# The release gets a virtual environment of its own under build/torch-<release>/ (git ignores
# build/): torch and the matching torchvision from PyPI without their dependencies (about 0.5 GB
# instead of several), the rest of cifarnet's dependencies, and the nvidia-* CUDA libraries of
# the current environment (the same CUDA major version) rather than a second copy. The source is
# a clone of HEAD, so the build shares nothing with the working tree's.
set -euo pipefail
release=${1:?usage: tools/check_torch_release.sh TORCH_RELEASE [pytest arguments]}
shift
cd "$(dirname "$0")/.."
root=$PWD/build/torch-$release
# torchvision 0.N pairs with torch 2.(N - 15): 0.26 with 2.11, 0.29 with 2.14.
minor=$(cut -d. -f2 <<<"$release")
torchvision="0.$((minor + 15)).*"
site_packages=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
nvidia_libraries=$(find "$site_packages/nvidia" -mindepth 2 -maxdepth 2 -name lib -printf '%p:' 2>/dev/null || true)
if [ -z "$nvidia_libraries" ]; then
  echo "check_torch_release.sh: no nvidia-* wheels in $site_packages; run it from the environment" \
    "cifarnet is developed in, whose CUDA build of torch brought them" >&2
  exit 1
fi

if [ ! -x "$root/venv/bin/python" ]; then
  python -m venv "$root/venv"
  "$root/venv/bin/pip" install -q --no-deps "torch==$release" "torchvision==$torchvision"
  "$root/venv/bin/pip" install -q numpy tqdm matplotlib pillow sympy networkx jinja2 filelock fsspec \
    typing_extensions setuptools wheel ninja pytest hypothesis pytest-benchmark pytest-timeout cmake onnx \
    onnxscript onnxruntime expecttest "import-linter>=2.1"
  # Last on sys.path: only what the new environment lacks (the nvidia-* packages) comes from here.
  echo "$site_packages" >"$root/venv/lib/$(basename "$(dirname "$site_packages")")/site-packages/zz-nvidia-wheels.pth"
fi
rm -rf "$root/src"
git clone -q . "$root/src"
[ -d ../shared ] && ln -sfn "$(realpath ../shared)" "$root/shared"  # the real-data tests' ../shared
cd "$root/src"
export PATH=$root/venv/bin:$PATH LD_LIBRARY_PATH=${nvidia_libraries}${LD_LIBRARY_PATH:-}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # one GPU target: a check, not a build to ship
pip install -q --no-build-isolation --no-deps -e .
python -c 'import cifarnet, torch
info = cifarnet.build_info()
print("cifarnet built against torch", info["torch_version"], "(running", torch.__version__ + "), CUDA kernels:", info["cuda"])'
bash tools/run_tests.sh "$@"
