// The backward's thread functions (phases 1-6 of the backward in ema_cuda.cu): what one CUDA thread computes
// for the chunk states, the parameter sums and the adjoint. Free of CUDA and torch like the forward's
// (ema_cuda_threads.cuh, whose row loop sweep_rows and output sweep they reuse), so the emulator runs them too.
#pragma once
#include "ema_cuda_threads.cuh"

namespace mega_kernels {
namespace ema {
namespace cuda {

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
  sweep_rows<T, MASK, TRUNC>(in, {}, w.dir, i0, i1, p.K, [&](int, const Row& s) {
    MK_UNROLL for (int n = 0; n < NM; ++n) {
      sv[n] = r.q[n] * sv[n] + u[n] - (TRUNC ? kq[n] * s.xo : 0.f);
      u[n] = r.q[n] * u[n] + s.xm - (TRUNC ? r.qk[n] * s.xo : 0.f);
    }
  });
  MK_UNROLL for (int n = 0; n < NM; ++n) {
    w.ws<NM>(1, chunk, n) = u[n];
    w.ws<NM>(2, chunk, n) = as[n] * sv[n];
  }
}

// Phase 2 for (b, direction, d) and the states n0 .. n0 + prefix_states<NM>() - 1: the (h, H, P) entering
// each chunk, in the direction's order. Over a chunk of len steps: h' = q^len h + a u, H' = q^len H + u,
// P' = q^len P + len q^(len-1) h + v (P = dh/dq). Each state's prefix is its own (walk_chunks: a thread per
// kPrefixStates states, two values a chunk, so G = 4 chunks loaded at a time).
template <int NM>
MK_HD void bwd_prefix_thread(const BwdParams& p, const Plan& plan, int b, int dir_idx, int d, int n0) {
  constexpr int NS = prefix_states<NM>(), G = 32 / NS;
  const BwdView w(p, plan, b, dir_idx, d);
  float a[NS], q[NS], qc1[NS], h[NS], H[NS], P[NS], u[G][NS], v[G][NS];
  MK_UNROLL for (int n = 0; n < NS; ++n) {
    const int m = n0 + n;
    const bool in = m < p.N;
    a[n] = in ? p.cf.a[w.row * p.N + m] : 0.f;
    q[n] = in ? p.cf.q[w.row * p.N + m] : 0.f;
    qc1[n] = powf(q[n], static_cast<float>(plan.chunk - 1));
    h[n] = (in && dir_idx == 0 && p.state) ? p.state[w.state_index(m)] : 0.f;
    H[n] = P[n] = 0.f;
  }
  auto phys = [&](int k) { return dir_idx ? plan.nchunks - 1 - k : k; };  // the k-th chunk in walk order
  walk_chunks<G>(
      plan.nchunks,
      [&](int k, int j) {
        MK_UNROLL for (int n = 0; n < NS; ++n) {
          u[j][n] = w.ws<NM>(1, phys(k), n0 + n);
          v[j][n] = w.ws<NM>(2, phys(k), n0 + n);
        }
      },
      [&](int k, int j) {
        const int chunk = phys(k), len = chunk_length(plan, p.L, chunk);
        MK_UNROLL for (int n = 0; n < NS; ++n) {
          const int m = n0 + n;
          const float ql1 = chunk_decay(q[n], qc1[n], len - 1, plan.chunk - 1), ql = ql1 * q[n];
          w.ws<NM>(0, chunk, m) = h[n];
          w.ws<NM>(1, chunk, m) = H[n];
          w.ws<NM>(2, chunk, m) = P[n];
          P[n] = ql * P[n] + static_cast<float>(len) * ql1 * h[n] + v[j][n];
          H[n] = ql * H[n] + u[j][n];
          h[n] = ql * h[n] + a[n] * u[j][n];
        }
      });
  MK_UNROLL for (int n = 0; n < NS; ++n) {
    w.ws<NM>(1, plan.nchunks, n0 + n) = H[n];
    w.ws<NM>(2, plan.nchunks, n0 + n) = P[n];
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
  out_sweep<T, NM, MASK, TRUNC>(w.lanes<T>(), {}, -1, i0, i1, p.K, r, h,
                                [&](int t, float e, const Row&) { gbuf[static_cast<int64_t>(t) * p.D] = e; });
}

// -- phase 3, the parameter sums ---------------------------------------------------------------------------
// Per chunk, from the (h, H, P) entering it, the sums sc = sum g h, sH = sum g H, sP = sum g P ("Backward" in
// ema_kernels.cuh), in scaled form like the forward (a' = scaled_coef(a)):
//   P = a' Ps:  Ps <- q Ps + h_{i-1} / a' - (K a q^(K-1) / a') xm_{i-K}       (one multiply-add, untruncated)
//   without an initial state h = a H at every step (h and H obey the same recurrence, from h_{-1} = 0), so
//   h is not swept: Ps takes H_{i-1} for h_{i-1} / a' (exact where a = a'; where |a| < 2^-64 P gains at most
//   2^-64 |H| per step, as the local pass), e = sum_n (c a) H, and dc = a sH needs no sum of its own;
//   with a state (unidirectional, never truncated: check_ema_args) hs = h / a' is swept beside H:
//   hs <- q hs + xm_i, e = sum_n (c a') hs, dc = a' sum g hs.
// Per state and step: 5 multiply-adds (H, Ps, e, sH, sP), 7 with a state; the sweep holds H, Ps, sH, sP and
// the coefficients q and c a [, q^K and K a q^(K-1) / a'] [, hs and its sum]: 6 to 8 floats per state.
// More than kParamStates states at once would spill (N = 32: 192 to 256 floats), so a thread then forms g
// first in an output sweep (form_g_sweep: two multiply-adds per state) and sums groups of kParamStates
// states reading g back, each group one more sweep over x and g (4 multiply-adds per state, 6 with a state).

// The passes of phase 3 (bwd_params_thread's PASS): direction 0 forms g = gy silu'(z) into gbuf and the sum
// of g x (omega's gradient); direction 1 (bidirectional) then reads g from gbuf.
enum ParamPass : int {
  kFormG = 0,       // direction 0 of a unidirectional EMA without an initial state
  kFormGState = 1,  // the same with an initial state (K = 0)
  kFormGBi = 2,     // direction 0 of a bidirectional EMA: z adds the backward direction's output (in gbuf)
  kReadG = 3,       // direction 1
};
constexpr int kParamStates = 16;

template <int V>
struct Const {
  static constexpr int value = V;
};
// Host side: f(Const<PASS>()) for the pass of direction dir_idx (a state with K > 0 is refused before).
template <bool TRUNC, typename F>
inline auto pick_param_pass(const BwdParams& p, int dir_idx, F&& f) -> decltype(f(Const<kFormG>())) {
  if (dir_idx > 0) return f(Const<kReadG>());
  if (p.bi) return f(Const<kFormGBi>());
  if constexpr (!TRUNC) {
    if (p.state != nullptr) return f(Const<kFormGState>());
  }
  return f(Const<kFormG>());
}

template <typename T>
MK_HD Sides<T> bwd_sides(const BwdParams& p, int b, int d) {
  const int64_t base = static_cast<int64_t>(b) * p.L * p.D + d;
  return {static_cast<const T*>(p.gy) + base, p.gbuf + base};
}

// Direction 0 with more than kParamStates states: the output sweep over the chunk from the entering h forms
// g = gy silu'(e [+ e of direction 1] + omega x) into gbuf; omega's partial sum into pomega.
template <typename T, int NM, bool MASK, bool TRUNC, int PASS>
MK_HD void form_g_sweep(const BwdView& w, int chunk, int i0, int i1) {
  constexpr bool EXTRA = PASS == kFormGBi;
  const BwdParams& p = w.p;
  Reg<NM> r;
  r.load(p.cf, w.row, p.N);
  float h[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) h[n] = w.ws<NM>(0, chunk, n);
  const Sides<T> sd = bwd_sides<T>(p, w.b, w.d);
  float* gbuf = p.gbuf + static_cast<int64_t>(w.b) * p.L * p.D + w.d;
  const float om = p.omega[w.d];
  float somega = 0.f;
  out_sweep<T, NM, MASK, TRUNC, true, EXTRA>(w.lanes<T>(), sd, w.dir, i0, i1, p.K, r, h,
                                             [&](int t, float e, const Row& s) {
    const float g = s.gy * dsilu_fast(e + (EXTRA ? s.gf : 0.f) + om * s.x);
    gbuf[static_cast<int64_t>(t) * p.D] = g;
    somega += g * s.x;
  });
  p.pomega[(static_cast<int64_t>(w.b) * w.plan.nchunks + chunk) * p.D + w.d] = somega;
}

// The sums of the NP states n0 .. n0+NP-1 over the chunk into pc, pa, pq (partials per (b, chunk)). FORM_G:
// the sweep holds every state and forms g itself (into gbuf, omega's sum into pomega); else it reads g.
template <typename T, int NM, int NP, bool MASK, bool TRUNC, int PASS, bool FORM_G>
MK_HD void param_sweep(const BwdView& w, int chunk, int n0, int i0, int i1) {
  constexpr bool STATE = PASS == kFormGState, EXTRA = PASS == kFormGBi;
  static_assert(!FORM_G || NP == NM, "forming g takes every state");
  const BwdParams& p = w.p;
  float q[NP], cav[NP], qk[NP], kq[NP], H[NP], ps[NP], hs[NP], sH[NP], sP[NP], sc[NP];
  MK_UNROLL for (int n = 0; n < NP; ++n) {  // padded states: every coefficient and state 0
    const int m = n0 + n, j = w.row * p.N + m;
    const bool in = m < p.N;
    const float a = in ? p.cf.a[j] : 0.f, as = scaled_coef(a);
    q[n] = in ? p.cf.q[j] : 0.f;
    cav[n] = in ? p.cf.c[j] * (STATE ? as : a) : 0.f;
    qk[n] = TRUNC && in ? p.cf.qk[j] : 0.f;
    kq[n] = TRUNC && in ? p.cf.kaqk1[j] / as : 0.f;
    H[n] = in ? w.ws<NM>(1, chunk, m) : 0.f;
    ps[n] = in ? w.ws<NM>(2, chunk, m) / as : 0.f;
    hs[n] = STATE && in ? w.ws<NM>(0, chunk, m) / as : 0.f;
    sH[n] = sP[n] = sc[n] = 0.f;
  }
  const Sides<T> sd = bwd_sides<T>(p, w.b, w.d);
  float* gbuf = p.gbuf + static_cast<int64_t>(w.b) * p.L * p.D + w.d;
  const float om = p.omega[w.d];
  float somega = 0.f;
  sweep_rows<T, MASK, TRUNC, FORM_G, !FORM_G || EXTRA>(w.lanes<T>(), sd, w.dir, i0, i1, p.K,
                                                        [&](int i, const Row& s) {
    float e = 0.f;
    MK_UNROLL for (int n = 0; n < NP; ++n) {
      float Hn = q[n] * H[n] + s.xm;
      if (TRUNC) Hn -= qk[n] * s.xo;
      if (STATE) {
        const float hn = q[n] * hs[n] + s.xm - (TRUNC ? qk[n] * s.xo : 0.f);
        ps[n] = q[n] * ps[n] + hs[n] - (TRUNC ? kq[n] * s.xo : 0.f);
        hs[n] = hn;
        if (FORM_G) e += cav[n] * hn;
      } else {
        ps[n] = q[n] * ps[n] + H[n] - (TRUNC ? kq[n] * s.xo : 0.f);
        if (FORM_G) e += cav[n] * Hn;
      }
      H[n] = Hn;
    }
    float g = s.gf;
    if (FORM_G) {
      g = s.gy * dsilu_fast(e + (EXTRA ? s.gf : 0.f) + om * s.x);
      gbuf[static_cast<int64_t>(time_of(i, w.dir, p.L)) * p.D] = g;
      somega += g * s.x;
    }
    MK_UNROLL for (int n = 0; n < NP; ++n) {
      sH[n] += g * H[n];
      sP[n] += g * ps[n];
      if (STATE) sc[n] += g * hs[n];
    }
  });
  if (FORM_G) p.pomega[(static_cast<int64_t>(w.b) * w.plan.nchunks + chunk) * p.D + w.d] = somega;
  const bool last = w.dir_idx == 0 && chunk == w.plan.nchunks - 1 && p.gstate != nullptr;
  const int64_t o0 = ((static_cast<int64_t>(w.b) * w.plan.nchunks + chunk) * w.ndir * p.D + w.row) * p.N;
  MK_UNROLL for (int n = 0; n < NP; ++n) {
    const int m = n0 + n;
    if (m < p.N) {  // a gradient G of the final state adds G H_{L-1} to da and G P_{L-1} to dq
      const float a = p.cf.a[w.row * p.N + m], c = p.cf.c[w.row * p.N + m], as = scaled_coef(a);
      const float G = last ? p.gstate[w.state_index(m)] : 0.f;
      p.pc[o0 + m] = STATE ? as * sc[n] : a * sH[n];
      p.pa[o0 + m] = c * sH[n] + G * w.ws<NM>(1, w.plan.nchunks, m);
      p.pq[o0 + m] = c * as * sP[n] + G * w.ws<NM>(2, w.plan.nchunks, m);
    }
  }
}

// Phase 3 for (b, d, chunk) in the direction of PASS: the parameter sums over the chunk, partial sums per
// (b, chunk) into pc, pa, pq, pomega ((B * nchunks, ...) arrays); direction 0 also forms g into gbuf.
template <typename T, int NM, bool MASK, bool TRUNC, int PASS>
MK_HD void bwd_params_thread(const BwdParams& p, const Plan& plan, int b, int d, int chunk) {
  constexpr int NP = NM < kParamStates ? NM : kParamStates;
  constexpr bool FORMS = PASS != kReadG, FUSED = NP == NM;
  const BwdView w(p, plan, b, FORMS ? 0 : 1, d);
  int i0, i1;
  chunk_positions(chunk, plan.chunk, p.L, w.dir, i0, i1);
  if constexpr (FORMS && !FUSED) form_g_sweep<T, NM, MASK, TRUNC, PASS>(w, chunk, i0, i1);
  MK_NO_UNROLL for (int n0 = 0; n0 < NM; n0 += NP)
    param_sweep<T, NM, NP, MASK, TRUNC, PASS, FORMS && FUSED>(w, chunk, n0, i0, i1);
}

// -- phases 4 to 6, the adjoint ------------------------------------------------------------------------------
// The adjoint lam_i = r_i + c (g_i - q^K g_{i+K}), r_{i-1} = q lam_i, runs against the direction: it is the
// forward scan over g with a and c swapped and time reversed (positions j = L-1-i of direction -dir, where
// g_{i+K} is the row K positions back). Scaled like the forward's state, mu = lam / c' (c' = scaled_coef(c)):
//   mu <- q mu + g_i - q^K g_{i+K},   sum_n a lam = sum_n (a c') mu,   r = q c' mu,
// one multiply-add per state and step for the carry and one for the output. A carry r entering the chunk
// enters its first step as mu = r / c' + g_i - q^K g_{i+K} (a peeled step; no division by q, which may be 0).
// Where |c| < 2^-64, lam gains at most 2^-64 |g - q^K g_{i+K}| per step (the forward's bound).

// The adjoint over the chunk [i0, i1) of w's direction from the carry r (N values; updated to the carry
// leaving the chunk, q lam_{i0}), emit(t, sum_n a lam_t, row) at each step; ACC: the rows' gf side is dxm.
template <int NM, bool TRUNC, bool ACC, bool PEEL, typename Emit>
MK_HD void adjoint_sweep(const BwdView& w, int i0, int i1, float* carry, Emit emit) {
  const BwdParams& p = w.p;
  Reg<NM> r;
  r.load(p.cf, w.row, p.N);
  float q[NM], ac[NM], qk[NM], rho[NM], mu[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) {  // padded states: a = c = q = 0, so ac = 0 and the carry stays 0
    const float cs = scaled_coef(r.c[n]);
    q[n] = r.q[n];
    ac[n] = r.a[n] * cs;
    qk[n] = r.qk[n];
    rho[n] = PEEL ? carry[n] / cs : 0.f;
    mu[n] = 0.f;
  }
  const int64_t base = static_cast<int64_t>(w.b) * p.L * p.D + w.d;
  const Lanes<float> in{p.gbuf + base, nullptr, p.D, p.L, 1};
  const Sides<float> sd{nullptr, ACC ? p.dxm + base : nullptr};
  const int dir = -w.dir;
  auto step = [&](int j, const Row& s, bool first) {
    float dv = 0.f;
    MK_UNROLL for (int n = 0; n < NM; ++n) {
      float m = (first ? rho[n] : q[n] * mu[n]) + s.x;
      if (TRUNC) m -= qk[n] * s.xo;
      mu[n] = m;
      dv += ac[n] * m;
    }
    emit(time_of(j, dir, p.L), dv, s);
  };
  sweep_rows_impl<float, false, TRUNC, false, ACC, PEEL>(
      in, sd, dir, p.L - i1, p.L - i0, p.K, [&](int j, const Row& s) { step(j, s, true); },
      [&](int j, const Row& s) { step(j, s, false); });
  // from a zero carry lam = c mu exactly; from r, lam = c' mu (the bound above)
  MK_UNROLL for (int n = 0; n < NM; ++n) carry[n] = q[n] * (PEEL ? scaled_coef(r.c[n]) : r.c[n]) * mu[n];
}

// Phase 4 for (b, direction, d, chunk): the adjoint carry over the chunk from 0 (against the direction).
template <int NM, bool TRUNC>
MK_HD void bwd_adjoint_local_thread(const BwdParams& p, const Plan& plan, int b, int dir_idx, int d, int chunk) {
  const BwdView w(p, plan, b, dir_idx, d);
  float carry[NM];
  int i0, i1;
  chunk_positions(chunk, plan.chunk, p.L, w.dir, i0, i1);
  adjoint_sweep<NM, TRUNC, false, false>(w, i0, i1, carry, [](int, float, const Row&) {});
  MK_UNROLL for (int n = 0; n < NM; ++n) w.ws<NM>(0, chunk, n) = carry[n];
}

// Phase 5 for (b, direction, d) and the states n0 .. n0 + prefix_states<NM>() - 1: the carry entering each
// chunk from its later side (r' = q^len r + local), starting from the final-state gradient; what leaves the
// first chunk is the initial-state gradient. Walked as the forward's prefix (walk_chunks).
template <int NM>
MK_HD void bwd_adjoint_prefix_thread(const BwdParams& p, const Plan& plan, int b, int dir_idx, int d, int n0) {
  constexpr int NS = prefix_states<NM>(), G = 64 / NS;
  const BwdView w(p, plan, b, dir_idx, d);
  float q[NS], qc[NS], carry[NS], local[G][NS];
  MK_UNROLL for (int n = 0; n < NS; ++n) {
    const int m = n0 + n;
    const bool in = m < p.N;
    q[n] = in ? p.cf.q[w.row * p.N + m] : 0.f;
    qc[n] = powf(q[n], static_cast<float>(plan.chunk));
    carry[n] = (in && dir_idx == 0 && p.gstate) ? p.gstate[w.state_index(m)] : 0.f;
  }
  auto phys = [&](int k) { return dir_idx ? k : plan.nchunks - 1 - k; };  // against the direction
  walk_chunks<G>(
      plan.nchunks,
      [&](int k, int j) { MK_UNROLL for (int n = 0; n < NS; ++n) local[j][n] = w.ws<NM>(0, phys(k), n0 + n); },
      [&](int k, int j) {
        const int len = chunk_length(plan, p.L, phys(k));
        MK_UNROLL for (int n = 0; n < NS; ++n) {
          w.ws<NM>(0, phys(k), n0 + n) = carry[n];
          carry[n] = chunk_decay(q[n], qc[n], len, plan.chunk) * carry[n] + local[j][n];
        }
      });
  if (dir_idx == 0 && p.dstate) {
    MK_UNROLL for (int n = 0; n < NS; ++n)
      if (n0 + n < p.N) p.dstate[w.state_index(n0 + n)] = carry[n];
  }
}

// Phase 6 for (b, d, chunk): the adjoint over the chunk in each direction from its entering carry; the last
// sweep writes dx = omega g + mask sum_n a lam as it goes (g_t is its own input row). Bidirectional: direction
// 0 leaves its sum_n a lam in dxm, which direction 1's sweep reads beside g and adds.
template <typename T, int NM, bool TRUNC>
MK_HD void bwd_dx_thread(const BwdParams& p, const Plan& plan, int b, int d, int chunk) {
  const int64_t base = static_cast<int64_t>(b) * p.L * p.D + d;
  const bool* mask = p.mask ? p.mask + static_cast<int64_t>(b) * p.L : nullptr;
  const float om = p.omega[d];
  T* dx = static_cast<T*>(p.dx) + base;
  auto write_dx = [&](int t, float g, float lam_sum) {
    const float m = (mask == nullptr || mask[t]) ? 1.f : 0.f;
    dx[static_cast<int64_t>(t) * p.D] = from_acc<T>(om * g + m * lam_sum);
  };
  float carry[NM];
  int i0, i1;
  const BwdView w0(p, plan, b, 0, d);
  chunk_positions(chunk, plan.chunk, p.L, w0.dir, i0, i1);
  MK_UNROLL for (int n = 0; n < NM; ++n) carry[n] = w0.ws<NM>(0, chunk, n);
  if (!p.bi) {
    adjoint_sweep<NM, TRUNC, false, true>(w0, i0, i1, carry,
                                          [&](int t, float dv, const Row& s) { write_dx(t, s.x, dv); });
    return;
  }
  float* dxm = p.dxm + base;
  adjoint_sweep<NM, TRUNC, false, true>(w0, i0, i1, carry,
                                        [&](int t, float dv, const Row&) { dxm[static_cast<int64_t>(t) * p.D] = dv; });
  const BwdView w1(p, plan, b, 1, d);
  chunk_positions(chunk, plan.chunk, p.L, w1.dir, i0, i1);
  MK_UNROLL for (int n = 0; n < NM; ++n) carry[n] = w1.ws<NM>(0, chunk, n);
  adjoint_sweep<NM, TRUNC, true, true>(w1, i0, i1, carry,
                                       [&](int t, float dv, const Row& s) { write_dx(t, s.x, s.gf + dv); });
}

}  // namespace cuda
}  // namespace ema
}  // namespace mega_kernels
