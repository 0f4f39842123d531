// CUDA kernels of the EMA (maths: ema_kernels.cuh). Torch-free: scripts/compile_cuda.sh compiles this file
// with nvcc alone; ema_cuda_ops.cpp holds the torch glue.
//
// Forward: a chunked scan, x read twice and y written once, no atomics or inter-block waiting.
//   1. local:  thread (b, direction, channel d, chunk of T steps) sums its chunk's input (u = q u + xm) and
//              stores the end state from 0, a u (N floats), in the workspace;
//   2. prefix: thread (b, direction, d) walks its chunks in the direction's order, replacing each end
//              state by the state entering that chunk: p <- q^len p + a u (len: the chunk's length;
//              p starts from `state`);
//   3. output: thread (b, d, chunk) reruns the chunk from its entering state and writes y; for a
//              bidirectional EMA it first runs the backward direction over the same times into shared memory.
// Backward: one thread per (b, d) runs the sweeps of ema_kernels.cuh over the whole sequence, with g and the
// adjoint output in global workspaces; per-batch partial sums (zero-initialised by the caller, which reduces
// them over the batch in a fixed order) are added to every kSumBlock steps.
// States and coefficients are float32 registers, zero-padded to NM >= N.
#include <cuda_runtime.h>

#include "ema_cuda_threads.cuh"

namespace mega_kernels {
namespace ema {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // channels per block

template <typename T, int NM>
__global__ void fwd_local_kernel(FwdParams p, Plan plan) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x, ndir = p.bi ? 2 : 1;
  if (d < p.D) fwd_local_thread<T, NM>(p, plan, blockIdx.y / ndir, blockIdx.y % ndir, d, blockIdx.z);
}

template <int NM>
__global__ void fwd_prefix_kernel(FwdParams p, Plan plan) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x, ndir = p.bi ? 2 : 1;
  if (d < p.D) fwd_prefix_thread<NM>(p, plan, blockIdx.y / ndir, blockIdx.y % ndir, d);
}

template <typename T, int NM, bool BI>
__global__ void fwd_out_kernel(FwdParams p, Plan plan) {
  extern __shared__ float ebuf[];  // [chunk step][thread]: the backward direction's output
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d < p.D) fwd_out_thread<T, NM, BI>(p, plan, blockIdx.y, d, blockIdx.z, ebuf + threadIdx.x, blockDim.x);
}

template <typename T, int NM>
__global__ void bwd_kernel(BwdParams p) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d < p.D) bwd_thread<T, NM>(p, blockIdx.y, d);
}

template <typename T, int NM>
__global__ void step_kernel(StepParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < static_cast<int64_t>(p.B) * p.D) step_thread<T, NM>(p, i);
}

const char* check_launch() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T, int NM>
const char* fwd(const FwdParams& p, cudaStream_t s) {
  const Plan plan = fwd_plan(p.B, p.L, p.D, p.bi);
  const int ndir = p.bi ? 2 : 1, xb = (p.D + kThreads - 1) / kThreads;
  fwd_local_kernel<T, NM><<<dim3(xb, p.B * ndir, plan.nchunks), kThreads, 0, s>>>(p, plan);
  fwd_prefix_kernel<NM><<<dim3(xb, p.B * ndir), kThreads, 0, s>>>(p, plan);
  if (p.bi) {
    const size_t smem = sizeof(float) * kThreads * plan.chunk;
    fwd_out_kernel<T, NM, true><<<dim3(xb, p.B, plan.nchunks), kThreads, smem, s>>>(p, plan);
  } else {
    fwd_out_kernel<T, NM, false><<<dim3(xb, p.B, plan.nchunks), kThreads, 0, s>>>(p, plan);
  }
  return check_launch();
}

template <typename T, int NM>
const char* bwd(const BwdParams& p, cudaStream_t s) {
  // One thread per (b, d) runs the whole sequence: small blocks spread the B * D threads over every SM.
  constexpr int threads = 32;
  bwd_kernel<T, NM><<<dim3((p.D + threads - 1) / threads, p.B), threads, 0, s>>>(p);
  return check_launch();
}

template <typename T, int NM>
const char* step(const StepParams& p, cudaStream_t s) {
  const int64_t n = static_cast<int64_t>(p.B) * p.D;
  step_kernel<T, NM><<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(p);
  return check_launch();
}

// Calls F<T, NM>(args...) for the dtype and the smallest NM in {4, 8, 16, 32} with N <= NM.
#define MK_CUDA_DISPATCH(FN, N, DT, ...)                                                           \
  do {                                                                                              \
    if ((N) < 1 || (N) > kMaxN) return "ema (cuda): N must be between 1 and 32";                    \
    switch (DT) {                                                                                   \
      case DType::kFloat: MK_CUDA_DISPATCH_N(FN, float, N, __VA_ARGS__);                            \
      case DType::kHalf: MK_CUDA_DISPATCH_N(FN, __half, N, __VA_ARGS__);                            \
      case DType::kBFloat16: MK_CUDA_DISPATCH_N(FN, __nv_bfloat16, N, __VA_ARGS__);                 \
    }                                                                                               \
    return "ema (cuda): unsupported dtype";                                                         \
  } while (0)
#define MK_CUDA_DISPATCH_N(FN, T, N, ...)                      \
  if ((N) <= 4) return FN<T, 4>(__VA_ARGS__);                   \
  if ((N) <= 8) return FN<T, 8>(__VA_ARGS__);                   \
  if ((N) <= 16) return FN<T, 16>(__VA_ARGS__);                 \
  return FN<T, 32>(__VA_ARGS__)

}  // namespace

int64_t fwd_workspace_floats(int B, int L, int D, int N, bool bi) {
  return workspace_floats(fwd_plan(B, L, D, bi), B, D, N, bi);
}

const char* launch_fwd(const FwdParams& p, DType dtype, void* stream) {
  MK_CUDA_DISPATCH(fwd, p.N, dtype, p, static_cast<cudaStream_t>(stream));
}

const char* launch_bwd(const BwdParams& p, DType dtype, void* stream) {
  MK_CUDA_DISPATCH(bwd, p.N, dtype, p, static_cast<cudaStream_t>(stream));
}

const char* launch_step(const StepParams& p, DType dtype, void* stream) {
  MK_CUDA_DISPATCH(step, p.N, dtype, p, static_cast<cudaStream_t>(stream));
}

}  // namespace cuda
}  // namespace ema
}  // namespace mega_kernels
