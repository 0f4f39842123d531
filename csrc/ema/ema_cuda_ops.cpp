// Torch glue of the CUDA EMA kernels (ema_cuda.cu): checks, allocation, stream, dtype; registers the
// mega_kernels ops for the CUDA dispatch key. Built only when torch has CUDA (mega_kernels/_build.py).
// Each op validates every input (ema_checks.h: check_fwd / check_bwd / check_step with check_cuda_args as the
// backend's limits) before it allocates, dispatches or launches anything, so an unsupported input is a RuntimeError naming the argument,
// never a launch with a bad configuration or a kernel whose register arrays are shorter than N.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ema_checks.h"
#include "ema_cuda.h"

namespace mega_kernels {
namespace ema {
namespace {

const Backend kCuda{"cuda", at::kCUDA, check_cuda_args};

// x's dtype for the launchers (check_cuda_args refused every other dtype before this is called).
cuda::DType io_dtype(const char* op, const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, " (cuda): x must be float32, float16 or bfloat16, got ", x.scalar_type());
}

cuda::Coefs6 coefs(const Prepared& p) {
  return {p.a.data_ptr<float>(), p.q.data_ptr<float>(), p.c.data_ptr<float>(), p.aqk.data_ptr<float>(),
          p.qk.data_ptr<float>(), p.kaqk1.data_ptr<float>()};
}

const bool* mask_ptr(const Prepared& p) { return p.mask.defined() ? p.mask.data_ptr<bool>() : nullptr; }
const float* state_ptr(const Prepared& p) { return p.state.defined() ? p.state.data_ptr<float>() : nullptr; }

void raise_if(const char* op, const char* err) { TORCH_CHECK(err == nullptr, op, ": CUDA error: ", err); }

std::tuple<at::Tensor, at::Tensor> ema_fwd_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& q,
                                                const at::Tensor& c, const at::Tensor& omega,
                                                const c10::optional<at::Tensor>& mask,
                                                const c10::optional<at::Tensor>& state, bool bidirectional,
                                                int64_t truncation, bool return_state) {
  check_fwd(kCuda, x, a, q, c, omega, mask, state, bidirectional, truncation, return_state);
  const auto dt = io_dtype("ema_fwd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto pr = prepare(x, a, q, c, omega, mask, state, truncation);
  const int B = x.size(0), L = x.size(1), D = x.size(2), N = a.size(1);
  auto fopts = x.options().dtype(at::kFloat);
  auto y = at::empty_like(pr.x);
  auto final_state = at::empty(return_state ? at::IntArrayRef{B, D, N} : at::IntArrayRef{0}, fopts);
  if (x.numel() == 0) {
    if (return_state) final_state.copy_(state.has_value() ? pr.state : at::zeros_like(final_state));
    return {y, final_state};
  }
  auto ws = at::empty({cuda::fwd_workspace_floats(B, L, D, N, bidirectional)}, fopts);
  cuda::FwdParams p{pr.x.data_ptr(), mask_ptr(pr), coefs(pr), pr.omega.data_ptr<float>(), state_ptr(pr),
                    y.data_ptr(), return_state ? final_state.data_ptr<float>() : nullptr, ws.data_ptr<float>(),
                    B, L, D, N, static_cast<int>(truncation), bidirectional};
  raise_if("ema_fwd", cuda::launch_fwd(p, dt, c10::cuda::getCurrentCUDAStream().stream()));
  return {y, final_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ema_bwd_cuda(
    const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_state, const at::Tensor& x,
    const at::Tensor& a, const at::Tensor& q, const at::Tensor& c, const at::Tensor& omega,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& state, bool bidirectional,
    int64_t truncation) {
  check_bwd(kCuda, grad_y, grad_state, x, a, q, c, omega, mask, state, bidirectional, truncation);
  const auto dt = io_dtype("ema_bwd", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto pr = prepare(x, a, q, c, omega, mask, state, truncation);
  const int B = x.size(0), L = x.size(1), D = x.size(2), N = a.size(1);
  auto fopts = x.options().dtype(at::kFloat);
  const auto grads = prepare_grads(grad_y, grad_state, x);
  const at::Tensor &gy = grads.gy, &gs = grads.gs;
  auto dx = at::empty_like(pr.x);
  // (b, chunk) partial sums; an empty x launches nothing and needs one zero part per batch row
  const int64_t parts = static_cast<int64_t>(B) * (x.numel() > 0 ? cuda::bwd_chunks(B, L, D) : 1);
  const int64_t kd = a.size(0);  // rows of the coefficients: D, or 2 D for a bidirectional EMA
  auto pc = at::zeros({parts, kd, N}, fopts), pa = at::zeros_like(pc), pq = at::zeros_like(pc);
  auto pomega = at::zeros({parts, D}, fopts);
  auto dstate = state.has_value() ? at::empty({B, D, N}, fopts) : at::Tensor();
  if (x.numel() > 0) {
    auto gbuf = at::empty({B, L, D}, fopts);
    auto dxm = bidirectional ? at::empty({B, L, D}, fopts) : at::Tensor();  // direction 0's share of dx
    auto ws = at::empty({cuda::bwd_workspace_floats(B, L, D, N, bidirectional)}, fopts);
    cuda::BwdParams p{pr.x.data_ptr(), gy.data_ptr(), mask_ptr(pr), coefs(pr), pr.omega.data_ptr<float>(),
                      state_ptr(pr), gs.defined() ? gs.data_ptr<float>() : nullptr, dx.data_ptr(),
                      dstate.defined() ? dstate.data_ptr<float>() : nullptr, pc.data_ptr<float>(),
                      pa.data_ptr<float>(), pq.data_ptr<float>(), pomega.data_ptr<float>(), gbuf.data_ptr<float>(),
                      dxm.defined() ? dxm.data_ptr<float>() : nullptr, ws.data_ptr<float>(), B, L, D, N,
                      static_cast<int>(truncation), bidirectional};
    raise_if("ema_bwd", cuda::launch_bwd(p, dt, c10::cuda::getCurrentCUDAStream().stream()));
  } else if (dstate.defined()) {
    dstate.copy_(gs.defined() ? gs : at::zeros_like(dstate));  // L = 0: the state passes through
  }
  // Sum over (b, chunk) by ATen's CUDA sum: a fixed reduction tree, so the result is the same run to run.
  auto grad = [&](const at::Tensor& t, const at::Tensor& like) { return t.sum(0).to(like.scalar_type()); };
  at::Tensor gstate_out = state.has_value() ? dstate.to(state->scalar_type()) : at::empty({0}, a.options());
  return {dx, grad(pa, a), grad(pq, q), grad(pc, c), pomega.sum(0).to(omega.scalar_type()), gstate_out};
}

std::tuple<at::Tensor, at::Tensor> ema_step_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& q,
                                                 const at::Tensor& c, const at::Tensor& omega,
                                                 const at::Tensor& state, const c10::optional<at::Tensor>& mask) {
  const auto mask1 = check_step(kCuda, x, a, q, c, omega, state, mask);
  const auto dt = io_dtype("ema_step", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto pr = prepare(x.unsqueeze(1), a, q, c, omega, mask1, state, 0);
  const int B = x.size(0), D = x.size(1), N = a.size(1);
  auto y = at::empty({B, D}, x.options());
  auto new_state = at::empty({B, D, N}, x.options().dtype(at::kFloat));
  if (x.numel() > 0) {
    cuda::StepParams p{pr.x.data_ptr(), mask_ptr(pr), coefs(pr), pr.omega.data_ptr<float>(), state_ptr(pr),
                       y.data_ptr(), new_state.data_ptr<float>(), B, D, N};
    raise_if("ema_step", cuda::launch_step(p, dt, c10::cuda::getCurrentCUDAStream().stream()));
  }
  return {y, new_state};
}

}  // namespace

TORCH_LIBRARY_IMPL(mega_kernels, CUDA, m) {
  m.impl("ema_fwd", &ema_fwd_cuda);
  m.impl("ema_bwd", &ema_bwd_cuda);
  m.impl("ema_step", &ema_step_cuda);
}

}  // namespace ema
}  // namespace mega_kernels
