// Argument checks and output allocation shared by the CPU and CUDA implementations of the
// mega_kernels::ema_fwd / ema_bwd / ema_step ops (schemas in csrc/registration.cpp).
#pragma once
#include <ATen/ATen.h>

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
  TORCH_CHECK(L < (int64_t(1) << 31) && D < (int64_t(1) << 31), op, ": L and D must be below 2^31");
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
  auto qk1 = q.pow(static_cast<double>(K - 1));
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

}  // namespace ema
}  // namespace mega_kernels
