// The CUDA EMA kernels at thread level: what one CUDA thread computes, given its indices (ema_cuda.cu maps
// blocks and threads onto these; the phases are described there). Free of CUDA and torch, so the host
// compiler runs the same code on the CPU to test the kernels' logic without a GPU
// (csrc/testing/ema_cuda_emulator.cpp, tests/test_ema_cuda.py). Maths: ema_kernels.cuh.
#pragma once
#include "ema_cuda.h"
#include "ema_kernels.cuh"

namespace mega_kernels {
namespace ema {
namespace cuda {

static_assert(kBwdMaxChunk == 2 * kSumBlock, "backward chunks hold two blocks of the gradient sums");
static_assert(kThreads * kBiChunk * sizeof(float) <= 48 * 1024, "the bidirectional forward's shared memory "
              "(kThreads * kBiChunk floats) must fit the 48 KiB a block gets without opting in");

// States live in NM registers: N padded up to 4, 8, 16 or 32. 0 for an N the kernels do not take
// (N < 1 or N > kMaxN): every dispatch on padded_n treats 0 as an error, never as the largest NM.
MK_HD int padded_n(int N) {
  return N < 1 ? 0 : N <= 4 ? 4 : N <= 8 ? 8 : N <= 16 ? 16 : N <= kMaxN ? 32 : 0;
}
static_assert(kMaxN == 32, "padded_n and the dispatches instantiate NM = 4, 8, 16, 32 only");

template <int NM>
struct Reg {
  float a[NM], q[NM], c[NM], aqk[NM], qk[NM], kaqk1[NM];
  MK_HD void load(const Coefs6& s, int row, int N) {
    MK_UNROLL for (int n = 0; n < NM; ++n) {
      const bool in = n < N;
      const int j = row * N + n;
      a[n] = in ? s.a[j] : 0.f;
      q[n] = in ? s.q[j] : 0.f;
      c[n] = in ? s.c[j] : 0.f;
      aqk[n] = in ? s.aqk[j] : 0.f;
      qk[n] = in ? s.qk[j] : 0.f;
      kaqk1[n] = in ? s.kaqk1[j] : 0.f;
    }
  }
  MK_HD Coefs<float> view() const { return {a, q, c, aqk, qk, kaqk1}; }
};

// Floats of the forward workspace: one state of padded_n(N) per (b, direction, chunk, channel).
inline int64_t workspace_floats(const Plan& plan, int B, int D, int N, bool bi) {
  return static_cast<int64_t>(B) * (bi ? 2 : 1) * plan.nchunks * padded_n(N) * D;
}

MK_HD void chunk_positions(int chunk, int T, int L, int dir, int& i0, int& i1) {
  const int t0 = chunk * T, t1 = L < t0 + T ? L : t0 + T;
  i0 = dir > 0 ? t0 : L - t1;
  i1 = dir > 0 ? t1 : L - t0;
}

// workspace index of (b, direction, chunk, n, d)
MK_HD int64_t ws_index(int b, int dir_idx, int ndir, int chunk, int nch, int n, int NM, int d,
                                            int D) {
  return ((((static_cast<int64_t>(b) * ndir + dir_idx) * nch + chunk) * NM + n) * D) + d;
}

// -- the time loop of every sweep over x: rows loaded a group ahead --------------------------------------
// A sweep's loads do not depend on its state, so sweep_rows issues the loads of the next group of U steps
// before it computes the current U steps: each thread keeps a group of rows in flight while it computes
// (a scan that loads each row when it needs it waits for the memory latency at every step). A group holds
// kRowGroup rows of x: U = kRowGroup steps, kRowGroup / 2 when truncated (x_i and x_{i-K} per step), and
// kRowGroup / 4 when truncated and masked (four loads per step; more would cost N = 32 spills). The rows
// stay raw in registers (converted and masked where used), so no instruction waits on them early.
// MASK (a mask is given) and TRUNC (K > 0) are compile-time, as kernel template arguments: each case is
// its own kernel, with no test inside the time loop and its own register count (pick_sweep below).
template <bool MASK, bool TRUNC>
constexpr int row_group_steps() { return TRUNC ? (MASK ? kRowGroup / 4 : kRowGroup / 2) : kRowGroup; }

// Where a sweep reads the group at position ib: element off of x and moff of the mask; one position
// further is step (mstep) elements, K positions back is back (mback). Offsets, not pointers: past the
// sweep's ends they are formed but never read.
template <typename T>
struct RowCursor {
  const T* x;
  const bool* mask;
  int64_t off, step, back;
  int moff, mstep, mback;
};

template <typename T, bool MASK, bool TRUNC>
struct RowGroup {
  static constexpr int U = row_group_steps<MASK, TRUNC>();
  T x[U], xo[U];           // x at the positions ib + k and (TRUNC) ib + k - K of the direction
  bool keep[U], keepo[U];  // their mask (MASK)
  // Loads the group at c: the rows k < left (positions before the sweep's end) and, for xo, k >= -before
  // (ib + k - K >= 0); the others read as 0. When every row of the group exists (the usual case; the test
  // is the same for the whole warp) the loads need no predicates, which the compiler would otherwise keep
  // few of and answer by issuing the loads late, after the arithmetic.
  MK_HD void load(const RowCursor<T>& c, int left, int before) {
    if (left >= U && (!TRUNC || before >= 0)) {
      MK_UNROLL for (int k = 0; k < U; ++k) {
        const int64_t o = c.off + k * c.step;
        const int mo = c.moff + k * c.mstep;
        x[k] = c.x[o];
        if (MASK) keep[k] = c.mask[mo];
        if (TRUNC) {
          xo[k] = c.x[o - c.back];
          if (MASK) keepo[k] = c.mask[mo - c.mback];
        }
      }
      return;
    }
    MK_UNROLL for (int k = 0; k < U; ++k) {
      const bool ok = k < left, oko = ok && k >= -before;
      const int64_t o = c.off + k * c.step;
      const int mo = c.moff + k * c.mstep;
      x[k] = ok ? c.x[o] : T(0.f);
      if (MASK) keep[k] = ok && c.mask[mo];
      if (TRUNC) {
        xo[k] = oko ? c.x[o - c.back] : T(0.f);
        if (MASK) keepo[k] = oko && c.mask[mo - c.mback];
      }
    }
  }
  MK_HD float raw(int k) const { return to_acc<float>(x[k]); }
  MK_HD float xm(int k) const { return (!MASK || keep[k]) ? to_acc<float>(x[k]) : 0.f; }
  MK_HD float xom(int k) const { return TRUNC && (!MASK || keepo[k]) ? to_acc<float>(xo[k]) : 0.f; }
};

// Runs body(i, x_i, xm_i, xm_{i-K}) for the positions i = i0 .. i1-1 of direction dir, in order
// (xm: masked; xm_{i-K} = 0 without TRUNC or for i < K). MASK: in.mask is not null.
template <typename T, bool MASK, bool TRUNC, typename Body>
MK_HD void sweep_rows(const Lanes<T>& in, int dir, int i0, int i1, int K, Body body) {
  using Group = RowGroup<T, MASK, TRUNC>;
  constexpr int U = Group::U;
  const int t0 = time_of(i0, dir, in.L);
  const int64_t step = dir > 0 ? in.ts : -in.ts;
  RowCursor<T> c{in.x, in.mask, static_cast<int64_t>(t0) * in.ts, step, static_cast<int64_t>(K) * step,
                 t0, dir, dir > 0 ? K : -K};
  Group next;
  next.load(c, i1 - i0, i0 - K);
  int ib = i0;
  for (; ib + U <= i1; ib += U) {  // full groups
    const Group cur = next;
    c.off += U * c.step;
    c.moff += U * c.mstep;
    next.load(c, i1 - ib - U, ib + U - K);
    MK_UNROLL for (int k = 0; k < U; ++k) body(ib + k, cur.raw(k), cur.xm(k), cur.xom(k));
  }
  MK_UNROLL for (int k = 0; k < U; ++k) {  // the last, partial group (already loaded)
    if (ib + k >= i1) break;
    body(ib + k, next.raw(k), next.xm(k), next.xom(k));
  }
}

// Host side (launchers, emulator): f(Flag<MASK>(), Flag<TRUNC>()) for a mask given or not and K > 0 or not,
// so each caller instantiates the four cases of the sweep kernels the same way.
template <bool B>
struct Flag {
  static constexpr bool value = B;
};
template <typename F>
inline auto pick_sweep(bool mask, bool trunc, F&& f) -> decltype(f(Flag<false>(), Flag<false>())) {
  if (mask) return trunc ? f(Flag<true>(), Flag<true>()) : f(Flag<true>(), Flag<false>());
  return trunc ? f(Flag<false>(), Flag<true>()) : f(Flag<false>(), Flag<false>());
}

// The output sweep over positions [i0, i1) of direction dir from the state h entering it (h_{i0-1}), in
// the scaled-state form of ema_kernels.cuh: g = h / a', g <- q g + xm_i - q^K xm_{i-K}, and
// emit(t, e_t = sum_n (c a') g, x_t) at each step (the callers need only e, not the final state).
template <typename T, int NM, bool MASK, bool TRUNC, typename Emit>
MK_HD void out_sweep(const Lanes<T>& in, int dir, int i0, int i1, int K, const Reg<NM>& r, const float* h,
                     Emit emit) {
  float q[NM], ca[NM], qk[NM], g[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) {  // padded states: a = c = q = 0, so ca = 0 and g is never read
    const float as = scaled_coef(r.a[n]);
    q[n] = r.q[n];
    ca[n] = r.c[n] * as;
    qk[n] = r.qk[n];
    g[n] = h[n] / as;
  }
  sweep_rows<T, MASK, TRUNC>(in, dir, i0, i1, K, [&](int i, float x, float xm, float xo) {
    float e = 0.f;
    MK_UNROLL for (int n = 0; n < NM; ++n) {
      float gv = q[n] * g[n] + xm;
      if (TRUNC) gv -= qk[n] * xo;
      g[n] = gv;
      e += ca[n] * gv;
    }
    emit(time_of(i, dir, in.L), e, x);
  });
}

// Phase 1 for (batch b, direction dir_idx, channel d, chunk): the chunk's end state from 0 into the workspace.
// The input sum u = q u + xm - q^K xm_{i-K} (H of "Backward" in ema_kernels.cuh): one multiply-add per state
// and step; the end state from 0 is h = a u.
template <typename T, int NM, bool MASK, bool TRUNC>
MK_HD void fwd_local_thread(const FwdParams& p, const Plan& plan, int b, int dir_idx, int d, int chunk) {
  const int ndir = p.bi ? 2 : 1;
  const int dir = dir_idx ? -1 : 1;
  Reg<NM> r;
  r.load(p.cf, dir_idx * p.D + d, p.N);
  const Lanes<T> in{static_cast<const T*>(p.x) + static_cast<int64_t>(b) * p.L * p.D + d,
                    MASK ? p.mask + static_cast<int64_t>(b) * p.L : nullptr, p.D, p.L, 1};
  float u[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) u[n] = 0.f;
  int i0, i1;
  chunk_positions(chunk, plan.chunk, p.L, dir, i0, i1);
  sweep_rows<T, MASK, TRUNC>(in, dir, i0, i1, p.K, [&](int, float, float xm, float xo) {
    MK_UNROLL for (int n = 0; n < NM; ++n) u[n] = r.q[n] * u[n] + xm - (TRUNC ? r.qk[n] * xo : 0.f);
  });
  MK_UNROLL for (int n = 0; n < NM; ++n)
    p.workspace[ws_index(b, dir_idx, ndir, chunk, plan.nchunks, n, NM, d, p.D)] = r.a[n] * u[n];
}

// Phase 2 for (b, dir_idx, d): each chunk's end state becomes the state entering it; final state out.
template <int NM>
MK_HD void fwd_prefix_thread(const FwdParams& p, const Plan& plan, int b, int dir_idx, int d) {
  const int ndir = p.bi ? 2 : 1;
  const int row = dir_idx * p.D + d;
  float pre[NM], q[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) {
    const bool in = n < p.N;
    q[n] = in ? p.cf.q[row * p.N + n] : 0.f;
    pre[n] = (in && dir_idx == 0 && p.state) ? p.state[(static_cast<int64_t>(b) * p.D + d) * p.N + n] : 0.f;
  }
  for (int k = 0; k < plan.nchunks; ++k) {
    const int chunk = dir_idx ? plan.nchunks - 1 - k : k;
    const int rest = p.L - chunk * plan.chunk, len = plan.chunk < rest ? plan.chunk : rest;
    MK_UNROLL for (int n = 0; n < NM; ++n) {
      const int64_t j = ws_index(b, dir_idx, ndir, chunk, plan.nchunks, n, NM, d, p.D);
      const float u = p.workspace[j];
      p.workspace[j] = pre[n];
      pre[n] = powf(q[n], static_cast<float>(len)) * pre[n] + u;
    }
  }
  if (p.final_state && dir_idx == 0) {
    MK_UNROLL for (int n = 0; n < NM; ++n)
      if (n < p.N) p.final_state[(static_cast<int64_t>(b) * p.D + d) * p.N + n] = pre[n];
  }
}

// Phase 3 for (b, d, chunk): y over the chunk. ebuf[step * es] holds the backward direction's output (BI).
template <typename T, int NM, bool BI, bool MASK, bool TRUNC>
MK_HD void fwd_out_thread(const FwdParams& p, const Plan& plan, int b, int d, int chunk, float* ebuf, int es) {
  const int ndir = BI ? 2 : 1, t0 = chunk * plan.chunk;
  const int64_t base = static_cast<int64_t>(b) * p.L * p.D + d;
  const Lanes<T> in{static_cast<const T*>(p.x) + base, MASK ? p.mask + static_cast<int64_t>(b) * p.L : nullptr,
                    p.D, p.L, 1};
  Reg<NM> r;
  float h[NM];
  int i0, i1;
  if (BI) {
    r.load(p.cf, p.D + d, p.N);
    MK_UNROLL for (int n = 0; n < NM; ++n) h[n] = p.workspace[ws_index(b, 1, ndir, chunk, plan.nchunks, n, NM, d, p.D)];
    chunk_positions(chunk, plan.chunk, p.L, -1, i0, i1);
    out_sweep<T, NM, MASK, TRUNC>(in, -1, i0, i1, p.K, r, h, [&](int t, float e, float) { ebuf[(t - t0) * es] = e; });
  }
  r.load(p.cf, d, p.N);
  MK_UNROLL for (int n = 0; n < NM; ++n) h[n] = p.workspace[ws_index(b, 0, ndir, chunk, plan.nchunks, n, NM, d, p.D)];
  chunk_positions(chunk, plan.chunk, p.L, 1, i0, i1);
  const float om = p.omega[d];
  T* y = static_cast<T*>(p.y) + base;
  out_sweep<T, NM, MASK, TRUNC>(in, 1, i0, i1, p.K, r, h, [&](int t, float e, float x) {
    float z = e + om * x;
    if (BI) z += ebuf[(t - t0) * es];
    y[static_cast<int64_t>(t) * p.D] = from_acc<T>(silu_fast(z));
  });
}

// -- backward, chunked like the forward (see ema_cuda.cu; bwd_plan in ema_cuda.h) -------------------------

// Workspace: regions h, H, P of one state per (b, direction, chunk slot, n, d); slot nchunks holds the
// final H and P (for the final-state gradient). The adjoint pass reuses region h for its carries.
MK_HD int64_t bwd_region_floats(const Plan& plan, int B, int D, int N, bool bi) {
  return static_cast<int64_t>(B) * (bi ? 2 : 1) * (plan.nchunks + 1) * padded_n(N) * D;
}

struct BwdView {
  const BwdParams& p;
  const Plan& plan;
  int b, dir_idx, d, ndir, dir, row;
  int64_t region;
  MK_HD BwdView(const BwdParams& pp, const Plan& pl, int bb, int di, int dd)
      : p(pp), plan(pl), b(bb), dir_idx(di), d(dd), ndir(pp.bi ? 2 : 1), dir(di ? -1 : 1), row(di * pp.D + dd),
        region(bwd_region_floats(pl, pp.B, pp.D, pp.N, pp.bi)) {}
  template <int NM>
  MK_HD float& ws(int reg, int chunk, int n) const {
    return p.workspace[reg * region + ws_index(b, dir_idx, ndir, chunk, plan.nchunks + 1, n, NM, d, p.D)];
  }
  template <typename T>
  MK_HD Lanes<T> lanes() const {
    return {static_cast<const T*>(p.x) + static_cast<int64_t>(b) * p.L * p.D + d,
            p.mask ? p.mask + static_cast<int64_t>(b) * p.L : nullptr, p.D, p.L, 1};
  }
  MK_HD int64_t state_index(int n) const { return (static_cast<int64_t>(b) * p.D + d) * p.N + n; }
};

// Phase 1 for (b, direction, d, chunk): from zero over the chunk, u = H and v = P of the chunk alone
// (v = q v + a u_prev - K a q^(K-1) xm_{t-K}, since the chunk's own h is a u). v is kept scaled as
// s = v / a' (a' of the scaled state, ema_kernels.cuh): s = q s + u_prev - (K a q^(K-1) / a') xm_{t-K}, one
// multiply-add fewer per state and step; v = a' s at the end (exact to kScaledTiny |u| where a is raised).
template <typename T, int NM, bool MASK, bool TRUNC>
MK_HD void bwd_local_thread(const BwdParams& p, const Plan& plan, int b, int dir_idx, int d, int chunk) {
  const BwdView w(p, plan, b, dir_idx, d);
  Reg<NM> r;
  r.load(p.cf, w.row, p.N);
  const Lanes<T> in = w.lanes<T>();
  float u[NM], sv[NM], as[NM], kq[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) {
    u[n] = sv[n] = 0.f;
    as[n] = scaled_coef(r.a[n]);
    kq[n] = TRUNC ? r.kaqk1[n] / as[n] : 0.f;
  }
  int i0, i1;
  chunk_positions(chunk, plan.chunk, p.L, w.dir, i0, i1);
  sweep_rows<T, MASK, TRUNC>(in, w.dir, i0, i1, p.K, [&](int, float, float xv, float xo) {
    MK_UNROLL for (int n = 0; n < NM; ++n) {
      sv[n] = r.q[n] * sv[n] + u[n] - (TRUNC ? kq[n] * xo : 0.f);
      u[n] = r.q[n] * u[n] + xv - (TRUNC ? r.qk[n] * xo : 0.f);
    }
  });
  MK_UNROLL for (int n = 0; n < NM; ++n) {
    w.ws<NM>(1, chunk, n) = u[n];
    w.ws<NM>(2, chunk, n) = as[n] * sv[n];
  }
}

// Phase 2 for (b, direction, d): the (h, H, P) entering each chunk, in the direction's order. Over a chunk
// of len steps: h' = q^len h + a u, H' = q^len H + u, P' = q^len P + len q^(len-1) h + v (P = dh/dq).
template <int NM>
MK_HD void bwd_prefix_thread(const BwdParams& p, const Plan& plan, int b, int dir_idx, int d) {
  const BwdView w(p, plan, b, dir_idx, d);
  float a[NM], q[NM], h[NM], H[NM], P[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) {
    const bool in = n < p.N;
    a[n] = in ? p.cf.a[w.row * p.N + n] : 0.f;
    q[n] = in ? p.cf.q[w.row * p.N + n] : 0.f;
    h[n] = (in && dir_idx == 0 && p.state) ? p.state[w.state_index(n)] : 0.f;
    H[n] = P[n] = 0.f;
  }
  for (int k = 0; k < plan.nchunks; ++k) {
    const int chunk = dir_idx ? plan.nchunks - 1 - k : k;
    const int rest = p.L - chunk * plan.chunk, len = plan.chunk < rest ? plan.chunk : rest;
    MK_UNROLL for (int n = 0; n < NM; ++n) {
      const float u = w.ws<NM>(1, chunk, n), v = w.ws<NM>(2, chunk, n);
      const float ql1 = powf(q[n], static_cast<float>(len - 1)), ql = ql1 * q[n];
      w.ws<NM>(0, chunk, n) = h[n];
      w.ws<NM>(1, chunk, n) = H[n];
      w.ws<NM>(2, chunk, n) = P[n];
      P[n] = ql * P[n] + static_cast<float>(len) * ql1 * h[n] + v;
      H[n] = ql * H[n] + u;
      h[n] = ql * h[n] + a[n] * u;
    }
  }
  MK_UNROLL for (int n = 0; n < NM; ++n) {
    w.ws<NM>(1, plan.nchunks, n) = H[n];
    w.ws<NM>(2, plan.nchunks, n) = P[n];
  }
}

// Bidirectional only, for (b, d, chunk): the backward direction's output over the chunk into gbuf (it
// enters z, which the forward direction's parameter pass needs).
template <typename T, int NM, bool MASK, bool TRUNC>
MK_HD void bwd_other_output_thread(const BwdParams& p, const Plan& plan, int b, int d, int chunk) {
  const BwdView w(p, plan, b, 1, d);
  Reg<NM> r;
  r.load(p.cf, w.row, p.N);
  float h[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) h[n] = w.ws<NM>(0, chunk, n);
  int i0, i1;
  chunk_positions(chunk, plan.chunk, p.L, -1, i0, i1);
  float* gbuf = p.gbuf + static_cast<int64_t>(b) * p.L * p.D + d;
  out_sweep<T, NM, MASK, TRUNC>(w.lanes<T>(), -1, i0, i1, p.K, r, h,
                                [&](int t, float e, float) { gbuf[static_cast<int64_t>(t) * p.D] = e; });
}

// Phase 3 for (b, direction, d, chunk): the parameter-gradient sweep over the chunk (direction 0 also
// forms g into gbuf), partial sums per (b, chunk) into pc, pa, pq, pomega ((B * nchunks, ...) arrays).
template <typename T, int NM>
MK_HD void bwd_params_thread(const BwdParams& p, const Plan& plan, int b, int dir_idx, int d, int chunk) {
  const BwdView w(p, plan, b, dir_idx, d);
  Reg<NM> r;
  r.load(p.cf, w.row, p.N);
  float h[NM], H[NM], P[NM], sc[NM], sH[NM], sP[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) {
    h[n] = w.ws<NM>(0, chunk, n);
    H[n] = w.ws<NM>(1, chunk, n);
    P[n] = w.ws<NM>(2, chunk, n);
    sc[n] = sH[n] = sP[n] = 0.f;
  }
  int i0, i1;
  chunk_positions(chunk, plan.chunk, p.L, w.dir, i0, i1);
  const int64_t base = static_cast<int64_t>(b) * p.L * p.D + d;
  const T* gy = static_cast<const T*>(p.gy) + base;
  float* gbuf = p.gbuf + base;
  const float om = p.omega[d];
  float somega = 0.f;
  if (dir_idx == 0) {
    scan_params<1, NM, true>(w.lanes<T>(), gy, p.bi ? static_cast<const float*>(gbuf) : nullptr, gbuf, p.D, &om,
                             &somega, 1, i0, i1, p.K, p.N, r.view(), h, H, P, sc, sH, sP);
    p.pomega[(static_cast<int64_t>(b) * plan.nchunks + chunk) * p.D + d] = somega;
  } else {
    scan_params<1, NM, false>(w.lanes<T>(), gy, static_cast<const float*>(nullptr), gbuf, p.D, &om, &somega, -1,
                              i0, i1, p.K, p.N, r.view(), h, H, P, sc, sH, sP);
  }
  const bool last = dir_idx == 0 && chunk == plan.nchunks - 1 && p.gstate != nullptr;
  const int64_t o0 = ((static_cast<int64_t>(b) * plan.nchunks + chunk) * 2 * p.D + w.row) * p.N;
  MK_UNROLL for (int n = 0; n < NM; ++n) {
    if (n < p.N) {  // a gradient G of the final state adds G H_{L-1} to da and G P_{L-1} to dq
      const float g = last ? p.gstate[w.state_index(n)] : 0.f;
      p.pc[o0 + n] = sc[n];
      p.pa[o0 + n] = r.c[n] * sH[n] + g * w.ws<NM>(1, plan.nchunks, n);
      p.pq[o0 + n] = r.c[n] * sP[n] + g * w.ws<NM>(2, plan.nchunks, n);
    }
  }
}

// Phase 4 for (b, direction, d, chunk): the adjoint carry over the chunk from 0 (against the direction).
template <int NM>
MK_HD void bwd_adjoint_local_thread(const BwdParams& p, const Plan& plan, int b, int dir_idx, int d, int chunk) {
  const BwdView w(p, plan, b, dir_idx, d);
  Reg<NM> r;
  r.load(p.cf, w.row, p.N);
  float carry[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) carry[n] = 0.f;
  int i0, i1;
  chunk_positions(chunk, plan.chunk, p.L, w.dir, i0, i1);
  scan_adjoint<1, NM>(static_cast<const float*>(p.gbuf + static_cast<int64_t>(b) * p.L * p.D + d),
                      static_cast<float*>(nullptr), p.D, p.L, w.dir, i0, i1, p.K, p.N, r.view(), carry, false);
  MK_UNROLL for (int n = 0; n < NM; ++n) w.ws<NM>(0, chunk, n) = carry[n];
}

// Phase 5 for (b, direction, d): the carry entering each chunk from its later side (r' = q^len r + local),
// starting from the final-state gradient; what leaves the first chunk is the initial-state gradient.
template <int NM>
MK_HD void bwd_adjoint_prefix_thread(const BwdParams& p, const Plan& plan, int b, int dir_idx, int d) {
  const BwdView w(p, plan, b, dir_idx, d);
  float q[NM], carry[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) {
    const bool in = n < p.N;
    q[n] = in ? p.cf.q[w.row * p.N + n] : 0.f;
    carry[n] = (in && dir_idx == 0 && p.gstate) ? p.gstate[w.state_index(n)] : 0.f;
  }
  for (int k = 0; k < plan.nchunks; ++k) {
    const int chunk = dir_idx ? k : plan.nchunks - 1 - k;
    const int rest = p.L - chunk * plan.chunk, len = plan.chunk < rest ? plan.chunk : rest;
    MK_UNROLL for (int n = 0; n < NM; ++n) {
      const float local = w.ws<NM>(0, chunk, n);
      w.ws<NM>(0, chunk, n) = carry[n];
      carry[n] = powf(q[n], static_cast<float>(len)) * carry[n] + local;
    }
  }
  if (dir_idx == 0 && p.dstate) {
    MK_UNROLL for (int n = 0; n < NM; ++n)
      if (n < p.N) p.dstate[w.state_index(n)] = carry[n];
  }
}

// Phase 6 for (b, d, chunk): the adjoint over the chunk in each direction from its entering carry, then
// dx = omega g + mask sum_n a lam over the chunk's times.
template <typename T, int NM>
MK_HD void bwd_dx_thread(const BwdParams& p, const Plan& plan, int b, int d, int chunk) {
  const int64_t base = static_cast<int64_t>(b) * p.L * p.D + d;
  for (int dir_idx = 0; dir_idx < (p.bi ? 2 : 1); ++dir_idx) {
    const BwdView w(p, plan, b, dir_idx, d);
    Reg<NM> r;
    r.load(p.cf, w.row, p.N);
    float carry[NM];
    MK_UNROLL for (int n = 0; n < NM; ++n) carry[n] = w.ws<NM>(0, chunk, n);
    int i0, i1;
    chunk_positions(chunk, plan.chunk, p.L, w.dir, i0, i1);
    scan_adjoint<1, NM>(static_cast<const float*>(p.gbuf + base), p.dxm + base, p.D, p.L, w.dir, i0, i1, p.K,
                        p.N, r.view(), carry, dir_idx > 0);
  }
  const int t0 = chunk * plan.chunk, t1 = p.L < t0 + plan.chunk ? p.L : t0 + plan.chunk;
  const float om = p.omega[d];
  T* dx = static_cast<T*>(p.dx) + base;
  for (int t = t0; t < t1; ++t) {
    const int64_t j = static_cast<int64_t>(t) * p.D;
    const float m = (p.mask == nullptr || p.mask[static_cast<int64_t>(b) * p.L + t]) ? 1.f : 0.f;
    dx[j] = from_acc<T>(om * p.gbuf[base + j] + m * p.dxm[base + j]);
  }
}

// One decoding step of element i = b * D + d.
template <typename T, int NM>
MK_HD void step_thread(const StepParams& p, int64_t i) {
  const int64_t b = i / p.D, d = i % p.D;
  const float x = to_acc<float>(static_cast<const T*>(p.x)[i]);
  const float xm = (p.mask == nullptr || p.mask[b]) ? x : 0.f;
  static_cast<T*>(p.y)[i] = from_acc<T>(step_lane<NM>(xm, x, p.omega[d], p.cf.a + d * p.N, p.cf.q + d * p.N,
                                                      p.cf.c + d * p.N, p.state + i * p.N, 1,
                                                      p.new_state + i * p.N, 1, p.N));
}

}  // namespace cuda
}  // namespace ema
}  // namespace mega_kernels
