// Multi-dimensional damped EMA (MEGA spec section 4): the maths shared by the CPU and CUDA kernels.
// Torch-free on purpose: g++ includes it from ema_cpu.cpp and nvcc from ema_cuda.cu on a CPU-only machine.
//
// Notation: one channel d, one direction, expansion index n < N, time t < L (each line holds per n).
//   coefficients a = sigmoid(delta) beta, q = 1 - sigmoid(delta) sigmoid(alpha), c = gamma / sqrt(N)
//   xm_t = mask_t x_t, K = truncation (0 = none: then every q^K term below is 0)
//   forward:   h_t = q h_{t-1} + a xm_t - a q^K xm_{t-K}        (h_{-1} = state s, 0 when truncated)
//              e_t = sum_n c h_t,   z_t = e_t [+ e'_t of the other direction] + omega x_t,   y_t = silu(z_t)
// The truncated form keeps exactly the taps k[l] = sum_n c a q^l, l < K, of the convolution.
// Anchoring (the host sweeps below): the tap that leaves the window is subtracted as a q^K xm_{t-K}, but what
//   entered h K steps earlier was rounded at every step since, so each subtraction leaves a rounding residue
//   that decays only as q^t: for q near 1 (1 - q << 1 / K) residues pile up over ~min(L, 1 / (1 - q)) steps,
//   and the parameter sweep's P sums them again (a float32 dq off by 1e-3 to 1e-1 at 1 - q = 1e-4..1e-6, K 16-100,
//   L 8192-20000). So a truncated sweep also carries the restarted scan R, the same recurrence without the
//   subtraction, restarted from 0 at every block of K positions along the sweep (i = 0, K, 2K, ...). At a
//   block's last position the window is exactly that block: h (and H, P; the adjoint's lam) take R's value and
//   R restarts, so no residue lives longer than K steps. (The CUDA sweeps do not anchor yet: README.)
// Scaled state (the CUDA sweeps that only need e): with a' = a, or kScaledTiny where |a| < kScaledTiny,
//   g = h / a':  g_t = q g_{t-1} + xm_t - q^K xm_{t-K},   e_t = sum_n (c a') g_t,   h_t = a' g_t,
//   one multiply-add per state for g (xm_t is shared by the N states) and one for e, against three for h.
//   A state s enters as g = s / a'. Where a is raised to a', h keeps its own decay exactly and the input path
//   gains at most kScaledTiny |c| sum |xm| (far below float32 resolution); g overflows only for |s| > 2^64.
// A "direction" is a time order: dir = +1 runs t = 0..L-1; dir = -1 runs t = L-1..0 (the backward rows
// [D, 2D) of a bidirectional EMA), so both use the same code on the position i along the direction.
//
// Backward. With g_t = dL/dz_t = dL/dy_t * silu'(z_t), silu'(z) = sig(z) (1 + z (1 - sig(z))):
//   d omega   = sum_t g_t x_t
//   dc[n]     = sum_t g_t h_t
//   da[n]     = c sum_t g_t H_t,   H_t = dh_t/da = q H_{t-1} + xm_t - q^K xm_{t-K},          H_{-1} = 0
//   dq[n]     = c sum_t g_t P_t,   P_t = dh_t/dq = q P_{t-1} + h_{t-1} - K a q^(K-1) xm_{t-K},  P_{-1} = 0
//   so ONE sweep in the direction's order (recomputing h, hence z and g) gives every parameter gradient.
//   A gradient G on the final state h_{L-1} adds G H_{L-1} to da and G P_{L-1} to dq.
//   dx: with the adjoint lam_t = dL/dh_t = c g_t + q lam_{t+1} - c q^K g_{t+K} (+ G at t = L-1), an
//   anti-causal EMA of g run against the direction, dx_t = omega g_t + mask_t sum_n a lam_t, and the
//   gradient of the initial state is q lam_0. The carry r_t = q lam_{t+1} (r_{L-1} = G) avoids dividing by q.
// Summation: the sums over t of the parameter gradients are accumulated in blocks of kSumBlock steps, each
//   block's sum then added to a total: float32 rounding grows like (kSumBlock + L / kSumBlock) eps, not L eps.
// Chunking (CUDA): h is linear in h_{-1} with factor q per step, so a chunk of T steps started from 0 ends
//   in a u (u = q u + xm - q^K xm_{t-K}: H above) and the true state after it is q^T h_start + a u; the
//   q^K xm_{t-K} terms just read x before the chunk.
// Deterministic: no atomics; partial sums are reduced in a fixed order by the callers.
//
// Layout: a lane group of W channels (CPU: W contiguous channels vectorised together; CUDA: W = 1 per
// thread). Per-(n, lane) arrays are [n * W + w]. NM > 0 fixes the loop over n at compile time (CUDA,
// registers; arrays are zero-padded up to NM, which keeps the padded states at 0); NM = 0 loops to N.
#pragma once
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define MK_HD __host__ __device__ __forceinline__
#define MK_UNROLL _Pragma("unroll")
#define MK_NO_UNROLL _Pragma("unroll 1")
#elif defined(__GNUC__)
#define MK_HD inline __attribute__((always_inline))
#define MK_UNROLL
#define MK_NO_UNROLL
#else
#define MK_HD inline
#define MK_UNROLL
#define MK_NO_UNROLL
#endif
// The per-n lane loops below take restrict pointers so the host compiler vectorises them over W.
#define MK_R __restrict__
// scan_fwd loads MK_TIME_UNROLL steps of x before computing them. The host (its only user) needs no such
// help; the CUDA sweeps keep their loads a group of rows ahead themselves (sweep_rows, ema_cuda_threads.cuh).
#ifndef MK_TIME_UNROLL
#define MK_TIME_UNROLL 1
#endif

namespace mega_kernels {
namespace ema {

// Host side: a runtime flag made compile-time. pick_flag(b, f) calls f(Flag<b>()), and f reads the value as
// decltype(flag)::value, so one line instantiates both cases of a template (K > 0 or not, mask or not).
template <bool B>
struct Flag {
  static constexpr bool value = B;
};
template <typename F>
inline auto pick_flag(bool b, F&& f) -> decltype(f(Flag<false>())) {
  return b ? f(Flag<true>()) : f(Flag<false>());
}

// -- scalar helpers ---------------------------------------------------------------------------------------
template <typename A, typename T>
MK_HD A to_acc(T v) { return static_cast<A>(v); }
template <typename T, typename A>
MK_HD T from_acc(A v) { return static_cast<T>(v); }
#if defined(__CUDACC__)
template <> MK_HD float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> MK_HD float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> MK_HD __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> MK_HD __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16(v); }
#endif

// exp for float: the GPU's expf; on the host a branch-free version (2^k times a degree-7 polynomial on
// |r| <= ln2/2, about 1 ulp) that the compiler vectorises, unlike the libm call. Above 88.7228 (about
// ln FLT_MAX) it is inf, as expf; between 88 and that, e^88 (its only caller is sigmoid, where that is ~1e-38).
// Saturated instead, sigmoid(z) would stay near 6e-39 and silu(z) ~ 6e-39 z for z < -1e30.
MK_HD float mk_exp(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);
#else
  const bool overflows = v > 88.72283935546875f;
  v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
  const float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const float r = (v - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float e = p * __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  return overflows ? __builtin_inff() : e;
#endif
}
MK_HD double mk_exp(double v) { return exp(v); }
template <typename A>
MK_HD A sigmoid(A z) { return A(1) / (A(1) + mk_exp(-z)); }
template <typename A>
MK_HD A silu(A z) { return z * sigmoid(z); }
template <typename A>
MK_HD A dsilu(A z) { A s = sigmoid(z); return s * (A(1) + z * (A(1) - s)); }
// silu of the CUDA forward output: on the GPU z / (1 + e^-z) with the fast division (__fdividef, 2 ulp; the
// IEEE division adds a range test, a branch and a called slow path to every step of the sweep). It gives 0
// where 1 + e^-z exceeds 2^126 (z < -87.3, where |silu(z)| < 1e-35). Host: silu.
MK_HD float silu_fast(float z) {
#if defined(__CUDA_ARCH__)
  return __fdividef(z, 1.f + expf(-z));
#else
  return silu(z);
#endif
}
// silu'(z) of the CUDA backward sweeps, with the same fast division: sigmoid(z) = 1 / (1 + e^-z) is 0 where
// 1 + e^-z exceeds 2^126 (z < -87.3, where |silu'(z)| < 1e-36). Host: dsilu.
MK_HD float dsilu_fast(float z) {
#if defined(__CUDA_ARCH__)
  const float s = __fdividef(1.f, 1.f + expf(-z));
  return s * (1.f + z * (1.f - s));
#else
  return dsilu(z);
#endif
}

// Coefficients of one direction for a lane group, each [n * W + w] (see the header comment).
template <typename A>
struct Coefs {
  const A* a;
  const A* q;
  const A* c;
  const A* aqk;    // a q^K      (0 when K = 0)
  const A* qk;     // q^K        (0 when K = 0)
  const A* kaqk1;  // K a q^(K-1) (0 when K = 0)
};

// Inputs of one lane group: pointers at (b, t = 0, first channel); time stride `ts` (= D).
template <typename T>
struct Lanes {
  const T* x;
  const bool* mask;  // (L,) for this batch row, or nullptr
  int64_t ts;
  int L;
  int nw;            // valid lanes (<= W); the others read as 0
};

// Lane loads / stores of W channels of which the first nw exist (the others read as 0, are not written).
template <int W, typename T, typename A>
MK_HD void load_lanes(A* MK_R dst, const T* MK_R src, int nw) {
  if (nw == W) {
    for (int w = 0; w < W; ++w) dst[w] = to_acc<A>(src[w]);
  } else {
    for (int w = 0; w < W; ++w) dst[w] = w < nw ? to_acc<A>(src[w]) : A(0);
  }
}

template <int W, typename T, typename A>
MK_HD void store_lanes(T* MK_R dst, const A* MK_R src, int nw) {
  if (nw == W) {
    for (int w = 0; w < W; ++w) dst[w] = from_acc<T>(src[w]);
  } else {
    for (int w = 0; w < nw; ++w) dst[w] = from_acc<T>(src[w]);
  }
}

template <int W, typename A>
MK_HD void add_lanes(A* MK_R dst, const A* MK_R src) {
  for (int w = 0; w < W; ++w) dst[w] += src[w];
}

// g = gy silu'(e + omega x) and somega += g x over the lanes.
template <int W, typename A>
MK_HD void make_g(const A* MK_R e, const A* MK_R omega, const A* MK_R x, const A* MK_R gy, A* MK_R g,
                  A* MK_R somega) {
  for (int w = 0; w < W; ++w) {
    g[w] = gy[w] * dsilu(e[w] + omega[w] * x[w]);
    somega[w] += g[w] * x[w];
  }
}

// -- one n of each sweep, over the W lanes (restrict pointers: see MK_R) ------------------------------------
template <int W, typename A>
MK_HD void step_h(const A* MK_R q, const A* MK_R a, const A* MK_R c, const A* MK_R xv, A* MK_R h, A* MK_R e) {
  for (int w = 0; w < W; ++w) {
    const A hv = q[w] * h[w] + a[w] * xv[w];
    h[w] = hv;
    e[w] += c[w] * hv;
  }
}

// step_h of a truncated sweep with its restarted scan rs (see "Anchoring"): at a block's last position (`end`)
// h takes the restarted value and rs restarts.
template <int W, typename A>
MK_HD void step_h_anchored(const A* MK_R q, const A* MK_R a, const A* MK_R aqk, const A* MK_R c, const A* MK_R xv,
                           const A* MK_R xo, A* MK_R h, A* MK_R rs, A* MK_R e, bool end) {
  if (end) {
    for (int w = 0; w < W; ++w) {
      const A hv = q[w] * rs[w] + a[w] * xv[w];
      h[w] = hv;
      rs[w] = A(0);
      e[w] += c[w] * hv;
    }
  } else {
    for (int w = 0; w < W; ++w) {
      const A hv = q[w] * h[w] + a[w] * xv[w] - aqk[w] * xo[w];
      rs[w] = q[w] * rs[w] + a[w] * xv[w];
      h[w] = hv;
      e[w] += c[w] * hv;
    }
  }
}

// One n of the parameter sweep. ACC: first add gp (g of the previous step) times the states held, which are
// that step's h, H, P: the sums of step t are added at step t + 1, so each state is read once per step.
template <int W, bool ACC, typename A>
MK_HD void step_hHP(const A* MK_R q, const A* MK_R a, const A* MK_R c, const A* MK_R xv, const A* MK_R gp, A* MK_R h,
                    A* MK_R H, A* MK_R P, A* MK_R e, A* MK_R sc, A* MK_R sH, A* MK_R sP) {
  for (int w = 0; w < W; ++w) {
    const A hp = h[w], Hp = H[w], Pp = P[w];
    if (ACC) {
      sc[w] += gp[w] * hp;
      sH[w] += gp[w] * Hp;
      sP[w] += gp[w] * Pp;
    }
    const A hv = q[w] * hp + a[w] * xv[w];
    H[w] = q[w] * Hp + xv[w];
    P[w] = q[w] * Pp + hp;
    h[w] = hv;
    e[w] += c[w] * hv;
  }
}

// The same for a truncated EMA, which has no initial state, so h = a H exactly: only H and P are kept (sc is
// a sH), with their restarted scans rH, rP (rP_t = q rP_{t-1} + a rH_{t-1}, the derivative of a rH in q),
// taken over at a block's last position (`end`; see "Anchoring").
template <int W, bool ACC, typename A>
MK_HD void step_HP_anchored(const A* MK_R q, const A* MK_R a, const A* MK_R qk, const A* MK_R kaqk1,
                            const A* MK_R c, const A* MK_R xv, const A* MK_R xo, const A* MK_R gp, A* MK_R H,
                            A* MK_R P, A* MK_R rH, A* MK_R rP, bool end, A* MK_R e, A* MK_R sH, A* MK_R sP) {
  if (ACC) {
    for (int w = 0; w < W; ++w) {
      sH[w] += gp[w] * H[w];
      sP[w] += gp[w] * P[w];
    }
  }
  if (end) {  // (a branch per step, not a select per lane: the selects cost the sweep 40%)
    for (int w = 0; w < W; ++w) {
      const A Hv = q[w] * rH[w] + xv[w];
      P[w] = q[w] * rP[w] + a[w] * rH[w];
      H[w] = Hv;
      rH[w] = A(0);
      rP[w] = A(0);
      e[w] += c[w] * a[w] * Hv;
    }
  } else {
    for (int w = 0; w < W; ++w) {
      const A Hp = H[w], rHp = rH[w];
      const A Hv = q[w] * Hp + xv[w] - qk[w] * xo[w];
      P[w] = q[w] * P[w] + a[w] * Hp - kaqk1[w] * xo[w];
      H[w] = Hv;
      rP[w] = q[w] * rP[w] + a[w] * rHp;
      rH[w] = q[w] * rHp + xv[w];
      e[w] += c[w] * a[w] * Hv;
    }
  }
}

template <int W, typename A>
MK_HD void accumulate2(const A* MK_R g, const A* MK_R H, const A* MK_R P, A* MK_R sH, A* MK_R sP) {
  for (int w = 0; w < W; ++w) {
    sH[w] += g[w] * H[w];
    sP[w] += g[w] * P[w];
  }
}

template <int W, typename A>
MK_HD void accumulate3(const A* MK_R g, const A* MK_R h, const A* MK_R H, const A* MK_R P, A* MK_R sc, A* MK_R sH,
                       A* MK_R sP) {
  for (int w = 0; w < W; ++w) {
    sc[w] += g[w] * h[w];
    sH[w] += g[w] * H[w];
    sP[w] += g[w] * P[w];
  }
}

// TRUNC: rr is the restarted carry (see "Anchoring"; blocks of K positions counted from the sweep's start at
// i = L - 1): at a block's last position (`end`) lam takes the restarted value and rr restarts.
template <int W, bool TRUNC, typename A>
MK_HD void step_adjoint(const A* MK_R q, const A* MK_R a, const A* MK_R c, const A* MK_R qk, const A* MK_R g,
                        const A* MK_R go, A* MK_R r, A* MK_R rr, bool end, A* MK_R d) {
  if (TRUNC && end) {
    for (int w = 0; w < W; ++w) {
      const A lam = rr[w] + c[w] * g[w];
      rr[w] = A(0);
      d[w] += a[w] * lam;
      r[w] = q[w] * lam;
    }
  } else {
    for (int w = 0; w < W; ++w) {
      const A lam = r[w] + c[w] * g[w] - (TRUNC ? c[w] * qk[w] * go[w] : A(0));
      if (TRUNC) rr[w] = q[w] * (rr[w] + c[w] * g[w]);
      d[w] += a[w] * lam;
      r[w] = q[w] * lam;
    }
  }
}

constexpr int kSumBlock = 128;

// total += part; part = 0 (the blocked summation above).
template <typename A>
MK_HD void fold_sums(A* MK_R total, A* MK_R part, int count) {
  for (int j = 0; j < count; ++j) {
    total[j] += part[j];
    part[j] = A(0);
  }
}

MK_HD int time_of(int i, int dir, int L) { return dir > 0 ? i : L - 1 - i; }

// The input coefficient a' of the scaled state (see the header comment): |a| < 2^-64 (0 included) is raised
// to 2^-64, so 1 / a' is finite. A NaN a stays NaN.
constexpr float kScaledTiny = 0x1p-64f;
MK_HD float scaled_coef(float a) { return fabsf(a) < kScaledTiny ? kScaledTiny : a; }

// Host: the rows of x (and dL/dy) a lane group reads are W elements at a stride of D, a new cache line per
// step; the hardware prefetcher stops at page boundaries (every 4 steps at D = 256 float32). The host sweeps
// prefetch the row kPrefetchSteps ahead (no-op on the GPU, whose sweeps keep their loads ahead themselves).
constexpr int kPrefetchSteps = 16;
template <typename T>
MK_HD void prefetch_row(const T* base, const Lanes<T>& in, int i, int dir) {
#if !defined(__CUDA_ARCH__) && defined(__GNUC__)
  if (i < in.L) {  // the lanes that exist: a partial group's row ends before W
    const T* row = base + time_of(i, dir, in.L) * in.ts;
    __builtin_prefetch(row);
    if (in.nw * sizeof(T) > 64) __builtin_prefetch(row + in.nw - 1);
  }
#endif
}

// xm at position i along the direction (0 outside [0, L), where masked, or in padded lanes).
template <int W, typename T, typename A>
MK_HD void load_xm(A* dst, const Lanes<T>& in, int i, int dir) {
  if (i < 0 || i >= in.L) {
    for (int w = 0; w < W; ++w) dst[w] = A(0);
    return;
  }
  const int t = time_of(i, dir, in.L);
  const bool keep = in.mask == nullptr || in.mask[t];
  const T* src = in.x + t * in.ts;
  if (keep && in.nw == W) {
    for (int w = 0; w < W; ++w) dst[w] = to_acc<A>(src[w]);
  } else {
    for (int w = 0; w < W; ++w) dst[w] = (keep && w < in.nw) ? to_acc<A>(src[w]) : A(0);
  }
}

// Forward sweep over positions [i0, i1) of direction `dir`: updates h (N x W) in place and calls
// emit(t, e) with e[w] = sum_n c h_t for each step (emit may do nothing). TRUNC: K > 0 (compile-time, so
// the plain EMA does not pay for the window's subtraction); rs (N x W) is then the restarted scan
// ("Anchoring"), 0 at i0, which is a multiple of K (rs is unused otherwise).
template <int W, int NM, bool TRUNC, typename T, typename A, typename Emit>
MK_HD void scan_fwd_k(const Lanes<T>& in, int dir, int i0, int i1, int K, int N, const Coefs<A>& cf, A* h,
                      A* rs, Emit emit) {
  const int nn = NM > 0 ? NM : N;
  constexpr int U = MK_TIME_UNROLL;
  for (int ib = i0; ib < i1; ib += U) {
    A xv[U][W], xo[U][W], e[W];
    prefetch_row(in.x, in, ib + kPrefetchSteps, dir);
    MK_UNROLL for (int k = 0; k < U; ++k) {  // the loads of U steps first
      load_xm<W>(xv[k], in, ib + k < i1 ? ib + k : -1, dir);
      if (TRUNC) load_xm<W>(xo[k], in, ib + k < i1 ? ib + k - K : -1, dir);
    }
    MK_UNROLL for (int k = 0; k < U; ++k) {
      if (ib + k >= i1) break;
      for (int w = 0; w < W; ++w) e[w] = A(0);
      const bool end = TRUNC && (ib + k + 1) % K == 0;
      MK_UNROLL for (int n = 0; n < nn; ++n) {
        const int j = n * W;
        if (TRUNC) {
          step_h_anchored<W>(cf.q + j, cf.a + j, cf.aqk + j, cf.c + j, xv[k], xo[k], h + j, rs + j, e, end);
        } else {
          step_h<W>(cf.q + j, cf.a + j, cf.c + j, xv[k], h + j, e);
        }
      }
      emit(time_of(ib + k, dir, in.L), e);
    }
  }
}

template <int W, int NM, typename T, typename A, typename Emit>
inline void scan_fwd(const Lanes<T>& in, int dir, int i0, int i1, int K, int N, const Coefs<A>& cf, A* h, A* rs,
                     Emit emit) {
  pick_flag(K > 0, [&](auto trunc) {
    scan_fwd_k<W, NM, decltype(trunc)::value>(in, dir, i0, i1, K, N, cf, h, rs, emit);
  });
}

// Parameter-gradient sweep over [i0, i1) of direction `dir` (see "Backward" above). States h, H, P and
// sums sc += g h, sH += g H, sP += g P are N x W. TRUNC (no initial state): h is not kept (h = a H) and sc is
// left to the caller (a sH); rH, rP (N x W each, contiguous from rH) are the restarted scans ("Anchoring"), 0 at
// position 0 and carried between calls like H, P. With MAKE_G the sweep also forms g_t itself:
//   z = e + extra[t] + omega x_t, g = gy_t silu'(z); it stores g_t into gbuf[t] (extra may alias gbuf)
//   and adds g x to somega. Without MAKE_G it reads g_t from gbuf.
template <int W, int NM, bool MAKE_G, bool TRUNC, typename T, typename A>
MK_HD void scan_params_k(const Lanes<T>& in, const T* gy, const A* extra, A* gbuf, int64_t gts, const A* omega,
                         A* somega, int dir, int i0, int i1, int K, int N, const Coefs<A>& cf, A* h, A* H, A* P,
                         A* rH, A* sc, A* sH, A* sP) {
  const int nn = NM > 0 ? NM : N;
  A* rP = rH + nn * W;
  A gv[W];
  for (int i = i0; i < i1; ++i) {
    const int t = time_of(i, dir, in.L);
    A xv[W], xo[W], e[W];
    prefetch_row(in.x, in, i + kPrefetchSteps, dir);
    if (MAKE_G) prefetch_row(gy, in, i + kPrefetchSteps, dir);
    load_xm<W>(xv, in, i, dir);
    load_xm<W>(xo, in, TRUNC ? i - K : -1, dir);
    for (int w = 0; w < W; ++w) e[w] = A(0);
    const bool end = TRUNC && (i + 1) % K == 0;
    if (TRUNC) {
      if (i == i0) {  // no previous step in this call: its sums were added by the call before
        MK_UNROLL for (int n = 0; n < nn; ++n) {
          const int j = n * W;
          step_HP_anchored<W, false>(cf.q + j, cf.a + j, cf.qk + j, cf.kaqk1 + j, cf.c + j, xv, xo, gv, H + j, P + j,
                                     rH + j, rP + j, end, e, sH + j, sP + j);
        }
      } else {
        MK_UNROLL for (int n = 0; n < nn; ++n) {
          const int j = n * W;
          step_HP_anchored<W, true>(cf.q + j, cf.a + j, cf.qk + j, cf.kaqk1 + j, cf.c + j, xv, xo, gv, H + j, P + j,
                                    rH + j, rP + j, end, e, sH + j, sP + j);
        }
      }
    } else if (i == i0) {
      MK_UNROLL for (int n = 0; n < nn; ++n) {
        const int j = n * W;
        step_hHP<W, false>(cf.q + j, cf.a + j, cf.c + j, xv, gv, h + j, H + j, P + j, e, sc + j, sH + j, sP + j);
      }
    } else {
      MK_UNROLL for (int n = 0; n < nn; ++n) {
        const int j = n * W;
        step_hHP<W, true>(cf.q + j, cf.a + j, cf.c + j, xv, gv, h + j, H + j, P + j, e, sc + j, sH + j, sP + j);
      }
    }
    A* gt = gbuf + t * gts;
    if (MAKE_G) {
      A xw[W], gw[W];
      load_lanes<W>(xw, in.x + t * in.ts, in.nw);
      load_lanes<W>(gw, gy + t * in.ts, in.nw);
      if (extra) add_lanes<W>(e, extra + t * gts);
      make_g<W>(e, omega, xw, gw, gv, somega);
      for (int w = 0; w < W; ++w) gt[w] = gv[w];
    } else {
      for (int w = 0; w < W; ++w) gv[w] = gt[w];
    }
  }
  if (i1 <= i0) return;
  MK_UNROLL for (int n = 0; n < nn; ++n) {  // the last step's sums
    const int j = n * W;
    if (TRUNC) {
      accumulate2<W>(gv, H + j, P + j, sH + j, sP + j);
    } else {
      accumulate3<W>(gv, h + j, H + j, P + j, sc + j, sH + j, sP + j);
    }
  }
}

template <int W, int NM, bool MAKE_G, typename T, typename A>
inline void scan_params(const Lanes<T>& in, const T* gy, const A* extra, A* gbuf, int64_t gts, const A* omega,
                        A* somega, int dir, int i0, int i1, int K, int N, const Coefs<A>& cf, A* h, A* H, A* P,
                        A* rH, A* sc, A* sH, A* sP) {
  pick_flag(K > 0, [&](auto trunc) {
    scan_params_k<W, NM, MAKE_G, decltype(trunc)::value>(in, gy, extra, gbuf, gts, omega, somega, dir, i0, i1, K, N,
                                                         cf, h, H, P, rH, sc, sH, sP);
  });
}

// Adjoint sweep against direction `dir`, positions i1-1 down to i0: carry r (N x W, r = q lam_{i+1}),
// writes (or adds, `accumulate`) sum_n a lam_i to dxm[t]. Leaves r = q lam_{i0}. TRUNC: rr (N x W) is the
// restarted carry ("Anchoring"), 0 at i1 = L. (The cpu backward's; the CUDA backward runs its adjoint in
// ema_cuda_threads_bwd.cuh.)
template <int W, int NM, bool TRUNC, typename A>
MK_HD void scan_adjoint_k(const A* gbuf, A* dxm, int64_t gts, int L, int dir, int i0, int i1, int K, int N,
                          const Coefs<A>& cf, A* r, A* rr, bool accumulate) {
  const int nn = NM > 0 ? NM : N;
  for (int i = i1 - 1; i >= i0; --i) {
    const int t = time_of(i, dir, L);
    const bool far = TRUNC && i < L - K;  // (i + K < L, without overflow for K near 2^31)
    const A* gt = gbuf + t * gts;
    const A* go = gbuf + (far ? time_of(i + K, dir, L) : t) * gts;
    A gv[W], gov[W], d[W];
    for (int w = 0; w < W; ++w) {
      gv[w] = gt[w];
      gov[w] = far ? go[w] : A(0);
      d[w] = A(0);
    }
    const bool end = TRUNC && (L - i) % K == 0;  // (the (L - 1 - i)-th position of the sweep ends a block)
    MK_UNROLL for (int n = 0; n < nn; ++n) {
      const int j = n * W;
      step_adjoint<W, TRUNC>(cf.q + j, cf.a + j, cf.c + j, cf.qk + j, gv, gov, r + j, rr + j, end, d);
    }
    A* out = dxm + t * gts;
    for (int w = 0; w < W; ++w) out[w] = accumulate ? out[w] + d[w] : d[w];
  }
}

template <int W, int NM, typename A>
inline void scan_adjoint(const A* gbuf, A* dxm, int64_t gts, int L, int dir, int i0, int i1, int K, int N,
                         const Coefs<A>& cf, A* r, A* rr, bool accumulate) {
  pick_flag(K > 0, [&](auto trunc) {
    scan_adjoint_k<W, NM, decltype(trunc)::value>(gbuf, dxm, gts, L, dir, i0, i1, K, N, cf, r, rr, accumulate);
  });
}

// One decoding step of one channel: h = q s + a xm, returns z = sum_n c h + omega x (y = silu(z)); writes h to
// s_out.
template <int NM, typename A>
MK_HD A step_lane_z(A xm, A x, A omega, const A* a, const A* q, const A* c, const A* s, int64_t s_stride,
                    A* s_out, int64_t o_stride, int N) {
  const int nn = NM > 0 ? NM : N;
  A e = A(0);
  MK_UNROLL for (int n = 0; n < nn; ++n) {
    if (NM > 0 && n >= N) break;
    const A hv = q[n] * s[n * s_stride] + a[n] * xm;
    s_out[n * o_stride] = hv;
    e += c[n] * hv;
  }
  return e + omega * x;
}

}  // namespace ema
}  // namespace mega_kernels
