// CPU implementation of mega_kernels::ema_fwd / ema_bwd / ema_step (maths: ema_kernels.cuh).
// Work is split into tasks of (batch row, block of W contiguous channels) run by at::parallel_for; inside a
// task the loop over time carries the N x W state on the stack and the loops over the W channels are
// contiguous, so the compiler vectorises them (target_clones builds AVX-512 / AVX2 / baseline copies and
// picks one at load time; everything a sweep calls per step must be inlined into them). A decoding step runs
// over blocks of (batch row, channel) lanes instead. Gradients of a, q, c, omega are summed per task and then
// over the batch in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "ema_checks.h"
#include "ema_kernels.cuh"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MK_CLONES
#endif
// The per-step lambdas handed to the sweeps must be inlined: an outlined lambda is compiled once, for the
// baseline ISA, and called at every step (the bidirectional forward's output ran 2x slower that way).
#if defined(__GNUC__)
#define MK_INLINE_LAMBDA __attribute__((always_inline))
#else
#define MK_INLINE_LAMBDA
#endif

namespace mega_kernels {
namespace ema {
namespace {

// Channels per task. A task reads W channels of each row of x, D apart: 32 float32 lanes (two cache lines per
// row) took the forward from 15.4 to 9.2 ms at B4 L4096 D256 N16 (with the fused output; benchmarks/NOTES.md,
// session 17). The backward holds ten N x W arrays, which at W = 32 outgrow L1: it keeps 16 (measured no faster
// at 32).
template <typename A> constexpr int fwd_lanes() { return sizeof(A) == 8 ? 8 : 32; }
template <typename A> constexpr int bwd_lanes() { return sizeof(A) == 8 ? 8 : 16; }

template <typename T, typename A>
struct Args {
  const T* x; const T* gy; const bool* mask;
  const A *a, *q, *c, *aqk, *qk, *kaqk1, *omega, *state, *gstate;  // state / gstate may be null
  T* y; T* dx; A* final_state; A* dstate;                         // outputs (null when not wanted)
  A *pc, *pa, *pq, *pomega;                                        // per-batch partial gradients
  int64_t B, L, D, N; int K; bool bi;
  int64_t tasks(int W) const { return B * ((D + W - 1) / W); }
  // Scratch per thread: fwd_task's e rows (bidirectional only), coefficients, state and restarted scan;
  // bwd_task's g and dx rows, coefficients, states, restarted scans, sums and omega.
  int64_t fwd_work(int W) const { return ((bi ? L : 0) + 8 * N) * W; }
  int64_t bwd_work(int W) const { return (2 * L + 18 * N + 1) * W; }
};

// Copies rows [row0 + d0, row0 + d0 + nw) of the (kd, N) coefficient tensors into [n * W + w] blocks.
template <int W, typename T, typename A>
MK_HD Coefs<A> gather(const Args<T, A>& p, int64_t row0, int64_t d0, int nw, A* dst) {
  const A* src[6] = {p.a, p.q, p.c, p.aqk, p.qk, p.kaqk1};
  const int64_t N = p.N;
  for (int k = 0; k < 6; ++k)
    for (int64_t n = 0; n < N; ++n)
      for (int w = 0; w < W; ++w) dst[(k * N + n) * W + w] = w < nw ? src[k][(row0 + d0 + w) * N + n] : A(0);
  const int64_t s = N * W;
  return {dst, dst + s, dst + 2 * s, dst + 3 * s, dst + 4 * s, dst + 5 * s};
}

template <int W, typename A>
MK_HD void load_state(A* h, const A* s, int64_t b, int64_t d0, int nw, int64_t D, int64_t N) {
  for (int64_t n = 0; n < N; ++n)
    for (int w = 0; w < W; ++w) h[n * W + w] = (s && w < nw) ? s[((b * D) + d0 + w) * N + n] : A(0);
}

template <int W, typename A>
MK_HD void store_state(A* s, const A* h, int64_t b, int64_t d0, int nw, int64_t D, int64_t N) {
  for (int64_t n = 0; n < N; ++n)
    for (int w = 0; w < nw; ++w) s[((b * D) + d0 + w) * N + n] = h[n * W + w];
}

// y_t = silu(e [+ other] + omega x_t) over the lanes, stored (the output of the forward's last sweep).
template <int W, typename T, typename A>
MK_HD void store_output(T* y, const T* x, int nw, const A* MK_R e, const A* MK_R other, const A* MK_R om) {
  A xr[W], z[W];
  load_lanes<W>(xr, x, nw);
  if (other) {
    for (int w = 0; w < W; ++w) z[w] = silu((e[w] + other[w]) + om[w] * xr[w]);
  } else {
    for (int w = 0; w < W; ++w) z[w] = silu(e[w] + om[w] * xr[w]);
  }
  store_lanes<W>(y, z, nw);
}

template <typename T, typename A, int W>
MK_HD void fwd_task(const Args<T, A>& p, int64_t task, A* work) {
  const int64_t nblk = (p.D + W - 1) / W, b = task / nblk, d0 = (task % nblk) * W, L = p.L, N = p.N;
  const int nw = static_cast<int>(std::min<int64_t>(W, p.D - d0));
  const Lanes<T> in{p.x + b * L * p.D + d0, p.mask ? p.mask + b * L : nullptr, p.D, static_cast<int>(L), nw};
  A* ebuf = work;  // the forward rows' e, while the backward rows run (bidirectional only)
  A* cw = ebuf + (p.bi ? L * W : 0);
  A* h = cw + 6 * N * W;
  A* rs = h + N * W;  // the truncated sweeps' restarted scan (ema_kernels.cuh, "Anchoring"), 0 at the start
  A om[W];
  for (int w = 0; w < W; ++w) om[w] = w < nw ? p.omega[d0 + w] : A(0);
  // The last sweep forms y_t while x_t is in cache (no pass of its own).
  T* y = p.y + b * L * p.D + d0;
  Coefs<A> cf = gather<W>(p, 0, d0, nw, cw);
  load_state<W>(h, p.state, b, d0, nw, p.D, N);
  std::fill(rs, rs + N * W, A(0));
  scan_fwd<W, 0>(in, +1, 0, in.L, p.K, static_cast<int>(N), cf, h, rs, [&](int64_t t, const A* e) MK_INLINE_LAMBDA {
    if (p.bi) {
      for (int w = 0; w < W; ++w) ebuf[t * W + w] = e[w];
    } else {
      store_output<W>(y + t * p.D, in.x + t * p.D, nw, e, static_cast<const A*>(nullptr), om);
    }
  });
  if (p.final_state) store_state<W>(p.final_state, h, b, d0, nw, p.D, N);
  if (p.bi) {
    cf = gather<W>(p, p.D, d0, nw, cw);
    load_state<W, A>(h, nullptr, b, d0, nw, p.D, N);
    std::fill(rs, rs + N * W, A(0));
    scan_fwd<W, 0>(in, -1, 0, in.L, p.K, static_cast<int>(N), cf, h, rs,
                   [&](int64_t t, const A* e) MK_INLINE_LAMBDA {
                     store_output<W>(y + t * p.D, in.x + t * p.D, nw, ebuf + t * W, e, om);
                   });
  }
}

template <typename T, typename A, int W>
MK_HD void bwd_task(const Args<T, A>& p, int64_t task, A* work) {
  const int64_t nblk = (p.D + W - 1) / W, b = task / nblk, d0 = (task % nblk) * W, L = p.L, N = p.N;
  const int nw = static_cast<int>(std::min<int64_t>(W, p.D - d0));
  const int Ni = static_cast<int>(N);
  const Lanes<T> in{p.x + b * L * p.D + d0, p.mask ? p.mask + b * L : nullptr, p.D, static_cast<int>(L), nw};
  const T* gy = p.gy + b * L * p.D + d0;
  const int64_t s = N * W;
  A* gbuf = work;
  A* dxm = gbuf + L * W;
  A* cw = dxm + L * W;
  A *h = cw + 6 * s, *H = h + s, *P = H + s, *sc = P + s, *sH = sc + s, *sP = sH + s, *r = sP + s;
  A *tc = r + s, *tH = tc + s, *tP = tH + s;  // totals of sc, sH, sP over the blocks of kSumBlock steps
  A* rh = tP + s;  // 2 N x W for the truncated sweeps' restarted scans (ema_kernels.cuh, "Anchoring")
  A* om = rh + 2 * s;                         // omega of the lane group
  A somega[W], tomega[W];
  for (int w = 0; w < W; ++w) {
    om[w] = w < nw ? p.omega[d0 + w] : A(0);
    somega[w] = tomega[w] = A(0);
  }
  Coefs<A> cf;
  if (p.bi) {  // the backward direction's output enters z: keep it in gbuf, where the first sweep reads it
    cf = gather<W>(p, p.D, d0, nw, cw);
    load_state<W, A>(h, nullptr, b, d0, nw, p.D, N);
    std::fill(rh, rh + s, A(0));
    scan_fwd<W, 0>(in, -1, 0, in.L, p.K, Ni, cf, h, rh, [&](int64_t t, const A* e) MK_INLINE_LAMBDA {
      for (int w = 0; w < W; ++w) gbuf[t * W + w] = e[w];
    });
  }
  for (int dir = +1; dir >= -1; dir -= 2) {
    if (dir < 0 && !p.bi) break;
    const int64_t row0 = dir > 0 ? 0 : p.D;
    cf = gather<W>(p, row0, d0, nw, cw);
    load_state<W>(h, dir > 0 ? p.state : nullptr, b, d0, nw, p.D, N);
    std::fill(H, H + 5 * s, A(0));    // H, P, sc, sH, sP
    std::fill(tc, tc + 5 * s, A(0));  // tc, tH, tP and the restarted rH, rP
    for (int i0 = 0; i0 < in.L; i0 += kSumBlock) {
      const int i1 = std::min(in.L, i0 + kSumBlock);
      if (dir > 0) {
        scan_params<W, 0, true>(in, gy, p.bi ? static_cast<const A*>(gbuf) : nullptr, gbuf, W, om, somega, +1, i0,
                                i1, p.K, Ni, cf, h, H, P, rh, sc, sH, sP);
      } else {
        scan_params<W, 0, false>(in, gy, static_cast<const A*>(nullptr), gbuf, W, om, somega, -1, i0, i1, p.K, Ni,
                                 cf, h, H, P, rh, sc, sH, sP);
      }
      fold_sums(tc, sc, 3 * s);  // sc, sH, sP are contiguous, as are tc, tH, tP
      fold_sums(tomega, somega, W);
    }
    const bool gs = dir > 0 && p.gstate != nullptr;
    load_state<W>(r, gs ? p.gstate : nullptr, b, d0, nw, p.D, N);  // r = dL/dh_{L-1} = G
    for (int64_t n = 0; n < N; ++n) {
      for (int w = 0; w < nw; ++w) {
        const int64_t j = n * W + w, o = (b * 2 * p.D + row0 + d0 + w) * N + n;
        p.pc[o] = p.K > 0 ? cf.a[j] * tH[j] : tc[j];  // (truncated: h = a H, see scan_params)
        p.pa[o] = cf.c[j] * tH[j] + r[j] * H[j];
        p.pq[o] = cf.c[j] * tP[j] + r[j] * P[j];
      }
    }
    std::copy(r, r + s, rh);  // the restarted carry starts where r does (G = 0: no state with truncation)
    scan_adjoint<W, 0>(gbuf, dxm, W, in.L, dir, 0, in.L, p.K, Ni, cf, r, rh, dir < 0);
    if (dir > 0 && p.dstate) store_state<W>(p.dstate, r, b, d0, nw, p.D, N);
  }
  A out[W];
  for (int64_t t = 0; t < L; ++t) {
    const A m = (p.mask == nullptr || p.mask[b * L + t]) ? A(1) : A(0);
    for (int w = 0; w < W; ++w) out[w] = om[w] * gbuf[t * W + w] + m * dxm[t * W + w];
    store_lanes<W>(p.dx + (b * L + t) * p.D + d0, out, nw);
  }
  for (int w = 0; w < nw; ++w) p.pomega[b * p.D + d0 + w] = tomega[w];
}

// One decoding step over the lanes [begin, end) of (B x D): per lane, the state update and z (step_lane_z: the
// sum over n in the sweep's order), then y = silu(z) over blocks of lanes, vectorised.
template <typename T, typename A>
struct StepArgs {
  const T* x; const bool* mask; const A *a, *q, *c, *omega, *state; A* new_state; T* y;
  int64_t D, N;
};

template <typename T, typename A>
MK_HD void step_task(const StepArgs<T, A>& s, int64_t begin, int64_t end) {
  constexpr int W = fwd_lanes<A>();
  const int64_t N = s.N;
  for (int64_t i0 = begin; i0 < end; i0 += W) {
    const int nl = static_cast<int>(std::min<int64_t>(W, end - i0));
    A z[W];
    for (int k = 0; k < W; ++k) z[k] = A(0);
    int64_t b = i0 / s.D, d = i0 % s.D;
    for (int k = 0; k < nl; ++k) {
      const int64_t i = i0 + k;
      const A xv = to_acc<A>(s.x[i]), xm = (s.mask == nullptr || s.mask[b]) ? xv : A(0);
      z[k] = step_lane_z<0>(xm, xv, s.omega[d], s.a + d * N, s.q + d * N, s.c + d * N, s.state + i * N, 1,
                            s.new_state + i * N, 1, static_cast<int>(N));
      if (++d == s.D) {
        d = 0;
        ++b;
      }
    }
    for (int k = 0; k < W; ++k) z[k] = silu(z[k]);
    store_lanes<W>(s.y + i0, z, nl);
  }
}

// Non-template entry points, one per dtype, so target_clones can compile each for several ISAs.
#define MK_DEFINE_TASKS(T, A)                                                                        \
  MK_CLONES void run_fwd(const Args<T, A>& p, int64_t task, A* work) {                               \
    fwd_task<T, A, fwd_lanes<A>()>(p, task, work);                                                   \
  }                                                                                                  \
  MK_CLONES void run_bwd(const Args<T, A>& p, int64_t task, A* work) {                               \
    bwd_task<T, A, bwd_lanes<A>()>(p, task, work);                                                   \
  }                                                                                                  \
  MK_CLONES void run_step(const StepArgs<T, A>& s, int64_t begin, int64_t end) { step_task<T, A>(s, begin, end); }
MK_DEFINE_TASKS(float, float)
MK_DEFINE_TASKS(double, double)
MK_DEFINE_TASKS(c10::Half, float)
MK_DEFINE_TASKS(c10::BFloat16, float)
#undef MK_DEFINE_TASKS

// Tasks per thread at least: waking the pool costs about what a task of ~32K state updates does (a decoding
// step's whole batch, say), so smaller problems run on the calling thread. Measured at B1 D64 N16, two tasks of
// 32 lanes: L 64 (32K updates per task) forward 25 us on one thread, 21 on two; L 256, 57 and 34 us.
inline int64_t task_grain(int64_t L, int64_t N, int W) {
  constexpr int64_t kMinWork = 1 << 15;
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, L * N * W));
}

template <typename T, typename A, typename F>
void run_tasks(const Args<T, A>& p, int W, int64_t work_size, F fn) {
  at::parallel_for(0, p.tasks(W), task_grain(p.L, p.N, W), [&](int64_t begin, int64_t end) {
    std::vector<A> work(work_size);
    for (int64_t task = begin; task < end; ++task) fn(p, task, work.data());
  });
}

template <typename A>
const A* opt_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<A>() : nullptr; }

template <typename T, typename A>
Args<T, A> make_args(const Prepared& pr, bool bi, int64_t K) {
  Args<T, A> p{};
  p.x = pr.x.data_ptr<T>();
  p.mask = pr.mask.defined() ? pr.mask.data_ptr<bool>() : nullptr;
  p.a = pr.a.data_ptr<A>(); p.q = pr.q.data_ptr<A>(); p.c = pr.c.data_ptr<A>();
  p.aqk = pr.aqk.data_ptr<A>(); p.qk = pr.qk.data_ptr<A>(); p.kaqk1 = pr.kaqk1.data_ptr<A>();
  p.omega = pr.omega.data_ptr<A>();
  p.state = opt_ptr<A>(pr.state);
  p.B = pr.x.size(0); p.L = pr.x.size(1); p.D = pr.x.size(2); p.N = pr.a.size(1);
  p.K = static_cast<int>(K); p.bi = bi;
  return p;
}

#define MK_DISPATCH(dtype, ...)                                                                    \
  switch (dtype) {                                                                               \
    case at::kFloat: { using T = float; using A = float; __VA_ARGS__(); break; }                 \
    case at::kDouble: { using T = double; using A = double; __VA_ARGS__(); break; }              \
    case at::kHalf: { using T = c10::Half; using A = float; __VA_ARGS__(); break; }              \
    case at::kBFloat16: { using T = c10::BFloat16; using A = float; __VA_ARGS__(); break; }      \
    default: TORCH_CHECK(false, "ema: unsupported dtype ", dtype);                                \
  }

const Backend kCpu{"cpu", at::kCPU, nullptr};  // the CPU kernels take every valid input

std::tuple<at::Tensor, at::Tensor> ema_fwd_cpu(const at::Tensor& x, const at::Tensor& a, const at::Tensor& q,
                                               const at::Tensor& c, const at::Tensor& omega,
                                               const c10::optional<at::Tensor>& mask,
                                               const c10::optional<at::Tensor>& state, bool bidirectional,
                                               int64_t truncation, bool return_state) {
  check_fwd(kCpu, x, a, q, c, omega, mask, state, bidirectional, truncation, return_state);
  const auto pr = prepare(x, a, q, c, omega, mask, state, truncation);
  auto y = at::empty_like(pr.x);
  auto final_state = return_state ? at::empty({x.size(0), x.size(2), a.size(1)}, x.options().dtype(acc_type(x)))
                                  : at::empty({0}, x.options().dtype(acc_type(x)));
  MK_DISPATCH(x.scalar_type(), [&] {
    auto p = make_args<T, A>(pr, bidirectional, truncation);
    p.y = y.data_ptr<T>();
    p.final_state = return_state ? final_state.data_ptr<A>() : nullptr;
    constexpr int W = fwd_lanes<A>();
    run_tasks(p, W, p.fwd_work(W), [](const Args<T, A>& pp, int64_t task, A* work) { run_fwd(pp, task, work); });
  });
  return {y, final_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ema_bwd_cpu(
    const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_state, const at::Tensor& x,
    const at::Tensor& a, const at::Tensor& q, const at::Tensor& c, const at::Tensor& omega,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& state, bool bidirectional,
    int64_t truncation) {
  check_bwd(kCpu, grad_y, grad_state, x, a, q, c, omega, mask, state, bidirectional, truncation);
  const auto pr = prepare(x, a, q, c, omega, mask, state, truncation);
  const auto acc = acc_type(x);
  const int64_t B = x.size(0), D = x.size(2), N = a.size(1);
  const auto grads = prepare_grads(grad_y, grad_state, x);
  const at::Tensor &gy = grads.gy, &gs = grads.gs;
  auto dx = at::empty_like(pr.x);
  auto opts = x.options().dtype(acc);
  auto pc = at::zeros({B, 2 * D, N}, opts), pa = at::zeros_like(pc), pq = at::zeros_like(pc);  // per batch
  auto pomega = at::empty({B, D}, opts);
  auto dstate = state.has_value() ? at::empty({B, D, N}, opts) : at::Tensor();
  MK_DISPATCH(x.scalar_type(), [&] {
    auto p = make_args<T, A>(pr, bidirectional, truncation);
    p.gy = gy.data_ptr<T>();
    p.gstate = opt_ptr<A>(gs);
    p.dx = dx.data_ptr<T>();
    p.dstate = dstate.defined() ? dstate.data_ptr<A>() : nullptr;
    p.pc = pc.data_ptr<A>(); p.pa = pa.data_ptr<A>(); p.pq = pq.data_ptr<A>();
    p.pomega = pomega.data_ptr<A>();
    constexpr int W = bwd_lanes<A>();
    run_tasks(p, W, p.bwd_work(W), [](const Args<T, A>& pp, int64_t task, A* work) { run_bwd(pp, task, work); });
  });
  // Sum the per-batch partials over b in order (deterministic; at::sum's order may depend on threads).
  auto sum_batches = [&](const at::Tensor& t) {
    if (B == 0) return at::zeros(t.sizes().slice(1), t.options());  // an empty batch adds nothing
    auto out = t[0].clone();
    for (int64_t b = 1; b < B; ++b) out.add_(t[b]);
    return out;
  };
  const int64_t kd = a.size(0);
  auto grad = [&](const at::Tensor& t, const at::Tensor& like) {
    return sum_batches(t).narrow(0, 0, kd).to(like.scalar_type());
  };
  at::Tensor gstate_out = state.has_value() ? dstate.to(state->scalar_type()) : at::empty({0}, a.options());
  return {dx, grad(pa, a), grad(pq, q), grad(pc, c), sum_batches(pomega).to(omega.scalar_type()), gstate_out};
}

std::tuple<at::Tensor, at::Tensor> ema_step_cpu(const at::Tensor& x, const at::Tensor& a, const at::Tensor& q,
                                                const at::Tensor& c, const at::Tensor& omega,
                                                const at::Tensor& state, const c10::optional<at::Tensor>& mask) {
  const auto mask1 = check_step(kCpu, x, a, q, c, omega, state, mask);
  const auto pr = prepare(x.unsqueeze(1), a, q, c, omega, mask1, state, 0);
  const int64_t B = x.size(0), D = x.size(1), N = a.size(1);
  auto y = at::empty({B, D}, x.options());
  auto out_state = at::empty({B, D, N}, x.options().dtype(acc_type(x)));
  MK_DISPATCH(x.scalar_type(), [&] {
    StepArgs<T, A> s{pr.x.data_ptr<T>(), pr.mask.defined() ? pr.mask.data_ptr<bool>() : nullptr,
                     pr.a.data_ptr<A>(), pr.q.data_ptr<A>(), pr.c.data_ptr<A>(), pr.omega.data_ptr<A>(),
                     pr.state.data_ptr<A>(), out_state.data_ptr<A>(), y.data_ptr<T>(), D, N};
    at::parallel_for(0, B * D, task_grain(1, N, 1), [&](int64_t begin, int64_t end) { run_step(s, begin, end); });
  });
  return {y, out_state};
}

// The number of threads at::parallel_for spreads this file's tasks over: torch's thread count when the file is
// compiled with OpenMP (-fopenmp, mega_kernels/_build.py), 1 when it is not, since parallel_for is a header
// template that otherwise runs the whole range on the calling thread. `mega-kernels info` shows it.
// Thread numbers past torch's count (a second OpenMP runtime, which torch.set_num_threads does not size) count
// too, so a caller can tell both faults apart from the expected count.
int64_t cpu_parallel_threads() {
  const int64_t n = at::get_num_threads();
  std::vector<char> seen(n, 0);  // one byte per thread number: threads never write the same one
  std::atomic<int64_t> beyond{0};
  at::parallel_for(0, 4 * n, 1, [&](int64_t, int64_t) {
    const int tid = at::get_thread_num();
    if (tid >= 0 && tid < n) seen[tid] = 1; else beyond.fetch_add(1);
  });
  return beyond.load() + std::count(seen.begin(), seen.end(), char(1));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mega_kernels, m) { m.def("cpu_parallel_threads() -> int", &cpu_parallel_threads); }

TORCH_LIBRARY_IMPL(mega_kernels, CPU, m) {
  m.impl("ema_fwd", &ema_fwd_cpu);
  m.impl("ema_bwd", &ema_bwd_cpu);
  m.impl("ema_step", &ema_step_cpu);
}

}  // namespace ema
}  // namespace mega_kernels
