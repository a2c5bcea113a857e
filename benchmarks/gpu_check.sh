#!/usr/bin/env bash
# The prepared GPU check, sized to one device call (BUDGET seconds, default 480): build the
# extension against the machine's torch, then in order of value until the budget runs out:
#   1. every CUDA test of the suite (tests whose id names cuda; torch.compile ones last),
#   2. benchmarks/gpu_cases.py --large (argmax bit for bit CPU vs CUDA, batch-norm statistics
#      over large counts, a pooling call over > 2**31 elements),
#   3. compute-sanitizer memcheck and racecheck over gpu_cases.py --small (every op, dtype and
#      layout over the geometries where index math breaks first), when the tool is there,
#   4. cifarnet-bench on CUDA (float32 and bfloat16, batch 128 and 1024) and whole training
#      steps, fused against every native configuration, eager, compiled and replayed from CUDA
#      graphs (benchmarks/train_steps.py, batch 128 and 1024).
# A step the budget no longer reaches is skipped and named in summary.json (steps_skipped_for_time).
# The CUDA tests include the launch-count budgets, the sync-debug runs and the graph replays.
# Writes $OUT/gpu_check.log, the step outputs, and $OUT/summary.json (tests passed/failed/
# skipped, case failures, sanitizer errors, benchmark ratios). Fails loudly (exit 1) when the
# build has no CUDA kernels, when every CUDA test was skipped, or when any step failed.
#
#   device run: bash benchmarks/gpu_check.sh        (timeout_s 560)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
rm -f "$OUT/skipped_steps"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 CIFARNET_EXAMPLES=${CIFARNET_EXAMPLES:-15}
DEADLINE=$((SECONDS + ${BUDGET:-480}))
status=0
step() { current_step="$*"; echo; echo "=== $* ($(date +%T), $((DEADLINE - SECONDS)) s left)"; }
# Runs the command after $1 for at most $1 seconds or what the budget has left (keeping 20 s for
# the summary); a step the budget no longer reaches is skipped and listed in skipped_steps.
within() {
  local limit=$1 left=$((DEADLINE - SECONDS - 20))
  shift
  ((left < limit)) && limit=$left
  if ((limit <= 0)); then
    echo "skipped: the budget is spent"
    echo "$current_step" >> "$OUT/skipped_steps"
    return 0
  fi
  timeout "$limit" "$@"
}
fail() { echo "gpu_check: FAILED: $*"; status=1; }
# STEPS picks the steps after the build (a rerun after a fix need not repeat them all).
STEPS=${STEPS:-tests large small sanitizer bench compile}
want() { [[ " $STEPS " == *" $1 "* ]]; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(), torch.cuda.get_device_name())"

# Python packages the machine lacks (expecttest, for the OpInfo samples), carried as wheels in
# .whl (device run carry [".whl"]); the machine has no network.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

step "build"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
python3 -m pip install --no-build-isolation --no-deps -q -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; echo "gpu_check: build failed"; exit 1; }
python3 -c "
import cifarnet, json, sys
info = {k: v for k, v in cifarnet.build_info().items() if k != 'parallel'}
print(json.dumps(info))
sys.exit(0 if info['cuda'] else 1)" || { echo "gpu_check: FAILED: the build has no CUDA kernels"; exit 1; }

if want tests; then
  step "CUDA tests"
  within 240 python3 -m pytest -q -p no:cacheprovider tests -k "cuda and not compile and not reduce_overhead" --timeout 120 \
    --junitxml="$OUT/tests.xml" -o junit_family=xunit1 2>&1 | tail -60 || fail "CUDA tests"
fi

if want large; then
  step "large cases"
  within 90 python3 benchmarks/gpu_cases.py --large --json "$OUT/cases_large.json" || fail "large cases"
fi

if want small; then
  step "small cases"
  within 90 python3 -X faulthandler benchmarks/gpu_cases.py --small --json "$OUT/cases_small.json" \
    > "$OUT/cases_small.log" 2>&1 || { grep -v "^ok" "$OUT/cases_small.log" | tail -40; fail "small cases"; }
  tail -1 "$OUT/cases_small.log"
fi

if ! want sanitizer; then
  :
elif command -v compute-sanitizer > /dev/null; then
  # Only cifarnet's own kernels are instrumented (cuDNN's and torch's run at full speed).
  filter=$(compute-sanitizer --help 2>&1 | grep -q -- --kernel-name && echo "--kernel-name kns=cifarnet")
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool"
    within 120 compute-sanitizer --tool "$tool" $filter --error-exitcode 3 \
      python3 -X faulthandler benchmarks/gpu_cases.py --small --json "$OUT/cases_$tool.json" > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|gpu_cases:|^FAIL" "$OUT/sanitizer_$tool.log" | head -20
    [ $rc = 0 ] || { tail -30 "$OUT/sanitizer_$tool.log"; fail "compute-sanitizer $tool (exit $rc)"; }
  done
else
  echo "compute-sanitizer not found: the small cases ran without it"
fi

for batch in 128 1024; do
  for dtype in float32 bfloat16; do
    want bench || break 2
    step "benchmark $dtype, batch $batch"
    within 60 python3 -m cifarnet.benchmark --device cuda --dtype "$dtype" --batch-size "$batch" --repeats 30 \
      --memory-format channels_last --no-compile --json "$OUT/bench_${dtype}_$batch.json" || fail "benchmark $dtype batch $batch"
  done
done

# The whole step against every native configuration (issue 23, item 4), interleaved in one run per
# batch size: eager, torch.compile (default; max-autotune-no-cudagraphs), replayed from CUDA graphs.
STEP_CONFIGS=native-fp32-cl,native-fp32-compile,native-fp32-cl-autotune,native-fp32-cl-graph,fused-fp32-cl,fused-fp32-cl-graph
STEP_CONFIGS=$STEP_CONFIGS,native-bf16-cl,native-bf16-cl-compile,native-bf16-cl-autotune,native-bf16-cl-graph,fused-bf16-cl,fused-bf16-cl-graph
for batch in 128 1024; do
  want bench || break
  step "training steps, batch $batch"
  within 120 python3 benchmarks/train_steps.py --device cuda --batch-size "$batch" --rounds 5 --steps 20 \
    --warmup 5 --configs "$STEP_CONFIGS" --json "$OUT/train_steps_$batch.json" || fail "training steps, batch $batch"
done

if want compile; then
  step "torch.compile tests"
  within 150 python3 -m pytest -q -p no:cacheprovider tests -k "cuda and (compile or reduce_overhead)" --timeout 120 \
    --junitxml="$OUT/tests_compile.xml" -o junit_family=xunit1 2>&1 | tail -20 || fail "torch.compile CUDA tests"
fi

step "summary"
python3 benchmarks/gpu_summary.py "$OUT" > "$OUT/summary.json" || fail "summary: no CUDA test ran, or it could not be read"
cat "$OUT/summary.json"
step "done: status $status"
exit $status
