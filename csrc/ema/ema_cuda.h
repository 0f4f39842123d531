// Interface between the CUDA kernels (ema_cuda.cu) and their torch glue (ema_cuda_ops.cpp); free of torch and
// of CUDA headers (a stream is passed as void*, a cudaStream_t).
// All pointers are device pointers to contiguous tensors; coefficients, omega, states and workspaces are
// float32; x / y / grad_y / dx are of `dtype`. Launchers return nullptr on success, else an error message.
#pragma once
#include <stdint.h>

namespace mega_kernels {
namespace ema {
namespace cuda {

enum class DType { kFloat, kHalf, kBFloat16 };
constexpr int kMaxN = 32;  // largest expansion size N the CUDA kernels take (states live in registers)

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
  float *gbuf, *dxm;                          // workspaces (B, L, D) each
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

}  // namespace cuda
}  // namespace ema
}  // namespace mega_kernels
