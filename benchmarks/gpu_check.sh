#!/usr/bin/env bash
# The prepared GPU check: build the extension against the machine's torch, run the whole test
# suite (every op test runs on CUDA there), cifarnet-bench on CUDA for batch 128 and 1024 in
# float32 and bfloat16, and 200 training steps of the `full` ConvNet both ways. Writes
# $OUT/gpu_check.log and JSON results under $OUT. Sized to finish in well under ten minutes.
#
#   device run: bash benchmarks/gpu_check.sh        (timeout_s 540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 CIFARNET_EXAMPLES=${CIFARNET_EXAMPLES:-60}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

step "build"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
python3 -m pip install --no-build-isolation --no-deps -q -e . || exit 1
python3 -c "import cifarnet, json; print(json.dumps({k: v for k, v in cifarnet.build_info().items() if k != 'parallel'}))"

step "tests"
python3 -m pytest -q -x -p no:cacheprovider tests --junitxml="$OUT/tests.xml" || status=1

step "benchmarks"
# torch.compile'd native at batch 128 only: each shape is a fresh compilation, and 72 of them
# would not fit the time box.
for dtype in float32 bfloat16; do
  for batch in 128 1024; do
    compile=$([ "$batch" = 128 ] || echo --no-compile)
    python3 -m cifarnet.benchmark --device cuda --dtype "$dtype" --batch-size "$batch" --repeats 30 \
      --memory-format channels_last $compile --json "$OUT/bench_${dtype}_${batch}.json" || status=1
  done
done

step "training steps"
python3 benchmarks/train_steps.py --device cuda --steps 200 --channels-last --json "$OUT/train_steps.json" || status=1

step "done: status $status"
exit $status
