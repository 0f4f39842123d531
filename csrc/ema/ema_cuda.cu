// The CUDA EMA's dtype dispatch and workspace sizes (the kernels: ema_cuda_launch.cuh, compiled once per
// dtype in ema_cuda_f32.cu, ema_cuda_f16.cu and ema_cuda_bf16.cu). Torch-free, like them.
#include "ema_cuda_threads_bwd.cuh"

namespace mega_kernels {
namespace ema {
namespace cuda {

int64_t fwd_workspace_floats(int B, int L, int D, int N, bool bi) {
  return workspace_floats(fwd_plan(B, L, D, bi), B, D, N, bi);
}

int bwd_chunks(int B, int L, int D) { return bwd_plan(B, L, D).nchunks; }

int64_t bwd_workspace_floats(int B, int L, int D, int N, bool bi) {
  return 3 * bwd_region_floats(bwd_plan(B, L, D), B, D, N, bi);
}

// The entry point of the dtype (each defined in its own ema_cuda_<dtype>.cu).
#define MK_CUDA_DISPATCH_DTYPE(OP, DT, ...)                                                \
  switch (DT) {                                                                            \
    case DType::kFloat: return OP##_f32(__VA_ARGS__);                                      \
    case DType::kHalf: return OP##_f16(__VA_ARGS__);                                       \
    case DType::kBFloat16: return OP##_bf16(__VA_ARGS__);                                  \
  }                                                                                        \
  return "ema (cuda): unsupported dtype (float32, float16 or bfloat16 only)"

const char* launch_fwd(const FwdParams& p, DType dtype, void* stream) {
  MK_CUDA_DISPATCH_DTYPE(launch_fwd, dtype, p, stream);
}

const char* launch_bwd(const BwdParams& p, DType dtype, void* stream) {
  MK_CUDA_DISPATCH_DTYPE(launch_bwd, dtype, p, stream);
}

const char* launch_step(const StepParams& p, DType dtype, void* stream) {
  MK_CUDA_DISPATCH_DTYPE(launch_step, dtype, p, stream);
}

}  // namespace cuda
}  // namespace ema
}  // namespace mega_kernels
