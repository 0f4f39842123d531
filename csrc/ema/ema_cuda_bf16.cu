// The bfloat16 instantiations of the CUDA EMA launchers (ema_cuda_launch.cuh): one file per I/O dtype, so
// the build compiles the three in parallel.
#include "ema_cuda_launch.cuh"

namespace mega_kernels {
namespace ema {
namespace cuda {

MK_EMA_CUDA_ENTRY_POINTS(__nv_bfloat16, bf16)

}  // namespace cuda
}  // namespace ema
}  // namespace mega_kernels
