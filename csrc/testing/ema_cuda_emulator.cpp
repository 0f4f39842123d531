// Runs the CUDA EMA kernels' thread functions (csrc/ema/ema_cuda_threads.cuh) on the CPU, one thread after
// another in the launch order of ema_cuda.cu, so tests check the kernels' logic (chunking, prefix pass,
// backward sweeps, blocked sums, padding of N) on a machine without a GPU. float32 only; built by
// tests/test_ema_cuda.py, never part of the package. Outputs start as NaN: anything left unwritten shows.
// Each entry first runs the argument checks of the CUDA ops (ema_checks.h, as ema_cuda_ops.cpp does), so the
// tests also see what the CUDA ops refuse (e.g. N > kMaxN), without a GPU. `set_reverse(true)` runs the threads
// and blocks of every launch in the reverse order: a thread that writes into a neighbour's outputs (past N, past
// its channel) then shows, where the forward order has the neighbour overwrite the stray values.
#include <torch/extension.h>

#include <vector>

#include "../ema/ema_checks.h"
#include "../ema/ema_cuda_threads_bwd.cuh"

namespace mc = mega_kernels::ema::cuda;
using Tensors = std::vector<torch::Tensor>;
using Opt = c10::optional<torch::Tensor>;

namespace {

mc::Coefs6 coefs(const Tensors& c) {  // a, q, c, aqk, qk, kaqk1: (kd, N) float32 contiguous
  return {c[0].data_ptr<float>(), c[1].data_ptr<float>(), c[2].data_ptr<float>(),
          c[3].data_ptr<float>(), c[4].data_ptr<float>(), c[5].data_ptr<float>()};
}
const bool* mask_ptr(const Opt& m) { return m ? m->data_ptr<bool>() : nullptr; }
const float* fptr(const Opt& t) { return t ? t->data_ptr<float>() : nullptr; }
torch::Tensor nans(at::IntArrayRef shape) { return torch::full(shape, NAN); }

bool g_reverse = false;
void set_reverse(bool reverse) { g_reverse = reverse; }
// The indices 0..n-1 of a launch's threads (or blocks) in the order they run.
std::vector<int> order(int n) {
  std::vector<int> v(n);
  for (int i = 0; i < n; ++i) v[i] = g_reverse ? n - 1 - i : i;
  return v;
}

template <int NM>
Tensors fwd_nm(torch::Tensor x, Tensors co, torch::Tensor omega, Opt mask, Opt state, bool bi, int64_t K, bool ret) {
  const int B = x.size(0), L = x.size(1), D = x.size(2), N = co[0].size(1), ndir = bi ? 2 : 1;
  auto y = nans(x.sizes()), fs = nans({B, D, N}), ws = nans({mc::workspace_floats(mc::fwd_plan(B, L, D, bi), B, D, N, bi)});
  mc::FwdParams p{x.data_ptr(), mask_ptr(mask), coefs(co), omega.data_ptr<float>(), fptr(state), y.data_ptr(),
                  ret ? fs.data_ptr<float>() : nullptr, ws.data_ptr<float>(), B, L, D, N, static_cast<int>(K), bi};
  const mc::Plan plan = mc::fwd_plan(B, L, D, bi);
  std::vector<float> ebuf(plan.chunk, NAN);
  mc::pick_sweep(p.mask != nullptr, p.K > 0, [&](auto mask, auto trunc) {  // as fwd() in ema_cuda.cu
    constexpr bool M = decltype(mask)::value, TR = decltype(trunc)::value;
    for (int c : order(plan.nchunks)) {
      if (bi && !TR) {
        for (int b : order(B))
          for (int d : order(D)) mc::fwd_local_both_thread<float, NM, M>(p, plan, b, d, c);
        continue;
      }
      for (int bd : order(B * ndir))
        for (int d : order(D)) mc::fwd_local_thread<float, NM, M, TR>(p, plan, bd / ndir, bd % ndir, d, c);
    }
    for (int z = 0; z < mc::prefix_groups<NM>(); ++z)
      for (int bd : order(B * ndir))
        for (int d : order(D)) mc::fwd_prefix_thread<NM>(p, plan, bd / ndir, bd % ndir, d, z * mc::kPrefixStates);
    for (int c : order(plan.nchunks))
      for (int b : order(B))
        for (int d : order(D)) {
          if (bi) mc::fwd_out_thread<float, NM, true, M, TR>(p, plan, b, d, c, ebuf.data(), 1);
          else mc::fwd_out_thread<float, NM, false, M, TR>(p, plan, b, d, c, ebuf.data(), 1);
        }
  });
  return {y, fs, torch::tensor({plan.chunk, plan.nchunks})};
}

template <int NM>
Tensors bwd_nm(torch::Tensor gy, Opt gs, torch::Tensor x, Tensors co, torch::Tensor omega, Opt mask, Opt state, bool bi,
               int64_t K) {
  const int B = x.size(0), L = x.size(1), D = x.size(2), N = co[0].size(1), kd = bi ? 2 * D : D, ndir = bi ? 2 : 1;
  const mc::Plan plan = mc::bwd_plan(B, L, D);
  const int C = plan.nchunks;
  auto dx = nans(x.sizes()), ds = nans({B, D, N}), gbuf = nans({B, L, D});
  auto dxm = bi ? nans({B, L, D}) : torch::Tensor();  // as the CUDA op: direction 0's share of dx, bidirectional
  auto ws = nans({3 * mc::bwd_region_floats(plan, B, D, N, bi)});
  auto pc = torch::zeros({B * C, kd, N}), pa = torch::zeros_like(pc), pq = torch::zeros_like(pc);
  auto pom = torch::zeros({B * C, D});
  mc::BwdParams p{x.data_ptr(), gy.data_ptr(), mask_ptr(mask), coefs(co), omega.data_ptr<float>(), fptr(state),
                  fptr(gs), dx.data_ptr(), state ? ds.data_ptr<float>() : nullptr, pc.data_ptr<float>(),
                  pa.data_ptr<float>(), pq.data_ptr<float>(), pom.data_ptr<float>(), gbuf.data_ptr<float>(),
                  bi ? dxm.data_ptr<float>() : nullptr, ws.data_ptr<float>(), B, L, D, N, static_cast<int>(K), bi};
  // the launches of ema_cuda.cu's bwd(), in order
  mc::pick_sweep(p.mask != nullptr, p.K > 0, [&](auto mask, auto trunc) {
    constexpr bool M = decltype(mask)::value, TR = decltype(trunc)::value;
    for (int c : order(C))
      for (int bd : order(B * ndir))
        for (int d : order(D)) mc::bwd_local_thread<float, NM, M, TR>(p, plan, bd / ndir, bd % ndir, d, c);
    for (int z = 0; z < mc::prefix_groups<NM>(); ++z)
      for (int bd : order(B * ndir))
        for (int d : order(D)) mc::bwd_prefix_thread<NM>(p, plan, bd / ndir, bd % ndir, d, z * mc::kPrefixStates);
    if (bi)
      for (int c : order(C))
        for (int b : order(B))
          for (int d : order(D)) mc::bwd_other_output_thread<float, NM, M, TR>(p, plan, b, d, c);
    for (int dir_idx = 0; dir_idx < ndir; ++dir_idx)
      mc::pick_param_pass<TR>(p, dir_idx, [&](auto pass) {
        for (int c : order(C))
          for (int b : order(B))
            for (int d : order(D))
              mc::bwd_params_thread<float, NM, M, TR, decltype(pass)::value>(p, plan, b, d, c);
      });
    for (int c : order(C))
      for (int bd : order(B * ndir))
        for (int d : order(D)) mc::bwd_adjoint_local_thread<NM, TR>(p, plan, bd / ndir, bd % ndir, d, c);
    for (int z = 0; z < mc::prefix_groups<NM>(); ++z)
      for (int bd : order(B * ndir))
        for (int d : order(D))
          mc::bwd_adjoint_prefix_thread<NM>(p, plan, bd / ndir, bd % ndir, d, z * mc::kPrefixStates);
    for (int c : order(C))
      for (int b : order(B))
        for (int d : order(D)) mc::bwd_dx_thread<float, NM, TR>(p, plan, b, d, c);
  });
  return {dx, pa.sum(0), pq.sum(0), pc.sum(0), pom.sum(0), ds};
}

template <int NM>
Tensors step_nm(torch::Tensor x, Tensors co, torch::Tensor omega, torch::Tensor state, Opt mask) {
  const int B = x.size(0), D = x.size(1), N = co[0].size(1);
  auto y = nans(x.sizes()), ns = nans({B, D, N});
  mc::StepParams p{x.data_ptr(), mask_ptr(mask), coefs(co), omega.data_ptr<float>(), state.data_ptr<float>(),
                   y.data_ptr(), ns.data_ptr<float>(), B, D, N};
  const int64_t threads = static_cast<int64_t>(B) * D;
  for (int64_t i = 0; i < threads; ++i) mc::step_thread<float, NM>(p, g_reverse ? threads - 1 - i : i);
  return {y, ns};
}

// The NM of the CUDA dispatch (ema_cuda.cu) for N; exhaustive like it (padded_n is 0 for an N out of range).
#define MK_EMU_DISPATCH(F, N, ...)                                                            \
  switch (mc::padded_n(N)) {                                                                  \
    case 4: return F<4>(__VA_ARGS__);                                                         \
    case 8: return F<8>(__VA_ARGS__);                                                         \
    case 16: return F<16>(__VA_ARGS__);                                                       \
    case 32: return F<32>(__VA_ARGS__);                                                       \
    default: TORCH_CHECK(false, "emulator: no CUDA kernel instantiation for N = ", N);        \
  }

// The CUDA ops' checks, on the CPU tensors the emulator runs the kernels' code on.
const mega_kernels::ema::Backend kEmulated{"cuda", at::kCPU, mega_kernels::ema::check_cuda_args};

void check_coefs(const Tensors& co) {
  TORCH_CHECK(co.size() == 6, "emulator: co must hold a, q, c, aqk, qk, kaqk1");
  for (const auto& t : co) TORCH_CHECK(t.sizes() == co[0].sizes(), "emulator: the coefficients differ in shape");
}

Tensors fwd(torch::Tensor x, Tensors co, torch::Tensor omega, Opt mask, Opt state, bool bi, int64_t K, bool ret) {
  check_coefs(co);
  mega_kernels::ema::check_fwd(kEmulated, x, co[0], co[1], co[2], omega, mask, state, bi, K, ret);
  MK_EMU_DISPATCH(fwd_nm, co[0].size(1), x, co, omega, mask, state, bi, K, ret);
}
Tensors bwd(torch::Tensor gy, Opt gs, torch::Tensor x, Tensors co, torch::Tensor omega, Opt mask, Opt state, bool bi,
            int64_t K) {
  check_coefs(co);
  mega_kernels::ema::check_bwd(kEmulated, gy, gs, x, co[0], co[1], co[2], omega, mask, state, bi, K);
  MK_EMU_DISPATCH(bwd_nm, co[0].size(1), gy, gs, x, co, omega, mask, state, bi, K);
}
Tensors step(torch::Tensor x, Tensors co, torch::Tensor omega, torch::Tensor state, Opt mask) {
  check_coefs(co);
  mega_kernels::ema::check_step(kEmulated, x, co[0], co[1], co[2], omega, state, mask);
  MK_EMU_DISPATCH(step_nm, co[0].size(1), x, co, omega, state, mask);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "chunked forward: (y, final state, (chunk, nchunks))");
  m.def("bwd", &bwd, "backward: (dx, da, dq, dc, domega, dstate)");
  m.def("step", &step, "decoding step: (y, new state)");
  m.def("set_reverse", &set_reverse, "run the threads and blocks of every launch in reverse order (or not)");
}
