"""Triton backward of chunked single-head attention with a Toeplitz bias (FlashAttention-2 style recompute).

Maths (notation of attention_common.py and attention_fwd.py; dO = dL/d out, all sums over visible pairs):

    dP_ij = dO_i . v_j                                   (sums over all of E)
    dv_j  = sum_i p_ij dO_i
    softmax:  p = exp(s - lse);  dS_ij = p_ij (dP_ij - delta_i),  delta_i = sum_j p_ij dP_ij = dO_i . out_i
              (p = 2^((s2 - m) - log2 l) with the forward's log2-domain scores s2, row max m and sum l:
              attention_fwd.py)
              ds/dq = Z^-0.5 k,  ds/dk = Z^-0.5 q               (delta_i: `_delta_kernel`, first)
    element:  p = act(s);        dS_ij = act'(s_ij) dP_ij
              ds/dq_i = k_j / n_i,  ds/dk_j = q_i / n_i
    dq_i = sum_j dS_ij c_i k_j,   dk_j = sum_i dS_ij c_i q_i,   c_i = Z^-0.5 (softmax) or 1 / n_i (element)
    d rel_bias[W - 1 + d] = sum over pairs with j - i = d of dS_ij   (a sum along diagonals)

Kernels (no atomics anywhere, so every gradient is deterministic):
- `_dv_kernel`: program = (key tile, E tile): loops over the query tiles that see the keys, recomputes p and
  accumulates p^T dO (like the forward, transposed).
- `_dk_kernel`: program = key tile: loops over query tiles, recomputes p, dP (looping over E), dS; accumulates
  dk, and the diagonal sums of dS for the bias. Query tiles are aligned to absolute positions in steps of the
  (square) tile T, so a (query tile, key tile) pair covers diagonals d = m T + c - T .. m T + c with m the
  tile offset: rotating each row of dS left by its row index (`tl.gather`, R_ic = dS_i,(i+c) mod T) turns
  diagonals into columns: column c of R sums diagonal m T + c (where i + c < T) and (m - 1) T + c (where
  i + c >= T). Consecutive query tiles step m down by one, so the second part is carried to the next tile and
  every segment (b, key tile, m) of T diagonals is written once into a zeroed float32 scratch; torch sums the
  scratch over batch and key tiles (a fixed-order reduction). That scratch holds B (L / T) (2 S / T) T floats,
  L^2 for one long block; so a launch covers only a band of tile offsets m (`_bias_bands`: the scratch stays
  under `BIAS_SCRATCH_BYTES` or the size of a float32 dk, whichever is larger: linear in L), each band's sums
  are added in order, and dk (kept in float32 across the bands) is the sum of the bands' parts.
- dq, two ways. When the tiles fit in `DS_SCRATCH_LIMIT_BYTES` (chunked attention: linear in L),
  `_dk_kernel` also stores each (c_i dS_ij) tile in the input dtype (what the dq matmul rounds to anyway) and
  `_dq_ds_kernel` (program = query tile) sums them against k: no second E-wide dP. Otherwise (long unchunked
  blocks, where those tiles grow as L^2) `_dq_kernel` (program = query tile) loops over key tiles and
  recomputes p, dP, dS itself, keeping memory linear in L.
dP costs 2 T^2 E per tile pair (once, or twice on the recompute path; never shared through atomics), and the
score recompute costs Z / BLOCK_E extra in `_dv_kernel`, the price of E-wide values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import (NO_SPECIALIZE, autotuned, config, constants, describe, element_act, element_act_grad,
                               interior_query_range, inv_count, kernel_bias, load_bias, load_key_pad, load_row_stats,
                               mask_args, masked_tile_start, may_autotune, pair_interior, query_tile, row_info,
                               visible)
from .attention_fwd import row_stats


@triton.jit
def _probs(q, kt, pos, row_ok, cs, ce, cnt, offs_n, kp, BIAS, W, m_row, ll_row, scale, causal, interior,
           ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
           LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr):
    """Recompute a tile: returns p (float32, 0 off the visible pairs), the element scores s, the visibility,
    and the per-row factor c (Z^-0.5 or 1 / n). interior (`pair_interior`): every pair is visible, so the
    masks and the masked bias gather are skipped. Softmax: m_row, ll_row are the forward's row max and log2 of
    its sum (`load_row_stats`)."""
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if interior:
        vis = tl.full(qk.shape, 1, tl.int1)
        bias = tl.load(BIAS + (W - 1 + offs_n[None, :] - pos[:, None])).to(tl.float32)
    else:
        vis = visible(pos, row_ok, cs, ce, cnt, offs_n, kp, causal, ACT)
        bias = load_bias(BIAS, pos, offs_n, W, vis)
    if ACT == 0:  # the forward's log2-domain scores, its arithmetic (attention_fwd.py): s - m is exact at the max
        s = qk * (scale * 1.4426950408889634) + bias * 1.4426950408889634
        p = tl.where(vis, tl.exp2((s - m_row[:, None]) - ll_row[:, None]), 0.0)
        c = tl.full(pos.shape, 1.0, tl.float32) * scale
    else:
        c = inv_count(pos, cs, cnt, causal)
        s = qk * c[:, None] + bias
        p = tl.where(vis, element_act(s, ACT, LAPLACE_MU, LAPLACE_C), 0.0)
    return p, s, vis, c


@triton.jit
def _row_stats(LSE, DELTA, b, Lq, offs_m, row_ok, pos, ACT: tl.constexpr):
    """Per query row: (m, log2 l, delta) of the softmax (see the top of this file); placeholders for laplace /
    relu2, which use none of them."""
    m, ll = load_row_stats(LSE, b, Lq, offs_m, row_ok, pos, ACT)
    if ACT == 0:
        delta = tl.load(DELTA + b * Lq + offs_m, mask=row_ok, other=0.0)
    else:
        delta = m
    return m, ll, delta


@triton.jit
def _dscores(p, s, vis, dp, delta, ACT: tl.constexpr, LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr,
             LAPLACE_D: tl.constexpr):
    """dL/ds for a tile (float32, 0 off the visible pairs)."""
    if ACT == 0:
        ds = p * (dp - delta[:, None])
    else:
        ds = tl.where(vis, element_act_grad(s, ACT, LAPLACE_MU, LAPLACE_C, LAPLACE_D) * dp, 0.0)
    return ds


@triton.jit
def _dp_tile(DO, V, b, offs_m, row_ok, offs_n, n_ok, s_db, s_dm, s_de, s_vb, s_vn, s_ve, E,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dP = dO v^T for a (BLOCK_M, BLOCK_N) tile, summed over all of E in BLOCK_E steps (float32)."""
    dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_ok = offs_e < E
        do = tl.load(DO + b * s_db + offs_m[:, None] * s_dm + offs_e[None, :] * s_de,
                     mask=row_ok[:, None] & e_ok[None, :], other=0.0)
        vt = tl.load(V + b * s_vb + offs_n[None, :] * s_vn + offs_e[:, None] * s_ve,
                     mask=n_ok[None, :] & e_ok[:, None], other=0.0)
        dp = tl.dot(do, vt, dp, input_precision=DOT_PRECISION)
    return dp


@triton.jit
def _query_range(pid_n, Lq, Lk, S, T: tl.constexpr, causal):
    """Start (aligned down to T) and end of the query positions that can see key tile pid_n."""
    k_first = pid_n * T
    k_last = tl.minimum(k_first + T, Lk) - 1
    lo = tl.maximum((k_first // S) * S, Lk - Lq)
    lo = tl.where(causal != 0, tl.maximum(lo, k_first), lo)
    hi = tl.minimum((k_last // S) * S + S, Lk)
    return (lo // T) * T, hi


@triton.jit
def _dv_tile(acc, Q, BIAS, CNT, LSE, DO, kt, kp, offs_n, offs_z, offs_e, b, p0, s_qb, s_qm, s_qz, s_db, s_dm,
             s_de, s_cb, Lq, Lk, Z, E, S, W, scale, causal, has_mask,
             ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
             LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr):
    """acc += p^T dO for the query tile at positions [p0, p0 + BLOCK_M); not MASKED: an interior tile (every
    row a query, every pair visible: `interior_query_range`)."""
    pos = p0 + tl.arange(0, BLOCK_M)
    offs_m = pos - (Lk - Lq)
    if MASKED:
        row_ok = (offs_m >= 0) & (pos < Lk)
    else:
        row_ok = tl.full((BLOCK_M,), 1, tl.int1)
    cs, ce, cnt = row_info(pos, row_ok, Lk, S, CNT + b * s_cb, has_mask)
    q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qm + offs_z[None, :] * s_qz,
                mask=row_ok[:, None] & (offs_z[None, :] < Z), other=0.0)
    m, ll = load_row_stats(LSE, b, Lq, offs_m, row_ok, pos, ACT)
    p, s, vis, c = _probs(q, kt, pos, row_ok, cs, ce, cnt, offs_n, kp, BIAS, W, m, ll, scale,
                          causal, not MASKED, ACT, DOT_PRECISION, LAPLACE_MU, LAPLACE_C)
    do = tl.load(DO + b * s_db + offs_m[:, None] * s_dm + offs_e[None, :] * s_de,
                 mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    return tl.dot(tl.trans(p.to(do.dtype)), do, acc, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _dv_kernel(Q, K, BIAS, KPM, CNT, LSE, DO, DV,
               s_qb, s_qm, s_qz, s_kb, s_kn, s_kz, s_db, s_dm, s_de, s_vb, s_vn, s_ve, s_mb, s_cb,
               Lq, Lk, Z, E, S, W, scale, causal, has_mask,
               ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_E: tl.constexpr,
               LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr, LAPLACE_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_e = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_z = tl.arange(0, BLOCK_Z)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n_ok = offs_n < Lk
    kt = tl.load(K + b * s_kb + offs_n[None, :] * s_kn + offs_z[:, None] * s_kz,
                 mask=n_ok[None, :] & (offs_z[:, None] < Z), other=0.0)
    kp = load_key_pad(KPM + b * s_mb, offs_n, Lk, has_mask)
    start, hi = _query_range(pid_n, Lq, Lk, S, BLOCK_N, causal)
    start = (start // BLOCK_M) * BLOCK_M
    int_lo, int_hi = interior_query_range(start, hi, pid_n * BLOCK_N, pid_n * BLOCK_N + BLOCK_N - 1, Lq, Lk, S,
                                          causal, has_mask, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    n_masked = (int_lo - start) // BLOCK_M + tl.cdiv(tl.maximum(hi - int_hi, 0), BLOCK_M)
    for t in range(0, n_masked):
        acc = _dv_tile(acc, Q, BIAS, CNT, LSE, DO, kt, kp, offs_n, offs_z, offs_e, b,
                       masked_tile_start(t, start, int_lo, int_hi, BLOCK_M), s_qb, s_qm, s_qz, s_db, s_dm, s_de,
                       s_cb, Lq, Lk, Z, E, S, W, scale, causal, has_mask, ACT, DOT_PRECISION, True, BLOCK_M,
                       LAPLACE_MU, LAPLACE_C)
    for p0 in range(int_lo, int_hi, BLOCK_M):
        acc = _dv_tile(acc, Q, BIAS, CNT, LSE, DO, kt, kp, offs_n, offs_z, offs_e, b, p0, s_qb, s_qm, s_qz,
                       s_db, s_dm, s_de, s_cb, Lq, Lk, Z, E, S, W, scale, causal, has_mask, ACT, DOT_PRECISION,
                       False, BLOCK_M, LAPLACE_MU, LAPLACE_C)
    tl.store(DV + b * s_vb + offs_n[:, None] * s_vn + offs_e[None, :] * s_ve, acc.to(DV.dtype.element_ty),
             mask=n_ok[:, None] & (offs_e[None, :] < E))


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _dk_kernel(Q, K, V, BIAS, KPM, CNT, LSE, DELTA, DO, DK, GB, DS,
               s_qb, s_qm, s_qz, s_kb, s_kn, s_kz, s_vb, s_vn, s_ve, s_db, s_dm, s_de, s_gb, s_gn, s_gz,
               s_mb, s_cb,
               Lq, Lk, Z, E, S, W, scale, causal, has_mask, BAND_LO, BAND_HI, n_slots,
               ACT: tl.constexpr, STORE_DS: tl.constexpr, BANDED: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_E: tl.constexpr,
               LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr, LAPLACE_D: tl.constexpr):
    """dk for key tile pid_n and the bias-gradient segments GB[b, pid_n, m - (BAND_LO - 1), :] of its query tiles
    (BLOCK_M == BLOCK_N). BANDED: one of several launches: only the query tiles at tile offsets BAND_LO <= m <=
    BAND_HI, and dk is added to DK (float32); otherwise every query tile (the band holds all offsets), and dk
    written. With STORE_DS also the tiles c_i dS_ij in DS[b, pid_n, query tile - first query tile, i, j] for
    `_dq_ds_kernel`."""
    T: tl.constexpr = BLOCK_N
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_tiles = tl.num_programs(0)
    offs_n = pid_n * T + tl.arange(0, T)
    offs_z = tl.arange(0, BLOCK_Z)
    n_ok = offs_n < Lk
    kt = tl.load(K + b * s_kb + offs_n[None, :] * s_kn + offs_z[:, None] * s_kz,
                 mask=n_ok[None, :] & (offs_z[:, None] < Z), other=0.0)
    kp = load_key_pad(KPM + b * s_mb, offs_n, Lk, has_mask)
    start, hi = _query_range(pid_n, Lq, Lk, S, T, causal)
    p_lo, p_hi = start, hi
    if BANDED:  # the query tiles at offsets m = pid_n - p0 / T of the band. (sm_90: the single launch keeps its
        # loop as it was; p_hi as p_lo + a length keeps this loop within 1% of it, where min(hi, ...) cost 7%)
        p_lo = tl.maximum(start, (pid_n - BAND_HI) * T)
        p_hi = p_lo + tl.maximum(tl.minimum(hi, (pid_n - BAND_LO + 1) * T) - p_lo, 0)
    NSEG = BAND_HI - BAND_LO + 2                      # segments BAND_LO - 1 .. BAND_HI
    M_LO = BAND_LO - 1
    gb_base = GB + (b * n_tiles + pid_n) * NSEG * T + tl.arange(0, T)
    carry = tl.zeros((T,), dtype=tl.float32)
    m = pid_n - p_lo // T
    dk = tl.zeros((T, BLOCK_Z), dtype=tl.float32)
    for p0 in range(p_lo, p_hi, T):
        pos = p0 + tl.arange(0, T)
        offs_m = pos - (Lk - Lq)
        row_ok = (offs_m >= 0) & (pos < Lk)
        cs, ce, cnt = row_info(pos, row_ok, Lk, S, CNT + b * s_cb, has_mask)
        q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qm + offs_z[None, :] * s_qz,
                    mask=row_ok[:, None] & (offs_z[None, :] < Z), other=0.0)
        m_row, ll, delta = _row_stats(LSE, DELTA, b, Lq, offs_m, row_ok, pos, ACT)
        inner = pair_interior(p0, p0 + T - 1, pid_n * T, pid_n * T + T - 1, Lq, Lk, S, causal, has_mask)
        p, s, vis, c = _probs(q, kt, pos, row_ok, cs, ce, cnt, offs_n, kp, BIAS, W, m_row, ll, scale,
                              causal, inner, ACT, DOT_PRECISION, LAPLACE_MU, LAPLACE_C)
        dp = _dp_tile(DO, V, b, offs_m, row_ok, offs_n, n_ok, s_db, s_dm, s_de, s_vb, s_vn, s_ve, E,
                      T, T, BLOCK_E, DOT_PRECISION)
        ds = _dscores(p, s, vis, dp, delta, ACT, LAPLACE_MU, LAPLACE_C, LAPLACE_D)
        dsc = (ds * c[:, None]).to(q.dtype)
        dk = tl.dot(tl.trans(dsc), q, dk, input_precision=DOT_PRECISION)
        if STORE_DS:
            slot = (b * n_tiles + pid_n) * n_slots + (p0 - start) // T
            ij = tl.arange(0, T)[:, None] * T + tl.arange(0, T)[None, :]
            tl.store(DS + slot * T * T + ij, dsc)
        ii = tl.arange(0, T)[:, None]
        cc = tl.arange(0, T)[None, :]
        r = tl.gather(ds, (ii + cc) % T, 1)               # row i rotated left by i
        upper = ii + cc < T                               # r on diagonal m T + c (else (m - 1) T + c)
        seg = carry + tl.sum(tl.where(upper, r, 0.0), 0)
        carry = tl.sum(tl.where(upper, 0.0, r), 0)
        idx = m - M_LO
        tl.store(gb_base + idx * T, seg, mask=(idx >= 0) & (idx < NSEG) & (tl.arange(0, T) >= 0))
        m -= 1
    idx = m - M_LO
    tl.store(gb_base + idx * T, carry, mask=(idx >= 0) & (idx < NSEG) & (tl.arange(0, T) >= 0))
    dk_ptr = DK + b * s_gb + offs_n[:, None] * s_gn + offs_z[None, :] * s_gz
    dk_ok = n_ok[:, None] & (offs_z[None, :] < Z)
    if BANDED:  # the earlier bands' part, read once the loop's registers are free
        dk += tl.load(dk_ptr, mask=dk_ok, other=0.0).to(tl.float32)
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=dk_ok)


@triton.jit
def _dq_tile(dq, q, K, V, BIAS, KPM, DO, b, start, hi, pos, offs_m, row_ok, cs, ce, cnt, offs_z, m_row, ll, delta,
             s_kb, s_kn, s_kz, s_vb, s_vn, s_ve, s_db, s_dm, s_de, s_mb, Lk, Z, E, W, scale, causal, has_mask,
             ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr,
             LAPLACE_D: tl.constexpr):
    """dq += dS k over the key tile [start, start + BLOCK_N); not MASKED: an interior tile (`interior_range`)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hi
    k = tl.load(K + b * s_kb + offs_n[:, None] * s_kn + offs_z[None, :] * s_kz,
                mask=n_ok[:, None] & (offs_z[None, :] < Z), other=0.0)
    kp = load_key_pad(KPM + b * s_mb, offs_n, Lk, has_mask)
    p, s, vis, c = _probs(q, tl.trans(k), pos, row_ok, cs, ce, cnt, offs_n, kp, BIAS, W, m_row, ll, scale,
                          causal, not MASKED, ACT, DOT_PRECISION, LAPLACE_MU, LAPLACE_C)
    dp = _dp_tile(DO, V, b, offs_m, row_ok, offs_n, n_ok, s_db, s_dm, s_de, s_vb, s_vn, s_ve, E,
                  BLOCK_M, BLOCK_N, BLOCK_E, DOT_PRECISION)
    ds = _dscores(p, s, vis, dp, delta, ACT, LAPLACE_MU, LAPLACE_C, LAPLACE_D)
    # c dS rounded to k's dtype, as `_dk_kernel` stores it (dS alone can pass float16's range where c dS does not)
    return tl.dot((ds * c[:, None]).to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _dq_kernel(Q, K, V, BIAS, KPM, CNT, LSE, DELTA, DO, DQ,
               s_qb, s_qm, s_qz, s_kb, s_kn, s_kz, s_vb, s_vn, s_ve, s_db, s_dm, s_de, s_gb, s_gm, s_gz,
               s_mb, s_cb,
               Lq, Lk, Z, E, S, W, scale, causal, has_mask,
               ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_E: tl.constexpr,
               LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr, LAPLACE_D: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)      # last (busiest causal) query tiles first
    b = tl.program_id(1).to(tl.int64)
    offs_m, row_ok, pos, cs, ce, cnt, q, lo, hi, int_lo, int_hi, n_masked = query_tile(
        Q, CNT, b, pid_m, s_qb, s_qm, s_qz, s_cb, Lq, Lk, Z, S, causal, has_mask, BLOCK_M, BLOCK_N, BLOCK_Z)
    offs_z = tl.arange(0, BLOCK_Z)
    m_row, ll, delta = _row_stats(LSE, DELTA, b, Lq, offs_m, row_ok, pos, ACT)
    dq = tl.zeros((BLOCK_M, BLOCK_Z), dtype=tl.float32)
    for t in range(0, n_masked):
        dq = _dq_tile(dq, q, K, V, BIAS, KPM, DO, b, masked_tile_start(t, lo, int_lo, int_hi, BLOCK_N), hi, pos,
                      offs_m, row_ok, cs, ce, cnt, offs_z, m_row, ll, delta, s_kb, s_kn, s_kz, s_vb, s_vn, s_ve, s_db,
                      s_dm, s_de, s_mb, Lk, Z, E, W, scale, causal, has_mask, ACT, DOT_PRECISION, True, BLOCK_M,
                      BLOCK_N, BLOCK_E, LAPLACE_MU, LAPLACE_C, LAPLACE_D)
    for start in range(int_lo, int_hi, BLOCK_N):
        dq = _dq_tile(dq, q, K, V, BIAS, KPM, DO, b, start, hi, pos, offs_m, row_ok, cs, ce, cnt, offs_z, m_row,
                      ll, delta, s_kb, s_kn, s_kz, s_vb, s_vn, s_ve, s_db, s_dm, s_de, s_mb, Lk, Z, E, W, scale,
                      causal, has_mask, ACT, DOT_PRECISION, False, BLOCK_M, BLOCK_N, BLOCK_E, LAPLACE_MU,
                      LAPLACE_C, LAPLACE_D)
    tl.store(DQ + b * s_gb + offs_m[:, None] * s_gm + offs_z[None, :] * s_gz, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_z[None, :] < Z))


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _dq_ds_kernel(K, DS, DQ, s_kb, s_kn, s_kz, s_gb, s_gm, s_gz, Lq, Lk, Z, S, causal, n_slots,
                  T: tl.constexpr, BLOCK_Z: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq for the query tile at absolute positions [pid T, pid T + T) from the stored c_i dS_ij tiles of every
    key tile whose query range (`_query_range`, as in `_dk_kernel`) holds it: dq_i = sum_j (c_i dS_ij) k_j."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0) + (Lk - Lq) // T
    b = tl.program_id(1).to(tl.int64)
    n_tiles = tl.cdiv(Lk, T)
    pos = pid * T + tl.arange(0, T)
    offs_m = pos - (Lk - Lq)
    row_ok = (offs_m >= 0) & (pos < Lk)
    offs_z = tl.arange(0, BLOCK_Z)
    first = tl.maximum(pid * T, Lk - Lq)
    kt_lo = (first // S) * S // T
    last = tl.minimum(pid * T + T, Lk) - 1
    kt_hi = (tl.minimum((last // S) * S + S, Lk) - 1) // T     # the block end of the tile's last row
    ij = tl.arange(0, T)[:, None] * T + tl.arange(0, T)[None, :]
    dq = tl.zeros((T, BLOCK_Z), dtype=tl.float32)
    for kt in range(kt_lo, kt_hi + 1):
        start, hi = _query_range(kt, Lq, Lk, S, T, causal)
        seen = (pid * T >= start) & (pid * T < hi)
        slot = (b * n_tiles + kt) * n_slots + (pid * T - start) // T
        ds = tl.load(DS + slot * T * T + ij, mask=(ij >= 0) & seen, other=0.0)
        offs_n = kt * T + tl.arange(0, T)
        k = tl.load(K + b * s_kb + offs_n[:, None] * s_kn + offs_z[None, :] * s_kz,
                    mask=(offs_n[:, None] < Lk) & (offs_z[None, :] < Z) & seen, other=0.0)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)
    tl.store(DQ + b * s_gb + offs_m[:, None] * s_gm + offs_z[None, :] * s_gz, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_z[None, :] < Z))


@triton.jit
def _delta_kernel(DO, O, DELTA, s_db, s_dm, s_de, s_ob, s_om, s_oe, Lq, E,
                  BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """delta_i = dO_i . out_i in float32, read once in the input dtype (no float32 copies of two E-wide
    tensors, which cost more than the attention kernels at small Z)."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        ok = (rows[:, None] < Lq) & (offs_e[None, :] < E)
        do = tl.load(DO + b * s_db + rows[:, None] * s_dm + offs_e[None, :] * s_de, mask=ok, other=0.0)
        o = tl.load(O + b * s_ob + rows[:, None] * s_om + offs_e[None, :] * s_oe, mask=ok, other=0.0)
        acc += tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + b * Lq + rows, acc, mask=rows < Lq)


# The dK kernel stores the (c dS) tiles for `_dq_ds_kernel` when they take at most this much memory (chunked
# attention: linear in L); otherwise (long unchunked blocks) `_dq_kernel` recomputes dS, costing a second
# E-wide dP = dO v^T per tile pair but keeping memory linear in L.
DS_SCRATCH_LIMIT_BYTES = 256 * 2**20
# One dK launch's bias-gradient scratch stays under this or the size of a float32 dk (see the top of this file).
BIAS_SCRATCH_BYTES = 16 * 2**20


def _bias_bands(pb, t, n_tiles, single, budget=None):
    """The bands (lo, hi) of tile offsets m = key tile - query tile that the dK launches cover, in order. A pair
    of tiles in one block has |m| <= ceil((S - 1) / T), and m <= 0 when causal; each launch's scratch is
    B n_tiles (hi - lo + 2) T floats, at most `budget` bytes (by default the larger of BIAS_SCRATCH_BYTES and a
    float32 dk, B Lk Z: linear in L, and about 2 Lk / (T Z) launches for one long block). single: one launch
    (the stored dS tiles are indexed by query tile)."""
    if budget is None:
        budget = max(BIAS_SCRATCH_BYTES, 4 * pb.bsz * pb.lk * pb.zdim)
    reach = -(-(pb.size - 1) // t)
    top = 0 if pb.causal else reach
    per_offset = pb.bsz * n_tiles * t * 4
    width = reach + top + 1 if single else max(1, min(reach + top + 1, budget // per_offset - 1))
    return [(lo, min(lo + width - 1, top)) for lo in range(-reach, top + 1, width)]


def _query_slots(pb, t):
    """Most query tiles any key tile visits in `_dk_kernel` (mirrors `_query_range`)."""
    most = 1
    for kt in range(triton.cdiv(pb.lk, t)):
        k_first, k_last = kt * t, min(kt * t + t, pb.lk) - 1
        lo = max(k_first // pb.size * pb.size, pb.lk - pb.lq)
        if pb.causal:
            lo = max(lo, k_first)
        hi = min(k_last // pb.size * pb.size + pb.size, pb.lk)
        most = max(most, -(-(hi - lo // t * t) // t))
    return most


def attention_bwd(grad_out, q, k, v, rel_bias, out, stats, activation: str, chunk_size: int, causal: bool,
                  key_padding_mask=None):
    """Backward launcher: gradients (dq, dk, dv, d rel_bias) shaped like (q, k, v, rel_bias), from
    grad_out (B, Lq, E), the forward's out and stats (see attention_fwd.attention_fwd)."""
    pb = describe(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if tuple(t.shape) != (pb.bsz, pb.lq, pb.edim) or t.device != q.device:
            raise ValueError(f"triton attention backward: {name} must be (B, Lq, E) = {(pb.bsz, pb.lq, pb.edim)} "
                             f"on {q.device}, got {tuple(t.shape)} on {t.device}")
    if pb.act == 0 and tuple(stats.shape) != (pb.bsz, 2, pb.lq):
        raise ValueError(f"triton attention backward: softmax stats must be (B, 2, Lq) = {(pb.bsz, 2, pb.lq)}, "
                         f"got {tuple(stats.shape)} (pass the forward's second output)")
    kpm, counts, has_mask = mask_args(key_padding_mask, pb, q.device)
    bias = kernel_bias(rel_bias, pb)
    if pb.act == 0 and pb.lq == 1:  # a decoding step: statistics from the tiled score arithmetic (row_stats)
        stats = row_stats(q, k, bias, pb, kpm, counts, has_mask)
    do = grad_out.to(v.dtype)
    stats = stats.float().contiguous()
    delta = stats
    if pb.act == 0:
        delta = torch.empty(pb.bsz, pb.lq, dtype=torch.float32, device=q.device)
        block_e = min(128, max(16, triton.next_power_of_2(pb.edim)))
        _delta_kernel[(triton.cdiv(pb.lq, 32), pb.bsz)](do, out, delta, *do.stride(), *out.stride(), pb.lq,
                                                        pb.edim, BLOCK_R=32, BLOCK_E=block_e, num_warps=4)
    dq = torch.empty(pb.bsz, pb.lq, pb.zdim, dtype=q.dtype, device=q.device)
    dk = torch.empty(pb.bsz, pb.lk, pb.zdim, dtype=k.dtype, device=q.device)
    dv = torch.empty(pb.bsz, pb.lk, pb.edim, dtype=v.dtype, device=q.device)
    common = dict(ACT=pb.act, DOT_PRECISION=pb.dot_precision,
                  BLOCK_Z=pb.block_z, **constants())
    sizes = (pb.lq, pb.lk, pb.zdim, pb.edim, pb.size, pb.width, pb.zdim ** -0.5, pb.causal, has_mask)
    mstr = (kpm.stride(0), counts.stride(0))

    if pb.edim >= 1024 and may_autotune(q.dtype):   # the score recompute dominates
        kernel, cfg = autotuned(_dv_kernel, ("dv", "dv_e512"), pb, q.dtype), {}
        grid = lambda meta: (triton.cdiv(pb.lk, meta["BLOCK_N"]), triton.cdiv(pb.edim, meta["BLOCK_E"]),  # noqa
                             pb.bsz)
    else:
        kernel, cfg = _dv_kernel, config("dv", pb, q.dtype)
        grid = (triton.cdiv(pb.lk, cfg["BLOCK_N"]), triton.cdiv(pb.edim, cfg["BLOCK_E"]), pb.bsz)
    kernel[grid](q, k, bias, kpm, counts, stats, do, dv, *q.stride(), *k.stride(), *do.stride(),
                 *dv.stride(), *mstr, *sizes, **common, **cfg)

    cfg = config("dk", pb, q.dtype)
    t = cfg["BLOCK_N"]
    assert cfg["BLOCK_M"] == t, "the bias-gradient rotation needs square tiles"
    n_tiles = triton.cdiv(pb.lk, t)
    n_slots = _query_slots(pb, t)
    store_ds = pb.bsz * n_tiles * n_slots * t * t * q.element_size() <= DS_SCRATCH_LIMIT_BYTES
    ds = torch.empty(pb.bsz * n_tiles * n_slots * t * t if store_ds else 1, dtype=q.dtype, device=q.device)
    bands = _bias_bands(pb, t, n_tiles, single=store_ds)
    reach = -bands[0][0]                                    # tile offsets -reach .. reach
    # segment m (m = -reach - 1 .. reach) holds diagonals d = m T + c, c < T: flat index d + (reach + 1) T
    flat = torch.zeros((2 * reach + 2) * t, dtype=torch.float32, device=q.device)
    dk_acc = dk if len(bands) == 1 else dk.zero_() if dk.dtype == torch.float32 else torch.zeros(
        dk.shape, dtype=torch.float32, device=q.device)
    buf = torch.empty(pb.bsz * n_tiles * (bands[0][1] - bands[0][0] + 2) * t, dtype=torch.float32, device=q.device)
    for lo, hi in bands:                                    # in order: the sums are deterministic
        seg = buf[:pb.bsz * n_tiles * (hi - lo + 2) * t].view(pb.bsz, n_tiles, hi - lo + 2, t).zero_()
        _dk_kernel[(n_tiles, pb.bsz)](q, k, v, bias, kpm, counts, stats, delta, do, dk_acc, seg, ds,
                                      *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk_acc.stride(),
                                      *mstr, *sizes, lo, hi, n_slots, STORE_DS=store_ds, BANDED=len(bands) > 1,
                                      **common, **cfg)
        flat[(lo + reach) * t: (hi + reach + 2) * t] += seg.sum((0, 1)).reshape(-1)
    if dk_acc is not dk:
        dk.copy_(dk_acc)
    span = pb.size - 1                                      # pairs of a block have |j - i| <= S - 1
    dbias = flat[(reach + 1) * t - span: (reach + 1) * t + span + 1]
    extra = pb.width - 1 - span                             # rel_bias entries no block reaches get 0
    dbias = torch.nn.functional.pad(dbias, (extra, extra)).to(rel_bias.dtype)

    if store_ds:
        first_tile = (pb.lk - pb.lq) // t
        _dq_ds_kernel[(triton.cdiv(pb.lk, t) - first_tile, pb.bsz)](
            k, ds, dq, *k.stride(), *dq.stride(), pb.lq, pb.lk, pb.zdim, pb.size, pb.causal, n_slots, T=t,
            BLOCK_Z=pb.block_z, DOT_PRECISION=pb.dot_precision, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
        return dq, dk, dv, dbias
    cfg = config("dq", pb, q.dtype)
    _dq_kernel[(triton.cdiv(pb.lq, cfg["BLOCK_M"]), pb.bsz)](
        q, k, v, bias, kpm, counts, stats, delta, do, dq, *q.stride(), *k.stride(), *v.stride(),
        *do.stride(), *dq.stride(), *mstr, *sizes, **common, **cfg)
    return dq, dk, dv, dbias
