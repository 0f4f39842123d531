#!/usr/bin/env bash
# One prepared GPU session: build the extension, run the GPU tests, run the benchmarks, print a short table.
# Usage (on the lent machine, repo root): OUT=/some/dir MEGA_GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh [quick]
# after `bash benchmarks/gpu_wheels.sh` here (the parity reference's wheels; carry .whl).
# Budget: every step has its own timeout, so one hang cannot eat the rest, capped by DEADLINE below under the
# device tool's 600 s per command (run 2 took 364 s with the attention tests cut short); the last test step
# takes what is left;
# logs and JSON results land in $OUT (at most 8 files come back from the lent machine).
set -u
OUT=${OUT:-/tmp/mega_gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MEGA_BENCH_OUT=$OUT
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="9.0"
quick=${1:+--quick}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
# Each step's timeout is its own limit or what is left before DEADLINE (seconds after t0), whichever is less:
# a slow build (its wait) or step shortens the later ones instead of pushing the summary past the 600 s limit.
DEADLINE=${DEADLINE:-580}
cap() { local left=$(( DEADLINE - ($(date +%s) - t0) )); [ "$left" -lt 5 ] && left=5; echo $(( $1 < left ? $1 : left )); }
# as cap, but ending $2 seconds before DEADLINE (the last test step leaves the summary its time)
cap_leaving() { local t=$(( $(cap $(( $1 + $2 ))) - $2 )); [ "$t" -lt 5 ] && t=5; echo $t; }
PYTEST="python -m pytest -v --tb=short -p no:cacheprovider --continue-on-collection-errors"

stamp "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# pytest-xdist (in the image) spreads the compile-bound test steps over the CPU cores; each worker reuses the
# kernels another compiled through Triton's on-disk cache.
XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
# The parity reference, transformers 4.57.6, travels as wheels (fetch them here with benchmarks/gpu_wheels.sh and
# name .whl in the device tool's carry): the image's transformers 5.x has no MEGA. Only the parity step sees them.
PARITY_PATH=$PYTHONPATH
if ls .whl/transformers-4.57.6-*.whl > /dev/null 2>&1 && python -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/parity_site .whl/*.whl > /tmp/wheels.log 2>&1; then
  PARITY_PATH=/tmp/parity_site:$PYTHONPATH
else stamp "no parity wheels (.whl): the parity tests will fail to import transformers' MEGA"; fi

# 1. JIT-build the extension (CPU + CUDA) in the background while the Triton GPU tests run.
stamp "building the extension in the background"
( timeout 200 python -c "from mega_kernels import _ext; import torch; print(_ext.unavailable_reason(torch.device('cuda')) or 'extension OK')" \
    > "$OUT/build.log" 2>&1; echo "build rc=$?" >> "$OUT/build.log" ) &
build_pid=$!

# 2. GPU-marked Triton EMA / model tests first (quick), then the benchmarks (the figures the issues ask for),
#    then the slower-compiling attention and extension tests, so a late timeout costs tests, not figures.
#    -v prints each result as it comes, so a timeout still shows them.
# compute-sanitizer memcheck of tiny cases through every Triton kernel path, beside the GPU tests: it sees the
# out-of-bounds accesses whose results are never stored, which no value test can (benchmarks/memcheck_cases.py);
# without the caching allocator every tensor is its own allocation, so a read past one is seen.
stamp "memcheck (background, beside the GPU tests)"
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
( if [ -x "$SANITIZER" ]; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 80 "$SANITIZER" --tool memcheck --error-exitcode 9 python -m benchmarks.memcheck_cases > /tmp/memcheck.log 2>&1
    echo "memcheck rc=$? (9: errors found, 124: timed out)" >> /tmp/memcheck.log
  else echo "memcheck: compute-sanitizer not found" > /tmp/memcheck.log; fi ) &
memcheck_pid=$!

stamp "GPU tests (triton EMA, models)"
# (run 2: the EMA tests took ~20 s; the attention tests compile ~120 kernels and needed more than 120 s)
PYTHONPATH=$PARITY_PATH timeout $(cap 80) $PYTEST -m gpu tests/test_ema_triton.py tests/test_models_gpu.py tests/test_decoding.py tests/test_ema_tc.py \
    tests/test_ema_tc_bwd.py tests/test_parity_models.py > "$OUT/tests.log" 2>&1
echo "triton EMA/model gpu tests rc=$?" >> "$OUT/tests.log"

# 3. Benchmarks (JSON to $OUT), once the extension is built (bench_ema times the cuda backend too).
wait $build_pid
cat "$OUT/build.log" >> "$OUT/tests.log"
grep -q "extension OK" "$OUT/build.log" && ext_ok=1 || ext_ok=
wait $memcheck_pid
{ grep -E "Invalid|ERROR SUMMARY|memcheck|Error" /tmp/memcheck.log | head -40; } >> "$OUT/tests.log"  # (8 files come back)
stamp "bench_ema"
timeout $(cap 125) python -m benchmarks.bench_ema $quick > "$OUT/bench_ema.log" 2>&1; echo "bench_ema rc=$?" >> "$OUT/bench_ema.log"
stamp "bench_attention"
timeout $(cap 150) python -m benchmarks.bench_attention $quick > "$OUT/bench_attention.log" 2>&1; echo "bench_attention rc=$?" >> "$OUT/bench_attention.log"

stamp "GPU tests (triton attention)"
timeout $(cap 95) $PYTEST $XDIST -m gpu tests/test_attention_triton.py >> "$OUT/tests.log" 2>&1
echo "triton attention gpu tests rc=$?" >> "$OUT/tests.log"
# Run 2 segfaulted at the N = 33 refusal, after the opcheck and torch.compile tests of the same process, where
# a float64 refusal from the same C++ function had raised normally. The N = 33 tests first alone in a fresh
# process, then in the file's order (backend-generic tests first, so a crash costs only what follows it):
# a crash only in the second says the cause is state left by earlier tests, not the check.
# MEGA_NATIVE_STACKS (tests/conftest.py): a fatal signal also prints the C++ frames, not only Python's.
# Without a built extension these steps would each rebuild it inside their own limit: skipped instead.
if [ -n "$ext_ok" ]; then
  stamp "GPU tests (N = 33 refusals alone)"
  MEGA_NATIVE_STACKS=1 timeout $(cap 20) $PYTEST -m gpu tests/test_ema_cuda.py -k n33 >> "$OUT/tests.log" 2>&1
  echo "n33 alone rc=$?" >> "$OUT/tests.log"
  stamp "GPU tests (extension + backend-generic)"
  MEGA_NATIVE_STACKS=1 timeout $(cap 60) $PYTEST -m gpu tests/test_ema_backends.py tests/test_ema_cuda.py \
      >> "$OUT/tests.log" 2>&1
  echo "extension gpu tests rc=$?" >> "$OUT/tests.log"
else
  stamp "extension GPU tests skipped: the extension did not build (build.log)" | tee -a "$OUT/tests.log"
fi
grep -E "passed|failed|rc=|FAILED|ERROR" "$OUT/tests.log" | tail -16

# 4. The CLI check on the GPU.
stamp "mega-kernels check"
timeout $(cap 40) python -m mega_kernels.cli check --device cuda --op ema --op attention > "$OUT/check.log" 2>&1; echo "check rc=$?" >> "$OUT/check.log"
tail -4 "$OUT/check.log"

# 5. With the time left: the tests not marked gpu that run on CUDA tensors when a GPU is present (the Triton
#    modules' tiny-shape matrices and the backend-generic tests: odd sizes, masks, state, Lq = 1), compiled
#    instead of interpreted. They compile a kernel per shape class, so they come last and are spread by xdist.
stamp "GPU tests (not gpu-marked, compiled)"
# (without a built extension, test_ema_backends.py would rebuild it in every worker: left out then)
timeout $(cap_leaving 150 20) $PYTEST $XDIST -m "not gpu" ${ext_ok:+tests/test_ema_backends.py} tests/test_ema_triton.py \
    tests/test_ema_tc.py tests/test_ema_tc_bwd.py tests/test_triton_bfloat16.py tests/test_cross_attention_op.py \
    tests/test_attention_triton.py > /tmp/generic.log 2>&1
echo "compiled generic tests rc=$?" >> /tmp/generic.log
{ grep -E "FAILED|ERROR|Error" /tmp/generic.log | head -40; tail -3 /tmp/generic.log; } >> "$OUT/tests.log"
grep -E "rc=|passed|failed" /tmp/generic.log | tail -3

stamp "summary"  # from the saved JSON (rewritten after each shape), so a benchmark cut short is still judged:
# the target-shape rows, where their time goes, and each issue's targets (PASS / FAIL / n/a)
summary() {  # summary <results file prefix> <benchmark module>
  for f in "$OUT"/$1*.json; do [ -e "$f" ] && { echo "== $f"; timeout 30 python -m "benchmarks.$2" --summary "$f"; }; done
}
summary bench_ema bench_ema
summary attention bench_attention
stamp "done"
