// The CUDA EMA kernels at thread level: what one CUDA thread computes, given its indices (ema_cuda.cu maps
// blocks and threads onto these; the phases are described there). Free of CUDA and torch, so the host
// compiler runs the same code on the CPU to test the kernels' logic without a GPU
// (csrc/testing/ema_cuda_emulator.cpp, tests/test_ema_cuda.py). Maths: ema_kernels.cuh. This file: the row loop
// and the forward; the backward's phases: ema_cuda_threads_bwd.cuh.
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

// -- the time loop of every sweep: rows loaded a group ahead ----------------------------------------------
// A sweep's loads do not depend on its state, so sweep_rows issues the loads of the next group of U steps
// before it computes the current U steps: each thread keeps a group of rows in flight while it computes
// (a scan that loads each row when it needs it waits for the memory latency at every step). A group holds
// about kRowGroup rows: U = kRowGroup steps of x alone, kRowGroup / 2 when truncated (x_i and x_{i-K} per
// step), kRowGroup / 4 when truncated and masked (four loads per step; more would cost N = 32 spills); each
// side row (below) counts as one more row per step (2 rows: kRowGroup / 2, 3-4: / 4, more: / 8). The rows stay
// raw in registers (converted and masked where used), so no instruction waits on them early.
// MASK (a mask is given) and TRUNC (K > 0) are compile-time, as kernel template arguments: each case is
// its own kernel, with no test inside the time loop and its own register count (pick_sweep below).
// Side rows (the backward's sweeps): SIDE_T reads gy (x's type), SIDE_F a float row (g, or a partial output),
// both laid out like x and read at x's positions, unmasked.
template <bool MASK, bool TRUNC, int SIDES = 0>
constexpr int row_group_steps() {
  constexpr int rows = (TRUNC ? (MASK ? 4 : 2) : 1) + SIDES;
  return rows <= 1 ? kRowGroup : rows == 2 ? kRowGroup / 2 : rows <= 4 ? kRowGroup / 4 : kRowGroup / 8;
}

// Where a sweep reads the group at position ib: element off of x (and of the side rows) and moff of the
// mask; one position further is step (mstep) elements, K positions back is back (mback). Offsets, not
// pointers: past the sweep's ends they are formed but never read.
template <typename T>
struct RowCursor {
  const T* x;
  const bool* mask;
  const T* gy;
  const float* gf;
  int64_t off, step, back;
  int moff, mstep, mback;
};

// The side rows of a sweep (pointers at (b, t = 0, d), like Lanes::x); null where not read.
template <typename T>
struct Sides {
  const T* gy;
  const float* gf;
};

// One step of a sweep as its body sees it: x_i, xm_i (masked), xm_{i-K} (0 without TRUNC or for i < K), and
// the side rows gy_i, gf_i (0 where not read).
struct Row {
  float x, xm, xo, gy, gf;
};

template <typename T, bool MASK, bool TRUNC, bool SIDE_T, bool SIDE_F>
struct RowGroup {
  static constexpr int U = row_group_steps<MASK, TRUNC, int(SIDE_T) + int(SIDE_F)>();
  T x[U], xo[U], gy[U];    // x at the positions ib + k and (TRUNC) ib + k - K of the direction; gy (SIDE_T)
  float gf[U];             // SIDE_F
  bool keep[U], keepo[U];  // the mask of x and xo (MASK)
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
        if (SIDE_T) gy[k] = c.gy[o];
        if (SIDE_F) gf[k] = c.gf[o];
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
      if (SIDE_T) gy[k] = ok ? c.gy[o] : T(0.f);
      if (SIDE_F) gf[k] = ok ? c.gf[o] : 0.f;
    }
  }
  MK_HD Row row(int k) const {
    const float v = to_acc<float>(x[k]);
    return {v, (!MASK || keep[k]) ? v : 0.f, TRUNC && (!MASK || keepo[k]) ? to_acc<float>(xo[k]) : 0.f,
            SIDE_T ? to_acc<float>(gy[k]) : 0.f, SIDE_F ? gf[k] : 0.f};
  }
};

// Runs body(i, row_i) for the positions i = i0 .. i1-1 of direction dir, in order; with PEEL the first
// position runs first(i0, row_i0) instead (a sweep whose first step differs, with no test in the loop).
// MASK: in.mask is not null; SIDE_T / SIDE_F: sd.gy / sd.gf are read.
template <typename T, bool MASK, bool TRUNC, bool SIDE_T, bool SIDE_F, bool PEEL, typename First, typename Body>
MK_HD void sweep_rows_impl(const Lanes<T>& in, const Sides<T>& sd, int dir, int i0, int i1, int K, First first,
                           Body body) {
  using Group = RowGroup<T, MASK, TRUNC, SIDE_T, SIDE_F>;
  constexpr int U = Group::U;
  const int t0 = time_of(i0, dir, in.L);
  const int64_t step = dir > 0 ? in.ts : -in.ts;
  RowCursor<T> c{in.x, in.mask, sd.gy, sd.gf, static_cast<int64_t>(t0) * in.ts, step,
                 static_cast<int64_t>(K) * step, t0, dir, dir > 0 ? K : -K};
  Group next;
  next.load(c, i1 - i0, i0 - K);
  int ib = i0;
  if constexpr (PEEL) {  // the first group, its first step by `first`
    if (ib + U > i1) {
      if (ib < i1) first(ib, next.row(0));
      MK_UNROLL for (int k = 1; k < U; ++k) {
        if (ib + k >= i1) break;
        body(ib + k, next.row(k));
      }
      return;
    }
    const Group cur = next;
    c.off += U * c.step;
    c.moff += U * c.mstep;
    next.load(c, i1 - ib - U, ib + U - K);
    first(ib, cur.row(0));
    MK_UNROLL for (int k = 1; k < U; ++k) body(ib + k, cur.row(k));
    ib += U;
  }
  for (; ib + U <= i1; ib += U) {  // full groups
    const Group cur = next;
    c.off += U * c.step;
    c.moff += U * c.mstep;
    next.load(c, i1 - ib - U, ib + U - K);
    MK_UNROLL for (int k = 0; k < U; ++k) body(ib + k, cur.row(k));
  }
  MK_UNROLL for (int k = 0; k < U; ++k) {  // the last, partial group (already loaded)
    if (ib + k >= i1) break;
    body(ib + k, next.row(k));
  }
}

template <typename T, bool MASK, bool TRUNC, bool SIDE_T = false, bool SIDE_F = false, typename Body>
MK_HD void sweep_rows(const Lanes<T>& in, const Sides<T>& sd, int dir, int i0, int i1, int K, Body body) {
  sweep_rows_impl<T, MASK, TRUNC, SIDE_T, SIDE_F, false>(in, sd, dir, i0, i1, K, body, body);
}

// Host side (launchers, emulator): f(Flag<MASK>(), Flag<TRUNC>()) for a mask given or not and K > 0 or not,
// so each caller instantiates the four cases of the sweep kernels the same way.
template <typename F>
inline auto pick_sweep(bool mask, bool trunc, F&& f) -> decltype(f(Flag<false>(), Flag<false>())) {
  return pick_flag(mask, [&](auto m) { return pick_flag(trunc, [&](auto t) { return f(m, t); }); });
}

// The output sweep over positions [i0, i1) of direction dir from the state h entering it (h_{i0-1}), in
// the scaled-state form of ema_kernels.cuh: g = h / a', g <- q g + xm_i - q^K xm_{i-K}, and
// emit(t, e_t = sum_n (c a') g, row_i) at each step (the callers need only e, not the final state).
template <typename T, int NM, bool MASK, bool TRUNC, bool SIDE_T = false, bool SIDE_F = false, typename Emit>
MK_HD void out_sweep(const Lanes<T>& in, const Sides<T>& sd, int dir, int i0, int i1, int K, const Reg<NM>& r,
                     const float* h, Emit emit) {
  float q[NM], ca[NM], qk[NM], g[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) {  // padded states: a = c = q = 0, so ca = 0 and g is never read
    const float as = scaled_coef(r.a[n]);
    q[n] = r.q[n];
    ca[n] = r.c[n] * as;
    qk[n] = r.qk[n];
    g[n] = h[n] / as;
  }
  sweep_rows<T, MASK, TRUNC, SIDE_T, SIDE_F>(in, sd, dir, i0, i1, K, [&](int i, const Row& s) {
    float e = 0.f;
    MK_UNROLL for (int n = 0; n < NM; ++n) {
      float gv = q[n] * g[n] + s.xm;
      if (TRUNC) gv -= qk[n] * s.xo;
      g[n] = gv;
      e += ca[n] * gv;
    }
    emit(time_of(i, dir, in.L), e, s);
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
  sweep_rows<T, MASK, TRUNC>(in, {}, dir, i0, i1, p.K, [&](int, const Row& s) {
    MK_UNROLL for (int n = 0; n < NM; ++n) u[n] = r.q[n] * u[n] + s.xm - (TRUNC ? r.qk[n] * s.xo : 0.f);
  });
  MK_UNROLL for (int n = 0; n < NM; ++n)
    p.workspace[ws_index(b, dir_idx, ndir, chunk, plan.nchunks, n, NM, d, p.D)] = r.a[n] * u[n];
}

// Phase 1 of a bidirectional EMA without truncation, for (batch b, channel d, chunk): both directions' end
// states from one read of the chunk (fwd_local_thread, once per direction, reads it twice). Direction 0 as
// there; direction 1 runs backward in time, so its chunk ends at the chunk's first step t0 and its input sum
// u = sum_t q^(t - t0) xm_t is formed walking forward with the power w = q^(t - t0): two operations per state
// and step where Horner takes one. It loads q (and a at the end) itself: Reg holds six arrays per direction,
// twelve here, where two are used in the loop.
template <typename T, int NM, bool MASK>
MK_HD void fwd_local_both_thread(const FwdParams& p, const Plan& plan, int b, int d, int chunk) {
  float q0[NM], q1[NM], u0[NM], u1[NM], w[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) {
    q0[n] = n < p.N ? p.cf.q[d * p.N + n] : 0.f;
    q1[n] = n < p.N ? p.cf.q[(p.D + d) * p.N + n] : 0.f;
    u0[n] = u1[n] = 0.f;
    w[n] = 1.f;
  }
  const Lanes<T> in{static_cast<const T*>(p.x) + static_cast<int64_t>(b) * p.L * p.D + d,
                    MASK ? p.mask + static_cast<int64_t>(b) * p.L : nullptr, p.D, p.L, 1};
  int i0, i1;
  chunk_positions(chunk, plan.chunk, p.L, 1, i0, i1);
  sweep_rows<T, MASK, false>(in, {}, 1, i0, i1, 0, [&](int, const Row& s) {
    MK_UNROLL for (int n = 0; n < NM; ++n) {
      u0[n] = q0[n] * u0[n] + s.xm;
      u1[n] = w[n] * s.xm + u1[n];
      w[n] *= q1[n];
    }
  });
  MK_UNROLL for (int n = 0; n < NM; ++n) {
    const bool there = n < p.N;
    p.workspace[ws_index(b, 0, 2, chunk, plan.nchunks, n, NM, d, p.D)] = there ? p.cf.a[d * p.N + n] * u0[n] : 0.f;
    p.workspace[ws_index(b, 1, 2, chunk, plan.nchunks, n, NM, d, p.D)] =
        there ? p.cf.a[(p.D + d) * p.N + n] * u1[n] : 0.f;
  }
}

// -- the prefix passes: one serial walk over a lane's chunks -----------------------------------------------
// Each prefix pass (forward phase 2, backward phases 2 and 5) walks the chunks of one (b, direction, channel)
// in order, reading each chunk's local value and overwriting it with the carry entering that chunk. A load
// after a store to the same buffer cannot be moved above it, so a walk that loads a chunk's values when it
// reaches them waits a full memory latency per chunk (Triton's carry measured ~0.8 us a chunk, GPU run 2):
// 256 waits at B1 L65536. walk_chunks loads G chunks' values before it folds and stores any of them: one wait
// per group. A thread takes kPrefixStates states (grid z: the groups), so G groups of them fit in registers.
constexpr int kPrefixStates = 8;
template <int NM>
MK_HD constexpr int prefix_groups() { return NM < kPrefixStates ? 1 : NM / kPrefixStates; }
template <int NM>
MK_HD constexpr int prefix_states() { return NM < kPrefixStates ? NM : kPrefixStates; }

// Calls load(k, j) for the chunks k of a group (j: the slot in the group, a compile-time index once unrolled),
// then fold(k, j) for the same chunks in order; k runs 0 .. nchunks-1 in walk order.
template <int G, typename Load, typename Fold>
MK_HD void walk_chunks(int nchunks, Load load, Fold fold) {
  for (int k0 = 0; k0 < nchunks; k0 += G) {
    MK_UNROLL for (int j = 0; j < G; ++j) if (k0 + j < nchunks) load(k0 + j, j);
    MK_UNROLL for (int j = 0; j < G; ++j) if (k0 + j < nchunks) fold(k0 + j, j);
  }
}

// Steps in (physical) chunk `chunk`: plan.chunk except in the last one.
MK_HD int chunk_length(const Plan& plan, int L, int chunk) {
  const int rest = L - chunk * plan.chunk;
  return plan.chunk < rest ? plan.chunk : rest;
}

// q^e for an exponent e of a chunk's length; qc = q^full (computed once per walk) serves every full chunk,
// whose exponent is `full`.
MK_HD float chunk_decay(float q, float qc, int e, int full) {
  return e == full ? qc : powf(q, static_cast<float>(e));
}

// Phase 2 for (b, dir_idx, d) and the states n0 .. n0 + prefix_states<NM>() - 1: each chunk's end state
// becomes the state entering it; final state out.
template <int NM>
MK_HD void fwd_prefix_thread(const FwdParams& p, const Plan& plan, int b, int dir_idx, int d, int n0) {
  constexpr int NS = prefix_states<NM>(), G = 64 / NS;
  const int ndir = p.bi ? 2 : 1;
  const int row = dir_idx * p.D + d;
  float pre[NS], q[NS], qc[NS], u[G][NS];
  MK_UNROLL for (int n = 0; n < NS; ++n) {
    const int m = n0 + n;
    const bool in = m < p.N;
    q[n] = in ? p.cf.q[row * p.N + m] : 0.f;
    qc[n] = powf(q[n], static_cast<float>(plan.chunk));
    pre[n] = (in && dir_idx == 0 && p.state) ? p.state[(static_cast<int64_t>(b) * p.D + d) * p.N + m] : 0.f;
  }
  auto phys = [&](int k) { return dir_idx ? plan.nchunks - 1 - k : k; };  // the k-th chunk in walk order
  auto at = [&](int k, int n) -> float& {
    return p.workspace[ws_index(b, dir_idx, ndir, phys(k), plan.nchunks, n0 + n, NM, d, p.D)];
  };
  walk_chunks<G>(
      plan.nchunks, [&](int k, int j) { MK_UNROLL for (int n = 0; n < NS; ++n) u[j][n] = at(k, n); },
      [&](int k, int j) {
        const int len = chunk_length(plan, p.L, phys(k));
        MK_UNROLL for (int n = 0; n < NS; ++n) {
          at(k, n) = pre[n];
          pre[n] = chunk_decay(q[n], qc[n], len, plan.chunk) * pre[n] + u[j][n];
        }
      });
  if (p.final_state && dir_idx == 0) {
    MK_UNROLL for (int n = 0; n < NS; ++n)
      if (n0 + n < p.N) p.final_state[(static_cast<int64_t>(b) * p.D + d) * p.N + n0 + n] = pre[n];
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
    out_sweep<T, NM, MASK, TRUNC>(in, {}, -1, i0, i1, p.K, r, h,
                                  [&](int t, float e, const Row&) { ebuf[(t - t0) * es] = e; });
  }
  r.load(p.cf, d, p.N);
  MK_UNROLL for (int n = 0; n < NM; ++n) h[n] = p.workspace[ws_index(b, 0, ndir, chunk, plan.nchunks, n, NM, d, p.D)];
  chunk_positions(chunk, plan.chunk, p.L, 1, i0, i1);
  const float om = p.omega[d];
  T* y = static_cast<T*>(p.y) + base;
  out_sweep<T, NM, MASK, TRUNC>(in, {}, 1, i0, i1, p.K, r, h, [&](int t, float e, const Row& s) {
    float z = e + om * s.x;
    if (BI) z += ebuf[(t - t0) * es];
    y[static_cast<int64_t>(t) * p.D] = from_acc<T>(silu_fast(z));
  });
}

// One decoding step of element i = b * D + d.
template <typename T, int NM>
MK_HD void step_thread(const StepParams& p, int64_t i) {
  const int64_t b = i / p.D, d = i % p.D;
  const float x = to_acc<float>(static_cast<const T*>(p.x)[i]);
  const float xm = (p.mask == nullptr || p.mask[b]) ? x : 0.f;
  static_cast<T*>(p.y)[i] = from_acc<T>(silu(step_lane_z<NM>(xm, x, p.omega[d], p.cf.a + d * p.N,
                                                             p.cf.q + d * p.N, p.cf.c + d * p.N, p.state + i * p.N,
                                                             1, p.new_state + i * p.N, 1, p.N)));
}

}  // namespace cuda
}  // namespace ema
}  // namespace mega_kernels
