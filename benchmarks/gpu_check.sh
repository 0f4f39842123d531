#!/usr/bin/env bash
# One prepared GPU session: build the extension, run the GPU tests, run the benchmarks, print a short table.
# Usage (on the lent machine, repo root): OUT=/some/dir bash benchmarks/gpu_check.sh [quick]
# Budget: about 5-6 minutes on an H100/H200. Every step has its own timeout so one hang cannot eat the rest;
# logs and JSON results land in $OUT.
set -u
OUT=${OUT:-/tmp/mega_gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MEGA_BENCH_OUT=$OUT
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="9.0"
quick=${1:+--quick}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

stamp "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

# 1. JIT-build the extension (CPU + CUDA) in the background while the Triton tests run.
stamp "building the extension in the background"
( timeout 180 python -c "from mega_kernels import _ext; import torch; print(_ext.unavailable_reason(torch.device('cuda')) or 'extension OK')" \
    > "$OUT/build.log" 2>&1; echo "build rc=$?" >> "$OUT/build.log" ) &
build_pid=$!

# 2. Triton tests on the GPU (bfloat16 included), then the extension's GPU tests once it is built.
stamp "triton GPU tests"
timeout 120 python -m pytest -q --no-header -p no:cacheprovider tests/test_ema_triton.py tests/test_ema_backends.py \
    tests/test_attention_triton.py -k "not slow" > "$OUT/tests_triton.log" 2>&1
echo "triton tests rc=$?" >> "$OUT/tests_triton.log"
tail -3 "$OUT/tests_triton.log"
wait $build_pid
tail -2 "$OUT/build.log"
stamp "cuda/gpu tests"
timeout 75 python -m pytest -q --no-header -p no:cacheprovider --continue-on-collection-errors -m gpu tests > "$OUT/tests_gpu.log" 2>&1
echo "gpu tests rc=$?" >> "$OUT/tests_gpu.log"
tail -3 "$OUT/tests_gpu.log"

# 3. Benchmarks (JSON to $OUT).
stamp "bench_ema"
timeout 100 python -m benchmarks.bench_ema $quick > "$OUT/bench_ema.log" 2>&1; echo "bench_ema rc=$?" >> "$OUT/bench_ema.log"
stamp "bench_attention"
timeout 130 python -m benchmarks.bench_attention $quick > "$OUT/bench_attention.log" 2>&1; echo "bench_attention rc=$?" >> "$OUT/bench_attention.log"

# 4. The CLI check on the GPU.
stamp "mega-kernels check"
timeout 45 python -m mega_kernels.cli check --device cuda > "$OUT/check.log" 2>&1; echo "check rc=$?" >> "$OUT/check.log"
tail -4 "$OUT/check.log"

stamp "summary"
for f in bench_ema bench_attention; do echo "== $f"; grep -vE "^\s*$" "$OUT/$f.log" | tail -45; done
stamp "done"
