// Interface between the CUDA kernels (ema_cuda_launch.cuh, compiled per dtype; ema_cuda.cu dispatches) and
// their torch glue (ema_cuda_ops.cpp); free of torch and of CUDA headers (a stream is passed as void*).
// All pointers are device pointers to contiguous tensors; coefficients, omega, states and workspaces are
// float32; x / y / grad_y / dx are of `dtype`. Launchers return nullptr on success, else an error message.
#pragma once
#include <stdint.h>

namespace mega_kernels {
namespace ema {
namespace cuda {

enum class DType { kFloat, kHalf, kBFloat16 };

// Limits of the kernels and of their launches. The torch glue checks every input against them (through
// check_cuda_args in ema_checks.h) before it allocates or launches anything; the launchers refuse the rest.
constexpr int kMaxN = 32;             // largest expansion size N (states live in registers, padded to 4/8/16/32)
constexpr int kThreads = 128;         // channels per block of the scan kernels (grid x: channel blocks)
constexpr int kStepThreads = 256;     // threads per block of the decoding step (grid x: B * D / 256)
constexpr int kBiChunk = 64;          // bidirectional forward chunk (shared memory: kThreads * kBiChunk floats)
constexpr int kBwdMaxChunk = 256;     // backward chunk cap (2 * kSumBlock of ema_kernels.cuh)
constexpr int kRowGroup = 8;          // rows a scan thread loads one group ahead of its arithmetic
constexpr int64_t kMaxGridX = 2147483647;  // CUDA grid limits
constexpr int64_t kMaxGridYZ = 65535;

// Chunking of the time axis: chunk steps per chunk, nchunks chunks (grid z of the scan kernels).
struct Plan {
  int chunk, nchunks;
};

inline Plan fwd_plan(int B, int L, int D, bool bi) {
  // Enough threads to fill an H100/H200 (~256K), chunks of at least 32 steps (the workspace traffic per
  // element is ~4N/chunk floats, so longer chunks are cheaper when the batch already fills the GPU).
  // An empty batch (B * D = 0) counts as one lane: no division by zero, whatever the caller launches.
  const int64_t lanes = static_cast<int64_t>(B) * D > 0 ? static_cast<int64_t>(B) * D : 1;
  int64_t want = (262144 + lanes - 1) / lanes;
  int chunk = static_cast<int>((L + want - 1) / want);
  chunk = ((chunk + 31) / 32) * 32;
  if (chunk < 32) chunk = 32;
  if (bi && chunk > kBiChunk) chunk = kBiChunk;
  return {chunk, static_cast<int>((static_cast<int64_t>(L) + chunk - 1) / chunk)};
}

// Backward chunks are at most kBwdMaxChunk steps: per-chunk partial sums then keep float32 rounding small.
inline Plan bwd_plan(int B, int L, int D) {
  Plan plan = fwd_plan(B, L, D, false);
  if (plan.chunk > kBwdMaxChunk) {
    plan = {kBwdMaxChunk, static_cast<int>((static_cast<int64_t>(L) + kBwdMaxChunk - 1) / kBwdMaxChunk)};
  }
  return plan;
}

// The grid sizes the launches of ema_cuda_launch.cuh would use for x (B, L, D) (B, L, D < 2^31 already checked).
struct Geometry {
  int64_t rows;         // grid y of the per-direction kernels: B * directions
  int64_t fwd_chunks;   // grid z of the forward kernels
  int64_t bwd_chunks;   // grid z of the backward kernels
  int64_t step_blocks;  // grid x of the decoding step (x (B, D))
};
inline Geometry geometry(int64_t B, int64_t L, int64_t D, bool bi) {
  const int b = static_cast<int>(B), l = static_cast<int>(L), d = static_cast<int>(D);
  return {B * (bi ? 2 : 1), fwd_plan(b, l, d, bi).nchunks, bwd_plan(b, l, d).nchunks,
          (B * D + kStepThreads - 1) / kStepThreads};
}

struct Coefs6 {
  const float *a, *q, *c, *aqk, *qk, *kaqk1;  // (kd, N) each; aqk = a q^K, qk = q^K, kaqk1 = K a q^(K-1)
};

struct FwdParams {
  const void* x; const bool* mask; Coefs6 cf; const float* omega; const float* state;  // mask, state: optional
  void* y; float* final_state;  // final_state optional
  float* workspace;             // fwd_workspace_floats(...) floats
  int B, L, D, N, K; bool bi;
};

struct BwdParams {
  const void* x; const void* gy; const bool* mask; Coefs6 cf; const float* omega; const float* state;
  const float* gstate;                        // optional
  void* dx; float* dstate;                    // dstate optional
  float *pc, *pa, *pq, *pomega;               // partial sums per (b, chunk): (B * C, 2D, N) x 3, (B * C, D),
                                              // zero-filled, C = bwd_chunks(B, L, D)
  float *gbuf, *dxm;                          // workspaces (B, L, D) each; dxm bidirectional only (else null)
  float* workspace;                           // bwd_workspace_floats(...) floats
  int B, L, D, N, K; bool bi;
};

struct StepParams {
  const void* x; const bool* mask; Coefs6 cf; const float* omega; const float* state;
  void* y; float* new_state;
  int B, D, N;
};

int64_t fwd_workspace_floats(int B, int L, int D, int N, bool bi);
int bwd_chunks(int B, int L, int D);
int64_t bwd_workspace_floats(int B, int L, int D, int N, bool bi);
const char* launch_fwd(const FwdParams& p, DType dtype, void* stream);
const char* launch_bwd(const BwdParams& p, DType dtype, void* stream);
const char* launch_step(const StepParams& p, DType dtype, void* stream);

// The same per I/O dtype, each compiled in its own file (ema_cuda_f32.cu, ema_cuda_f16.cu, ema_cuda_bf16.cu);
// the three above dispatch to them.
#define MK_EMA_CUDA_DECLARE(SUFFIX)                                          \
  const char* launch_fwd_##SUFFIX(const FwdParams& p, void* stream);         \
  const char* launch_bwd_##SUFFIX(const BwdParams& p, void* stream);         \
  const char* launch_step_##SUFFIX(const StepParams& p, void* stream);
MK_EMA_CUDA_DECLARE(f32)
MK_EMA_CUDA_DECLARE(f16)
MK_EMA_CUDA_DECLARE(bf16)
#undef MK_EMA_CUDA_DECLARE

}  // namespace cuda
}  // namespace ema
}  // namespace mega_kernels
