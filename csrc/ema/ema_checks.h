// Argument checks and output allocation shared by the CPU and CUDA implementations of the
// mega_kernels::ema_fwd / ema_bwd / ema_step ops (schemas in csrc/registration.cpp).
// Every op entry runs its checks first, before it allocates, dispatches or launches anything: check_fwd,
// check_bwd or check_step, which run check_ema_args (+ check_ema_grads in ema_bwd), then check_device_type,
// then the backend's own limits (check_cuda_args for the CUDA ops: dtype, N <= kMaxN, grid limits).
// Each message names the argument and what to do instead. The CUDA emulator (csrc/testing) runs the same
// checks, so tests exercise them on a machine without a GPU.
#pragma once
#include <ATen/ATen.h>

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "ema_cuda.h"  // the CUDA kernels' limits (torch- and CUDA-free)

namespace mega_kernels {
namespace ema {

// Accumulation dtype: float64 for float64 x, else float32 (float16 / bfloat16 are computed in float32).
inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; move both to one device");
}

// x (B, L, D); a, q, c (kd, N) with kd = 2D when bidirectional; omega (D,); mask (B, L) bool; state (B, D, N).
inline void check_ema_args(const char* op, const at::Tensor& x, const at::Tensor& a, const at::Tensor& q,
                           const at::Tensor& c, const at::Tensor& omega, const c10::optional<at::Tensor>& mask,
                           const c10::optional<at::Tensor>& state, bool bidirectional, int64_t truncation) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, L, D), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor, got ", x.scalar_type());
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  const int64_t kd = bidirectional ? 2 * D : D;
  TORCH_CHECK(a.dim() == 2 && a.size(0) == kd, op, ": a must be (", kd, ", N) for D=", D,
              bidirectional ? " bidirectional" : " unidirectional", ", got ", a.sizes());
  const int64_t N = a.size(1);
  TORCH_CHECK(N >= 1, op, ": the expansion size N (a.size(1)) must be at least 1");
  TORCH_CHECK(q.sizes() == a.sizes(), op, ": q must have a's shape ", a.sizes(), ", got ", q.sizes());
  TORCH_CHECK(c.sizes() == a.sizes(), op, ": c must have a's shape ", a.sizes(), ", got ", c.sizes());
  TORCH_CHECK(omega.dim() == 1 && omega.size(0) == D, op, ": omega must be (", D, ",), got ", omega.sizes());
  for (auto* t : {&a, &q, &c, &omega}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": a, q, c and omega must be floating tensors");
  }
  check_same_device(op, "a", a, x);
  check_same_device(op, "q", q, x);
  check_same_device(op, "c", c, x);
  check_same_device(op, "omega", omega, x);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool (True = token), got ",
                mask->scalar_type(), "; pass mask.bool()");
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == L, op, ": mask must be (B, L) = (", B,
                ", ", L, "), got ", mask->sizes());
    check_same_device(op, "mask", *mask, x);
  }
  if (state.has_value()) {
    TORCH_CHECK(!bidirectional, op, ": a state exists only for a unidirectional EMA; drop state or pass "
                "bidirectional=False");
    TORCH_CHECK(truncation == 0, op, ": a truncated EMA has no recurrent state; pass truncation=0 with a state");
    TORCH_CHECK(state->dim() == 3 && state->size(0) == B && state->size(1) == D && state->size(2) == N, op,
                ": state must be (B, D, N) = (", B, ", ", D, ", ", N, "), got ", state->sizes());
    TORCH_CHECK(at::isFloatingType(state->scalar_type()), op, ": state must be a floating tensor");
    check_same_device(op, "state", *state, x);
  }
  TORCH_CHECK(truncation >= 0, op, ": truncation must be >= 0 (0 = none), got ", truncation);
  // The kernels hold K, B, L and D in 32-bit ints.
  TORCH_CHECK(truncation <= INT32_MAX, op, ": truncation must be below 2^31, got ", truncation,
              "; a window of K >= L steps is the plain EMA: pass truncation=0");
  TORCH_CHECK(B <= INT32_MAX && L <= INT32_MAX && D <= INT32_MAX, op, ": B, L and D must be below 2^31, got x ",
              x.sizes(), "; split the batch or the sequence");
}

// ema_bwd's gradients (after check_ema_args): grad_y like x; grad_state (B, D, N) when given and non-empty.
inline void check_ema_grads(const char* op, const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_state,
                            const at::Tensor& x, int64_t N, bool bidirectional, int64_t truncation) {
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(), ", got ",
              grad_y.sizes());
  TORCH_CHECK(at::isFloatingType(grad_y.scalar_type()), op, ": grad_y must be a floating tensor, got ",
              grad_y.scalar_type());
  check_same_device(op, "grad_y", grad_y, x);
  if (grad_state.has_value() && grad_state->defined() && grad_state->numel() > 0) {
    const int64_t B = x.size(0), D = x.size(2);
    TORCH_CHECK(!bidirectional, op, ": grad_state needs a unidirectional EMA; pass grad_state=None");
    TORCH_CHECK(truncation == 0, op, ": a truncated EMA has no recurrent state; pass grad_state=None");
    TORCH_CHECK(grad_state->dim() == 3 && grad_state->size(0) == B && grad_state->size(1) == D &&
                    grad_state->size(2) == N,
                op, ": grad_state must be (B, D, N) = (", B, ", ", D, ", ", N, "), got ", grad_state->sizes());
    TORCH_CHECK(at::isFloatingType(grad_state->scalar_type()), op, ": grad_state must be a floating tensor, got ",
                grad_state->scalar_type());
    check_same_device(op, "grad_state", *grad_state, x);
  }
}

// The kernel of one backend takes tensors of its device type only. The dispatcher picks the CUDA kernel
// when any argument is on CUDA, so without this a CUDA kernel could receive CPU tensors (or, redispatched
// by hand, the CPU kernel CUDA ones) and dereference pointers of the wrong memory space.
inline void check_device_type(const char* op, const at::Tensor& x, at::DeviceType type, const char* backend) {
  TORCH_CHECK(x.device().type() == type, op, " (", backend, "): x is on ", x.device(), ", but these are the ",
              backend, " kernels; move every tensor to one device");
}

// What the CUDA kernels take (csrc/ema/ema_cuda.cu), after check_ema_args: x (B, L, D) float32, float16 or
// bfloat16; a (kd, N) with 1 <= N <= kMaxN; sizes within the launch grids (scan: the ema_fwd / ema_bwd
// kernels; otherwise the decoding step, x (B, 1, D)). Runs before any allocation or launch. Valid input these
// kernels do not take raises TypeError (the dtype) or ValueError (a size), as the Python layers' refusals do.
inline void check_cuda_args(const char* op, const at::Tensor& x, const at::Tensor& a, bool bidirectional,
                            bool scan) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                   " (cuda): x must be float32, float16 or bfloat16, got ", dt,
                   "; use backend='cpu' or 'reference' for float64");
  const int64_t N = a.size(1);
  TORCH_CHECK_VALUE(N <= cuda::kMaxN, op, " (cuda): N = ", N, " exceeds the CUDA kernels' maximum of ",
                    cuda::kMaxN, " (N is the expansion size, a.size(1)); use backend='triton' or 'reference'");
  TORCH_CHECK_VALUE(a.size(0) * N <= INT32_MAX, op, " (cuda): a has ", a.size(0) * N,
                    " coefficients, more than the kernels' 32-bit index; split the channels");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  if (B == 0 || L == 0 || D == 0) return;  // nothing is launched
  const auto g = cuda::geometry(B, L, D, bidirectional);
  if (!scan) {
    TORCH_CHECK_VALUE(g.step_blocks <= cuda::kMaxGridX, op, " (cuda): B * D = ", B * D,
                      " exceeds the step kernel's grid; split the batch");
    return;
  }
  TORCH_CHECK_VALUE(g.rows <= cuda::kMaxGridYZ, op, " (cuda): B = ", B,
                    bidirectional ? " (x 2 directions)" : "", " exceeds the CUDA grid limit of ", cuda::kMaxGridYZ,
                    " rows; split the batch");
  // (each pass by its own plan: a forward-only call is not refused for the backward's finer chunks)
  const int64_t chunks = std::strcmp(op, "ema_bwd") == 0 ? g.bwd_chunks : g.fwd_chunks;
  TORCH_CHECK_VALUE(chunks <= cuda::kMaxGridYZ, op, " (cuda): L = ", L, " needs ", chunks,
                    " chunks, more than the CUDA grid limit of ", cuda::kMaxGridYZ,
                    "; split the sequence or use backend='triton'");
}

// A backend as the op entries check it: its name in messages, the device type of its tensors, and the limits of
// its kernels beyond the arguments' validity (check_cuda_args; nullptr where every valid input runs).
struct Backend {
  const char* name;
  at::DeviceType type;
  void (*limits)(const char* op, const at::Tensor& x, const at::Tensor& a, bool bidirectional, bool scan);
};

// The checks ema_fwd runs first on every backend.
inline void check_fwd(const Backend& be, const at::Tensor& x, const at::Tensor& a, const at::Tensor& q,
                      const at::Tensor& c, const at::Tensor& omega, const c10::optional<at::Tensor>& mask,
                      const c10::optional<at::Tensor>& state, bool bidirectional, int64_t truncation,
                      bool return_state) {
  check_ema_args("ema_fwd", x, a, q, c, omega, mask, state, bidirectional, truncation);
  TORCH_CHECK(!(return_state && bidirectional), "ema_fwd: return_state needs a unidirectional EMA");
  TORCH_CHECK(!(return_state && truncation > 0), "ema_fwd: a truncated EMA has no recurrent state to return; pass "
              "truncation=0 with return_state");
  check_device_type("ema_fwd", x, be.type, be.name);
  if (be.limits != nullptr) be.limits("ema_fwd", x, a, bidirectional, /*scan=*/true);
}

// The checks ema_bwd runs first on every backend.
inline void check_bwd(const Backend& be, const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_state,
                      const at::Tensor& x, const at::Tensor& a, const at::Tensor& q, const at::Tensor& c,
                      const at::Tensor& omega, const c10::optional<at::Tensor>& mask,
                      const c10::optional<at::Tensor>& state, bool bidirectional, int64_t truncation) {
  check_ema_args("ema_bwd", x, a, q, c, omega, mask, state, bidirectional, truncation);
  check_ema_grads("ema_bwd", grad_y, grad_state, x, a.size(1), bidirectional, truncation);
  check_device_type("ema_bwd", x, be.type, be.name);
  if (be.limits != nullptr) be.limits("ema_bwd", x, a, bidirectional, /*scan=*/true);
}

// The checks ema_step runs first on every backend. x (B, D) and mask (B,) are checked as a sequence of one
// step, x (B, 1, D); returns that sequence's mask (B, 1) for prepare().
inline c10::optional<at::Tensor> check_step(const Backend& be, const at::Tensor& x, const at::Tensor& a,
                                            const at::Tensor& q, const at::Tensor& c, const at::Tensor& omega,
                                            const at::Tensor& state, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() == 2, "ema_step: x must be (B, D), got ", x.sizes());
  c10::optional<at::Tensor> mask1;
  if (mask.has_value()) mask1 = mask->unsqueeze(1);
  check_ema_args("ema_step", x.unsqueeze(1), a, q, c, omega, mask1, state, false, 0);
  check_device_type("ema_step", x, be.type, be.name);
  if (be.limits != nullptr) be.limits("ema_step", x.unsqueeze(1), a, false, /*scan=*/false);
  return mask1;
}

// q^K, a q^K and K a q^(K-1) for a truncated EMA ((kd, N) each, zeros when K = 0), in dtype `acc`.
struct TruncCoefs {
  at::Tensor aqk, qk, kaqk1;
};
inline TruncCoefs trunc_coefs(const at::Tensor& a, const at::Tensor& q, int64_t K) {
  if (K == 0) {
    auto z = at::zeros_like(a);
    return {z, z, z};
  }
  // A q^(K-1) below 2^-100 is taken as 0: the taps it would remove weigh less than that relative to the window
  // (far below float64 resolution), and in float32 the products with it fall into the subnormal range, where
  // every operation takes a slow microcode path on x86 (the cpu backward at K = 256, q ~ 0.7: 1.7x slower).
  auto qk1 = q.pow(static_cast<double>(K - 1));
  qk1 = at::where(qk1.abs() < std::ldexp(1.0, -100), at::zeros_like(qk1), qk1);
  auto qk = qk1 * q;
  return {(a * qk).contiguous(), qk.contiguous(), (a * qk1 * static_cast<double>(K)).contiguous()};
}

// Inputs converted once to what the kernels read: contiguous x, coefficients in the accumulation dtype.
struct Prepared {
  at::Tensor x, a, q, c, omega, mask, state, aqk, qk, kaqk1;
};
inline Prepared prepare(const at::Tensor& x, const at::Tensor& a, const at::Tensor& q, const at::Tensor& c,
                 const at::Tensor& omega, const c10::optional<at::Tensor>& mask,
                 const c10::optional<at::Tensor>& state, int64_t K) {
  const auto acc = acc_type(x);
  Prepared r;
  r.x = x.contiguous();
  r.a = a.to(acc).contiguous();
  r.q = q.to(acc).contiguous();
  r.c = c.to(acc).contiguous();
  r.omega = omega.to(acc).contiguous();
  if (mask.has_value()) r.mask = mask->contiguous();
  if (state.has_value()) r.state = state->to(acc).contiguous();
  auto tc = trunc_coefs(r.a, r.q, K);
  r.aqk = tc.aqk;
  r.qk = tc.qk;
  r.kaqk1 = tc.kaqk1;
  return r;
}

// ema_bwd's gradients as the kernels read them: grad_y contiguous in x's dtype; grad_state in the accumulation
// dtype, undefined when absent or empty.
struct PreparedGrads {
  at::Tensor gy, gs;
};
inline PreparedGrads prepare_grads(const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_state,
                                   const at::Tensor& x) {
  PreparedGrads r;
  r.gy = grad_y.to(x.scalar_type()).contiguous();
  if (grad_state.has_value() && grad_state->defined() && grad_state->numel() > 0) {  // checked by check_bwd
    r.gs = grad_state->to(acc_type(x)).contiguous();
  }
  return r;
}

}  // namespace ema
}  // namespace mega_kernels
