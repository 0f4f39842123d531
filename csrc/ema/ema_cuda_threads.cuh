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

constexpr int kBiChunk = 64;  // bidirectional chunk (shared memory: threads per block * kBiChunk floats)

// States live in NM registers: N padded up to 4, 8, 16 or 32.
MK_HD int padded_n(int N) { return N <= 4 ? 4 : N <= 8 ? 8 : N <= 16 ? 16 : 32; }

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

struct Plan {
  int chunk, nchunks;
};

inline Plan fwd_plan(int B, int L, int D, bool bi) {
  // Enough threads to fill an H100/H200 (~256K), chunks of at least 32 steps (the workspace traffic per
  // element is ~4N/chunk floats, so longer chunks are cheaper when the batch already fills the GPU).
  const int64_t lanes = static_cast<int64_t>(B) * D;
  int64_t want = (262144 + lanes - 1) / lanes;
  int chunk = static_cast<int>((L + want - 1) / want);
  chunk = ((chunk + 31) / 32) * 32;
  if (chunk < 32) chunk = 32;
  if (bi && chunk > kBiChunk) chunk = kBiChunk;
  return {chunk, (L + chunk - 1) / chunk};
}

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

// Phase 1 for (batch b, direction dir_idx, channel d, chunk): the chunk's end state from 0 into the workspace.
template <typename T, int NM>
MK_HD void fwd_local_thread(const FwdParams& p, const Plan& plan, int b, int dir_idx, int d, int chunk) {
  const int ndir = p.bi ? 2 : 1;
  const int dir = dir_idx ? -1 : 1;
  Reg<NM> r;
  r.load(p.cf, dir_idx * p.D + d, p.N);
  const Lanes<T> in{static_cast<const T*>(p.x) + static_cast<int64_t>(b) * p.L * p.D + d,
                    p.mask ? p.mask + static_cast<int64_t>(b) * p.L : nullptr, p.D, p.L, 1};
  float u[NM];
  MK_UNROLL for (int n = 0; n < NM; ++n) u[n] = 0.f;
  int i0, i1;
  chunk_positions(chunk, plan.chunk, p.L, dir, i0, i1);
  if (p.K > 0) {
    scan_input_sum<NM, true>(in, dir, i0, i1, p.K, r.q, r.qk, u);
  } else {
    scan_input_sum<NM, false>(in, dir, i0, i1, p.K, r.q, r.qk, u);
  }
  MK_UNROLL for (int n = 0; n < NM; ++n)  // the end state from 0 is h = a u
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
template <typename T, int NM, bool BI>
MK_HD void fwd_out_thread(const FwdParams& p, const Plan& plan, int b, int d, int chunk, float* ebuf, int es) {
  const int ndir = BI ? 2 : 1, t0 = chunk * plan.chunk;
  const int64_t base = static_cast<int64_t>(b) * p.L * p.D + d;
  const Lanes<T> in{static_cast<const T*>(p.x) + base, p.mask ? p.mask + static_cast<int64_t>(b) * p.L : nullptr,
                    p.D, p.L, 1};
  Reg<NM> r;
  float h[NM];
  int i0, i1;
  if (BI) {
    r.load(p.cf, p.D + d, p.N);
    MK_UNROLL for (int n = 0; n < NM; ++n) h[n] = p.workspace[ws_index(b, 1, ndir, chunk, plan.nchunks, n, NM, d, p.D)];
    chunk_positions(chunk, plan.chunk, p.L, -1, i0, i1);
    scan_fwd<1, NM>(in, -1, i0, i1, p.K, p.N, r.view(), h,
                    [&](int t, const float* e) { ebuf[(t - t0) * es] = e[0]; });
  }
  r.load(p.cf, d, p.N);
  MK_UNROLL for (int n = 0; n < NM; ++n) h[n] = p.workspace[ws_index(b, 0, ndir, chunk, plan.nchunks, n, NM, d, p.D)];
  chunk_positions(chunk, plan.chunk, p.L, 1, i0, i1);
  const float om = p.omega[d];
  T* y = static_cast<T*>(p.y) + base;
  scan_fwd<1, NM>(in, 1, i0, i1, p.K, p.N, r.view(), h, [&](int t, const float* e) {
    float z = e[0] + om * to_acc<float>(in.x[static_cast<int64_t>(t) * p.D]);
    if (BI) z += ebuf[(t - t0) * es];
    y[static_cast<int64_t>(t) * p.D] = from_acc<T>(silu(z));
  });
}

// The whole backward of (b, d): see "Backward" in ema_kernels.cuh.
template <typename T, int NM>
MK_HD void bwd_thread(const BwdParams& p, int b, int d) {
  const int64_t base = static_cast<int64_t>(b) * p.L * p.D + d, D = p.D;
  const Lanes<T> in{static_cast<const T*>(p.x) + base, p.mask ? p.mask + static_cast<int64_t>(b) * p.L : nullptr,
                    D, p.L, 1};
  const T* gy = static_cast<const T*>(p.gy) + base;
  float* gbuf = p.gbuf + base;
  float* dxm = p.dxm + base;
  const float om = p.omega[d];
  float somega = 0.f;
  Reg<NM> r;
  float h[NM], H[NM], P[NM], sc[NM], sH[NM], sP[NM], carry[NM];
  if (p.bi) {  // the backward direction's output enters z: gbuf holds it until the first sweep overwrites it
    r.load(p.cf, p.D + d, p.N);
    MK_UNROLL for (int n = 0; n < NM; ++n) h[n] = 0.f;
    scan_fwd<1, NM>(in, -1, 0, p.L, p.K, p.N, r.view(), h,
                    [&](int t, const float* e) { gbuf[static_cast<int64_t>(t) * D] = e[0]; });
  }
  for (int dir = 1; dir >= -1; dir -= 2) {
    if (dir < 0 && !p.bi) break;
    const int row = dir > 0 ? d : p.D + d;
    r.load(p.cf, row, p.N);
    const bool gs = dir > 0 && p.gstate != nullptr;
    MK_UNROLL for (int n = 0; n < NM; ++n) {
      const int64_t j = (static_cast<int64_t>(b) * p.D + d) * p.N + n;
      h[n] = (dir > 0 && p.state && n < p.N) ? p.state[j] : 0.f;
      carry[n] = (gs && n < p.N) ? p.gstate[j] : 0.f;
      H[n] = P[n] = sc[n] = sH[n] = sP[n] = 0.f;
    }
    const int64_t o0 = (static_cast<int64_t>(b) * 2 * p.D + row) * p.N;  // this thread's partial sums
    for (int i0 = 0; i0 < p.L; i0 += kSumBlock) {  // blocked summation (ema_kernels.cuh)
      const int i1 = p.L < i0 + kSumBlock ? p.L : i0 + kSumBlock;
      if (dir > 0) {
        scan_params<1, NM, true>(in, gy, p.bi ? static_cast<const float*>(gbuf) : nullptr, gbuf, D, &om, &somega,
                                 1, i0, i1, p.K, p.N, r.view(), h, H, P, sc, sH, sP);
      } else {
        scan_params<1, NM, false>(in, gy, static_cast<const float*>(nullptr), gbuf, D, &om, &somega, -1, i0, i1,
                                  p.K, p.N, r.view(), h, H, P, sc, sH, sP);
      }
      MK_UNROLL for (int n = 0; n < NM; ++n) {
        if (n < p.N) {
          p.pc[o0 + n] += sc[n];
          p.pa[o0 + n] += sH[n];
          p.pq[o0 + n] += sP[n];
        }
        sc[n] = sH[n] = sP[n] = 0.f;
      }
      p.pomega[static_cast<int64_t>(b) * p.D + d] += somega;
      somega = 0.f;
    }
    MK_UNROLL for (int n = 0; n < NM; ++n) {
      if (n < p.N) {
        p.pa[o0 + n] = r.c[n] * p.pa[o0 + n] + carry[n] * H[n];
        p.pq[o0 + n] = r.c[n] * p.pq[o0 + n] + carry[n] * P[n];
      }
    }
    scan_adjoint<1, NM>(static_cast<const float*>(gbuf), dxm, D, p.L, dir, 0, p.L, p.K, p.N, r.view(), carry,
                        dir < 0);
    if (dir > 0 && p.dstate) {
      MK_UNROLL for (int n = 0; n < NM; ++n)
        if (n < p.N) p.dstate[(static_cast<int64_t>(b) * p.D + d) * p.N + n] = carry[n];
    }
  }
  T* dx = static_cast<T*>(p.dx) + base;
  for (int t = 0; t < p.L; ++t) {
    const float m = (p.mask == nullptr || p.mask[static_cast<int64_t>(b) * p.L + t]) ? 1.f : 0.f;
    dx[t * D] = from_acc<T>(om * gbuf[t * D] + m * dxm[t * D]);
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
