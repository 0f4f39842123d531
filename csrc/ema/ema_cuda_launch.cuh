// CUDA kernels of the EMA and their launchers (maths: ema_kernels.cuh), instantiated once per I/O dtype by
// ema_cuda_f32.cu, ema_cuda_f16.cu and ema_cuda_bf16.cu (three translation units the build compiles in
// parallel; one held all 488 kernels, ~150 s of nvcc per architecture); ema_cuda.cu dispatches on the dtype.
// Torch-free: scripts/compile_cuda.sh compiles the .cu files with nvcc alone; ema_cuda_ops.cpp is the torch glue.
//
// Forward: a chunked scan, x read twice and y written once, no atomics or inter-block waiting.
//   1. local:  thread (b, direction, channel d, chunk of T steps) sums its chunk's input (u = q u + xm) and
//              stores the end state from 0, a u (N floats), in the workspace; bidirectional without
//              truncation, one thread (b, d, chunk) does both directions from one read of the chunk;
//   2. prefix: thread (b, direction, d, group of kPrefixStates states) walks its chunks in the direction's
//              order, replacing each end state by the state entering that chunk: p <- q^len p + a u (len: the
//              chunk's length; p starts from `state`), loading a group of chunks ahead (walk_chunks);
//   3. output: thread (b, d, chunk) reruns the chunk from its entering state and writes y; for a
//              bidirectional EMA it first runs the backward direction over the same times into shared memory.
//              It keeps the scaled state g = h / a' (two multiply-adds per state and step; ema_kernels.cuh).
// Every sweep over time (forward phases 1 and 3, backward phases 1, 3, 4 and 6 and the bidirectional output)
// loads its rows a group ahead of the arithmetic (sweep_rows, ema_cuda_threads.cuh); each case of (mask
// given, K > 0) is its own kernel (template arguments MASK, TRUNC; the adjoint's, which read g, not x, only
// TRUNC), so no case pays the registers or the tests of another.
// Backward: the same chunking for every sweep of "Backward" in ema_kernels.cuh: (1) each chunk's H and
// P from zero, (2) a prefix pass for the (h, H, P) entering each chunk (a thread per group of kPrefixStates
// states), [bidirectional: the backward direction's output into g's buffer], (3) per chunk the parameter
// sweep (g formed by direction 0; H and P = a' Ps, with h = a H unless a state is given; more than
// kParamStates states: g first, then the sums kParamStates states at a time) with partial sums per
// (b, chunk), (4-5) the adjoint carry per chunk (scaled, mu = lam / c') and its prefix pass from the later
// side, (6) the adjoint output and dx. The caller sums the partials over (b, chunk) in a fixed order.
// Phase 3 is a kernel per pass (ParamPass: with or without a state, bidirectional, direction 1).
// States and coefficients are float32 registers, zero-padded to NM >= N.
#pragma once
#include <cuda_runtime.h>

#include "ema_cuda_threads_bwd.cuh"

namespace mega_kernels {
namespace ema {
namespace cuda {
namespace {

// MASK, TRUNC: a mask is given, K > 0 (the sweep variant; pick_sweep in ema_cuda_threads.cuh).
template <typename T, int NM, bool MASK, bool TRUNC>
__global__ void fwd_local_kernel(FwdParams p, Plan plan) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x, ndir = p.bi ? 2 : 1;
  if (d < p.D) fwd_local_thread<T, NM, MASK, TRUNC>(p, plan, blockIdx.y / ndir, blockIdx.y % ndir, d, blockIdx.z);
}

template <typename T, int NM, bool MASK>
__global__ void fwd_local_both_kernel(FwdParams p, Plan plan) {  // bidirectional, no truncation
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d < p.D) fwd_local_both_thread<T, NM, MASK>(p, plan, blockIdx.y, d, blockIdx.z);
}

template <int NM>
__global__ void fwd_prefix_kernel(FwdParams p, Plan plan) {  // grid z: the groups of kPrefixStates states
  const int d = blockIdx.x * blockDim.x + threadIdx.x, ndir = p.bi ? 2 : 1;
  if (d < p.D) fwd_prefix_thread<NM>(p, plan, blockIdx.y / ndir, blockIdx.y % ndir, d, blockIdx.z * kPrefixStates);
}

template <typename T, int NM, bool BI, bool MASK, bool TRUNC>
__global__ void fwd_out_kernel(FwdParams p, Plan plan) {
  extern __shared__ float ebuf[];  // [chunk step][thread]: the backward direction's output
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d < p.D)
    fwd_out_thread<T, NM, BI, MASK, TRUNC>(p, plan, blockIdx.y, d, blockIdx.z, ebuf + threadIdx.x, blockDim.x);
}

// Backward kernels: grid (channel blocks, B or B * directions, chunks), as the forward's.
#define MK_BWD_CHANNEL const int d = blockIdx.x * blockDim.x + threadIdx.x; \
  if (d >= p.D) return;                                                      \
  const int ndir = p.bi ? 2 : 1;                                             \
  (void)ndir
template <typename T, int NM, bool MASK, bool TRUNC>
__global__ void bwd_local_kernel(BwdParams p, Plan plan) {
  MK_BWD_CHANNEL;
  bwd_local_thread<T, NM, MASK, TRUNC>(p, plan, blockIdx.y / ndir, blockIdx.y % ndir, d, blockIdx.z);
}
template <int NM>
__global__ void bwd_prefix_kernel(BwdParams p, Plan plan) {
  MK_BWD_CHANNEL;
  bwd_prefix_thread<NM>(p, plan, blockIdx.y / ndir, blockIdx.y % ndir, d, blockIdx.z * kPrefixStates);
}
template <typename T, int NM, bool MASK, bool TRUNC>
__global__ void bwd_other_output_kernel(BwdParams p, Plan plan) {
  MK_BWD_CHANNEL;
  bwd_other_output_thread<T, NM, MASK, TRUNC>(p, plan, blockIdx.y, d, blockIdx.z);
}
template <typename T, int NM, bool MASK, bool TRUNC, int PASS>
__global__ void bwd_params_kernel(BwdParams p, Plan plan) {
  MK_BWD_CHANNEL;
  bwd_params_thread<T, NM, MASK, TRUNC, PASS>(p, plan, blockIdx.y, d, blockIdx.z);
}
template <int NM, bool TRUNC>
__global__ void bwd_adjoint_local_kernel(BwdParams p, Plan plan) {
  MK_BWD_CHANNEL;
  bwd_adjoint_local_thread<NM, TRUNC>(p, plan, blockIdx.y / ndir, blockIdx.y % ndir, d, blockIdx.z);
}
template <int NM>
__global__ void bwd_adjoint_prefix_kernel(BwdParams p, Plan plan) {
  MK_BWD_CHANNEL;
  bwd_adjoint_prefix_thread<NM>(p, plan, blockIdx.y / ndir, blockIdx.y % ndir, d, blockIdx.z * kPrefixStates);
}
template <typename T, int NM, bool TRUNC>
__global__ void bwd_dx_kernel(BwdParams p, Plan plan) {
  MK_BWD_CHANNEL;
  bwd_dx_thread<T, NM, TRUNC>(p, plan, blockIdx.y, d, blockIdx.z);
}
#undef MK_BWD_CHANNEL

template <typename T, int NM>
__global__ void step_kernel(StepParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < static_cast<int64_t>(p.B) * p.D) step_thread<T, NM>(p, i);
}

// The error of the launch just made (a bad configuration is reported here, synchronously), else nullptr.
// Checked after every launch, so a failed launch never lets the later phases run on a half-written workspace.
const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
#define MK_LAUNCH(...)                                 \
  do {                                                 \
    __VA_ARGS__;                                       \
    if (const char* err_ = launch_error()) return err_; \
  } while (0)

// Sizes the grids cannot hold. The torch glue refuses them with a clearer message before allocating
// (check_cuda_args, ema_checks.h); this is the launchers' own guard for any other caller.
const char* grid_error(int B, int L, int D, bool bi) {
  if (B < 1 || L < 1 || D < 1) return "ema (cuda): empty input reached a launcher (B, L and D must be >= 1)";
  const Geometry g = geometry(B, L, D, bi);
  if (g.rows > kMaxGridYZ) return "ema (cuda): B * directions exceeds the grid limit of 65535";
  if (g.fwd_chunks > kMaxGridYZ || g.bwd_chunks > kMaxGridYZ)
    return "ema (cuda): L needs more than 65535 chunks (the grid limit)";
  return nullptr;
}

template <typename T, int NM, bool MASK, bool TRUNC>
const char* fwd_sweeps(const FwdParams& p, cudaStream_t s) {
  const Plan plan = fwd_plan(p.B, p.L, p.D, p.bi);
  const int ndir = p.bi ? 2 : 1, xb = (p.D + kThreads - 1) / kThreads;
  if (p.bi && !TRUNC)  // both directions from one read of x
    MK_LAUNCH(fwd_local_both_kernel<T, NM, MASK><<<dim3(xb, p.B, plan.nchunks), kThreads, 0, s>>>(p, plan));
  else
    MK_LAUNCH(fwd_local_kernel<T, NM, MASK, TRUNC><<<dim3(xb, p.B * ndir, plan.nchunks), kThreads, 0, s>>>(p, plan));
  MK_LAUNCH(fwd_prefix_kernel<NM><<<dim3(xb, p.B * ndir, prefix_groups<NM>()), kThreads, 0, s>>>(p, plan));
  if (p.bi) {
    const size_t smem = sizeof(float) * kThreads * plan.chunk;  // plan.chunk <= kBiChunk: within 48 KiB
    MK_LAUNCH(fwd_out_kernel<T, NM, true, MASK, TRUNC><<<dim3(xb, p.B, plan.nchunks), kThreads, smem, s>>>(p, plan));
  } else {
    MK_LAUNCH(fwd_out_kernel<T, NM, false, MASK, TRUNC><<<dim3(xb, p.B, plan.nchunks), kThreads, 0, s>>>(p, plan));
  }
  return nullptr;
}

template <typename T, int NM>
const char* fwd(const FwdParams& p, cudaStream_t s) {
  if (const char* err = grid_error(p.B, p.L, p.D, p.bi)) return err;
  return pick_sweep(p.mask != nullptr, p.K > 0, [&](auto mask, auto trunc) {
    return fwd_sweeps<T, NM, decltype(mask)::value, decltype(trunc)::value>(p, s);
  });
}

template <typename T, int NM>
const char* bwd(const BwdParams& p, cudaStream_t s) {
  if (const char* err = grid_error(p.B, p.L, p.D, p.bi)) return err;
  if (p.state != nullptr && (p.K > 0 || p.bi)) return "ema (cuda): a state needs a unidirectional EMA with K = 0";
  const Plan plan = bwd_plan(p.B, p.L, p.D);
  const int ndir = p.bi ? 2 : 1, xb = (p.D + kThreads - 1) / kThreads, C = plan.nchunks;
  MK_LAUNCH(pick_sweep(p.mask != nullptr, p.K > 0, [&](auto mask, auto trunc) {
    constexpr bool M = decltype(mask)::value, TR = decltype(trunc)::value;
    bwd_local_kernel<T, NM, M, TR><<<dim3(xb, p.B * ndir, C), kThreads, 0, s>>>(p, plan);
  }));
  MK_LAUNCH(bwd_prefix_kernel<NM><<<dim3(xb, p.B * ndir, prefix_groups<NM>()), kThreads, 0, s>>>(p, plan));
  if (p.bi) {
    MK_LAUNCH(pick_sweep(p.mask != nullptr, p.K > 0, [&](auto mask, auto trunc) {
      constexpr bool M = decltype(mask)::value, TR = decltype(trunc)::value;
      bwd_other_output_kernel<T, NM, M, TR><<<dim3(xb, p.B, C), kThreads, 0, s>>>(p, plan);
    }));
  }
  for (int dir_idx = 0; dir_idx < ndir; ++dir_idx) {  // direction 0 forms g, which direction 1 reads
    MK_LAUNCH(pick_sweep(p.mask != nullptr, p.K > 0, [&](auto mask, auto trunc) {
      constexpr bool M = decltype(mask)::value, TR = decltype(trunc)::value;
      pick_param_pass<TR>(p, dir_idx, [&](auto pass) {
        bwd_params_kernel<T, NM, M, TR, decltype(pass)::value><<<dim3(xb, p.B, C), kThreads, 0, s>>>(p, plan);
      });
    }));
  }
  MK_LAUNCH(pick_flag(p.K > 0, [&](auto trunc) {
    bwd_adjoint_local_kernel<NM, decltype(trunc)::value><<<dim3(xb, p.B * ndir, C), kThreads, 0, s>>>(p, plan);
  }));
  MK_LAUNCH(bwd_adjoint_prefix_kernel<NM><<<dim3(xb, p.B * ndir, prefix_groups<NM>()), kThreads, 0, s>>>(p, plan));
  MK_LAUNCH(pick_flag(p.K > 0, [&](auto trunc) {
    bwd_dx_kernel<T, NM, decltype(trunc)::value><<<dim3(xb, p.B, C), kThreads, 0, s>>>(p, plan);
  }));
  return nullptr;
}

template <typename T, int NM>
const char* step(const StepParams& p, cudaStream_t s) {
  if (p.B < 1 || p.D < 1) return "ema (cuda): empty input reached the step launcher (B and D must be >= 1)";
  const int64_t blocks = geometry(p.B, 1, p.D, false).step_blocks;
  if (blocks > kMaxGridX) return "ema (cuda): B * D exceeds the step kernel's grid";
  MK_LAUNCH(step_kernel<T, NM><<<static_cast<unsigned>(blocks), kStepThreads, 0, s>>>(p));
  return nullptr;
}

// Calls FN<T, NM>(args...) for the dtype and NM = padded_n(N) (the NM the workspaces were sized with).
// Exhaustive: any other N (N < 1 or N > kMaxN: padded_n gives 0) or dtype returns an error, so no N can
// reach a kernel whose register arrays are shorter than N.
#define MK_CUDA_DISPATCH_N(FN, T, N, ...)                                                  \
  switch (padded_n(N)) {                                                                   \
    case 4: return FN<T, 4>(__VA_ARGS__);                                                  \
    case 8: return FN<T, 8>(__VA_ARGS__);                                                  \
    case 16: return FN<T, 16>(__VA_ARGS__);                                                \
    case 32: return FN<T, 32>(__VA_ARGS__);                                                \
    default: return "ema (cuda): the expansion size N must be between 1 and 32 (kMaxN)";   \
  }

}  // namespace

// Defines the entry points of one I/O dtype T (declared in ema_cuda.h: launch_fwd_<SUFFIX> and so on), for
// every NM; one per-dtype .cu file expands it.
#define MK_EMA_CUDA_ENTRY_POINTS(T, SUFFIX)                                                \
  const char* launch_fwd_##SUFFIX(const FwdParams& p, void* stream) {                      \
    MK_CUDA_DISPATCH_N(fwd, T, p.N, p, static_cast<cudaStream_t>(stream))                  \
  }                                                                                        \
  const char* launch_bwd_##SUFFIX(const BwdParams& p, void* stream) {                      \
    MK_CUDA_DISPATCH_N(bwd, T, p.N, p, static_cast<cudaStream_t>(stream))                  \
  }                                                                                        \
  const char* launch_step_##SUFFIX(const StepParams& p, void* stream) {                    \
    MK_CUDA_DISPATCH_N(step, T, p.N, p, static_cast<cudaStream_t>(stream))                 \
  }

}  // namespace cuda
}  // namespace ema
}  // namespace mega_kernels
