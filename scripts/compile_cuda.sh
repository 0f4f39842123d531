#!/usr/bin/env bash
# Compile-only check of the CUDA sources, for machines without a GPU (CI): every csrc/**/*.cu is compiled by
# nvcc for sm_80 and sm_90 (the .cu files are torch-free), and the torch glue of the CUDA ops
# (csrc/**/*_cuda_ops.cpp) is syntax-checked with the host compiler against the installed torch headers
# (a CPU-only torch lacks c10/cuda's generated cuda_cmake_macros.h; an empty stand-in is supplied).
# Fails on the first compiler error. Usage: bash scripts/compile_cuda.sh   (NVCC=/path/to/nvcc to override)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ -x "$NVCC" ] || { echo "compile_cuda.sh: nvcc not found (set NVCC=...)" >&2; exit 1; }
CUDA_INC=
for d in "${CUDA_HOME:-/nonexistent}" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
  if [ -f "$d/include/cuda_runtime.h" ]; then CUDA_INC=$d/include; break; fi
done
[ -n "$CUDA_INC" ] || { echo "compile_cuda.sh: cuda_runtime.h not found (set CUDA_HOME)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mapfile -t cu_files < <(find csrc -name '*.cu' | sort)
[ ${#cu_files[@]} -gt 0 ] || { echo "compile_cuda.sh: no .cu files under csrc/" >&2; exit 1; }
for f in "${cu_files[@]}"; do
  echo "nvcc sm_80 sm_90: $f"
  # -Werror all-warnings: e.g. a __host__ call from device code is only a warning, and the kernel is dropped
  "$NVCC" -std=c++20 -O3 -Werror all-warnings -c "$f" -o "$tmp/$(basename "$f").o" -Icsrc \
    -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
done

mapfile -t glue < <(find csrc -name '*_cuda_ops.cpp' | sort)
if [ ${#glue[@]} -gt 0 ]; then
  torch_inc=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
  mkdir -p "$tmp/stub/c10/cuda/impl"
  [ -f "$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')/include/c10/cuda/impl/cuda_cmake_macros.h" ] \
    || echo '#pragma once' > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
  for f in "${glue[@]}"; do
    echo "c++ -fsyntax-only: $f"
    # shellcheck disable=SC2086
    ${CXX:-c++} -std=c++20 -fsyntax-only $torch_inc -I"$tmp/stub" -I"$CUDA_INC" -Icsrc "$f"
  done
fi
echo "compile_cuda.sh: all CUDA sources compiled"
