"""Triton forward of chunked single-head attention with a Toeplitz bias (flash style, no score matrix in memory).

Maths (notation of attention_common.py). For a query row i and the keys j of its block:

    softmax:  s_ij = (q_i . k_j) Z^-0.5 + bias_ij on visible pairs (-inf elsewhere)
              out_i = sum_j exp(s_ij - lse_i) v_j,   lse_i = log sum_j exp(s_ij)
    element:  s_ij = (q_i . k_j) / n_i + bias_ij,    out_i = sum_j act(s_ij) [visible] v_j

The softmax is computed online over key tiles (FlashAttention): a running max m_i and sum l_i, the
accumulator rescaled by exp(m_old - m_new) when the max grows, all in the log2 domain (exp2). laplace / relu2
need no normalisation: each tile's act(s) multiplies v directly. Rows with no visible key keep l_i = 0 and give
zeros (stats log2 l = +inf there, so the backward's p is 0).

E is tiled in the grid (program = query tile x E tile x batch): every E tile recomputes the same scores, which
costs Z / BLOCK_E extra matmul work but keeps the accumulator (BLOCK_M, BLOCK_E) in registers for any E.
The E-tile-0 program writes the per-row statistics the backward needs, stats (B, 2, Lq): the row max m of the
log2-domain scores and log2 of the row sum l. The backward recomputes the scores with the forward's own
arithmetic, s2 = (q.k) Z^-0.5 log2(e) + bias log2(e), and takes p = 2^((s2 - m) - log2 l): s2 - m is exact at
the max (where both passes' dots sum alike: always under the interpreter and for float32's FMA dots; 16-bit
tiles of other heights may use other MMA instructions). A decoding step's forward sums q.k as a vector, so its
backward recomputes the statistics with the pre-pass kernel (`row_stats`). (One lse = (m + log2 l) / log2(e)
rounds to ulp(|s|), in the conversions and in the sum: at |s| ~ 1e3 that is 1e-4 relative in p, 100x the
reference's own float32 error in near one-hot rows.)

For wide E (softmax, E >= PRE_LSE_MIN_E) a pre-pass `_lse_kernel` computes these statistics from the scores
alone first; the E tiles then take p = 2^(s2 - m) directly (PRE_LSE) and divide by l once at the end, with no
running max, sum or accumulator rescale, which every E tile would otherwise repeat.
rel_bias entries beyond +-BIAS_LIMIT (1e38, +-inf included) are clamped there for softmax (`kernel_bias`), so
that bias log2(e) stays finite.

Key range of a query tile: from the block start of its first row to the block end of its last row (to its
last row + 1 when causal), so key tiles above the diagonal and outside the tile's blocks are never visited;
a tile spanning several blocks (small chunks) masks pairs across blocks.

Decoding (Lq = 1): `_decode_kernel` splits the query's block into key ranges processed by separate programs
(split-K, vector maths instead of a 1-row matmul), then the partial (max, sum, acc) are combined in torch in a
fixed order: out = sum_s acc_s 2^(m_s - m) / sum_s l_s 2^(m_s - m), m = max_s m_s (plain sum for element).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import (NO_SPECIALIZE, Problem, autotuned, config, constants, describe, element_act,
                               inv_count, kernel_bias, load_bias, load_key_pad, load_row_stats, mask_args,
                               masked_tile_start, may_autotune, query_tile, row_info, visible)


@triton.jit
def _score_tile(q, K, BIAS, KPM, b, start, hi, pos, row_ok, cs, ce, cnt, offs_z, inv_n, qscale, s_kb, s_kn, s_kz,
                s_mb, Lk, Z, W, causal, has_mask, ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                MASKED: tl.constexpr, BLOCK_N: tl.constexpr, LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr):
    """Scores of the key tile [start, start + BLOCK_N): softmax: s log2(e) (-inf off the visible pairs);
    laplace / relu2: act(s) (0 off them). MASKED: apply the block / causal / padding / bounds masks; otherwise
    the tile is interior (interior_range) and every pair is visible."""
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        kt = tl.load(K + b * s_kb + offs_n[None, :] * s_kn + offs_z[:, None] * s_kz,
                     mask=(offs_n[None, :] < hi) & (offs_z[:, None] < Z), other=0.0)
    else:
        kt = tl.load(K + b * s_kb + offs_n[None, :] * s_kn + offs_z[:, None] * s_kz,
                     mask=offs_z[:, None] < Z, other=0.0)
    qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if MASKED:
        kp = load_key_pad(KPM + b * s_mb, offs_n, Lk, has_mask)
        vis = visible(pos, row_ok, cs, ce, cnt, offs_n, kp, causal, ACT)
        bias = load_bias(BIAS, pos, offs_n, W, vis)
    else:
        bias = tl.load(BIAS + (W - 1 + offs_n[None, :] - pos[:, None])).to(tl.float32)
    if ACT == 0:
        sc = qk * qscale + bias * 1.4426950408889634
        if MASKED:
            sc = tl.where(vis, sc, float("-inf"))
    else:
        sc = element_act(qk * inv_n[:, None] + bias, ACT, LAPLACE_MU, LAPLACE_C)
        if MASKED:
            sc = tl.where(vis, sc, 0.0)
    return sc


@triton.jit
def _online_update(sc, m_i, l_i):
    """Online softmax step on log2-domain scores: (p, alpha, new max, new sum); p = 2^(sc - max)."""
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(sc - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _fwd_tile(q, K, V, BIAS, KPM, b, start, hi, pos, row_ok, cs, ce, cnt, offs_z, offs_e, acc, m_i, l_i, inv_n,
              qscale, s_kb, s_kn, s_kz, s_vb, s_vn, s_ve, s_mb, Lk, Z, E, W, causal, has_mask,
              ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr, PRE_LSE: tl.constexpr,
              BLOCK_N: tl.constexpr, LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr):
    """One key tile of the forward: acc += p v. Softmax with PRE_LSE: m_i holds the row's final max (0 for a row
    with no visible key) and p = 2^(sc - max) needs no rescaling; otherwise the online update."""
    sc = _score_tile(q, K, BIAS, KPM, b, start, hi, pos, row_ok, cs, ce, cnt, offs_z, inv_n, qscale, s_kb, s_kn,
                     s_kz, s_mb, Lk, Z, W, causal, has_mask, ACT, DOT_PRECISION, MASKED, BLOCK_N, LAPLACE_MU,
                     LAPLACE_C)
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        v = tl.load(V + b * s_vb + offs_n[:, None] * s_vn + offs_e[None, :] * s_ve,
                    mask=(offs_n[:, None] < hi) & (offs_e[None, :] < E), other=0.0)
    else:
        v = tl.load(V + b * s_vb + offs_n[:, None] * s_vn + offs_e[None, :] * s_ve,
                    mask=offs_e[None, :] < E, other=0.0)
    if ACT != 0:
        p = sc
    elif PRE_LSE:
        p = tl.exp2(sc - m_i[:, None])
    else:
        p, alpha, m_i, l_i = _online_update(sc, m_i, l_i)
        acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _store_row_stats(LSE, b, Lq, offs_m, row_ok, m_i, l_i):
    """stats[b, :, rows] = (row max m, log2 of the row sum l); (0, +inf) for a row with no visible key (l = 0)."""
    has = l_i > 0
    tl.store(LSE + b * 2 * Lq + offs_m, tl.where(has, m_i, 0.0), mask=row_ok)
    tl.store(LSE + b * 2 * Lq + Lq + offs_m, tl.where(has, tl.log2(tl.where(has, l_i, 1.0)), float("inf")),
             mask=row_ok)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _lse_kernel(Q, K, BIAS, KPM, CNT, LSE,
                s_qb, s_qm, s_qz, s_kb, s_kn, s_kz, s_mb, s_cb,
                Lq, Lk, Z, S, W, scale, causal, has_mask,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_Z: tl.constexpr, LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr,
                LAPLACE_D: tl.constexpr):
    """The softmax pre-pass for wide E: each row's statistics (`_store_row_stats`) from the scores alone, so that
    the E tiles of `_fwd_kernel` (PRE_LSE) skip the online max, sum and rescale."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m, row_ok, pos, cs, ce, cnt, q, lo, hi, int_lo, int_hi, n_masked = query_tile(
        Q, CNT, b, pid_m, s_qb, s_qm, s_qz, s_cb, Lq, Lk, Z, S, causal, has_mask, BLOCK_M, BLOCK_N, BLOCK_Z)
    offs_z = tl.arange(0, BLOCK_Z)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    qscale = scale * 1.4426950408889634
    for t in range(0, n_masked):
        sc = _score_tile(q, K, BIAS, KPM, b, masked_tile_start(t, lo, int_lo, int_hi, BLOCK_N), hi, pos, row_ok,
                         cs, ce, cnt, offs_z, qscale, qscale, s_kb, s_kn, s_kz, s_mb, Lk, Z, W, causal, has_mask,
                         0, DOT_PRECISION, True, BLOCK_N, LAPLACE_MU, LAPLACE_C)
        _, _, m_i, l_i = _online_update(sc, m_i, l_i)
    for start in range(int_lo, int_hi, BLOCK_N):
        sc = _score_tile(q, K, BIAS, KPM, b, start, hi, pos, row_ok, cs, ce, cnt, offs_z, qscale, qscale, s_kb,
                         s_kn, s_kz, s_mb, Lk, Z, W, causal, has_mask, 0, DOT_PRECISION, False, BLOCK_N,
                         LAPLACE_MU, LAPLACE_C)
        _, _, m_i, l_i = _online_update(sc, m_i, l_i)
    _store_row_stats(LSE, b, Lq, offs_m, row_ok, m_i, l_i)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _fwd_kernel(Q, K, V, BIAS, KPM, CNT, O, LSE,
                s_qb, s_qm, s_qz, s_kb, s_kn, s_kz, s_vb, s_vn, s_ve, s_ob, s_om, s_oe, s_mb, s_cb,
                Lq, Lk, Z, E, S, W, scale, causal, has_mask,
                ACT: tl.constexpr, DOT_PRECISION: tl.constexpr, PRE_LSE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_E: tl.constexpr,
                LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr, LAPLACE_D: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)      # last (busiest causal) query tiles first
    pid_e = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m, row_ok, pos, cs, ce, cnt, q, lo, hi, int_lo, int_hi, n_masked = query_tile(
        Q, CNT, b, pid_m, s_qb, s_qm, s_qz, s_cb, Lq, Lk, Z, S, causal, has_mask, BLOCK_M, BLOCK_N, BLOCK_Z)
    offs_z = tl.arange(0, BLOCK_Z)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)

    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    if PRE_LSE:    # the pre-pass's final max and sum (l = inf for rows with no visible key, where every p is 0)
        m_i, ll = load_row_stats(LSE, b, Lq, offs_m, row_ok, pos, 0)
        l_i = tl.exp2(ll)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    qscale = scale * 1.4426950408889634
    inv_n = inv_count(pos, cs, cnt, causal)
    for t in range(0, n_masked):
        acc, m_i, l_i = _fwd_tile(q, K, V, BIAS, KPM, b, masked_tile_start(t, lo, int_lo, int_hi, BLOCK_N), hi,
                                  pos, row_ok, cs, ce, cnt, offs_z, offs_e, acc, m_i, l_i, inv_n, qscale,
                                  s_kb, s_kn, s_kz, s_vb, s_vn, s_ve, s_mb, Lk, Z, E, W, causal, has_mask,
                                  ACT, DOT_PRECISION, True, PRE_LSE, BLOCK_N, LAPLACE_MU, LAPLACE_C)
    for start in range(int_lo, int_hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(q, K, V, BIAS, KPM, b, start, hi, pos, row_ok, cs, ce, cnt, offs_z, offs_e,
                                  acc, m_i, l_i, inv_n, qscale, s_kb, s_kn, s_kz, s_vb, s_vn, s_ve, s_mb, Lk, Z,
                                  E, W, causal, has_mask, ACT, DOT_PRECISION, False, PRE_LSE, BLOCK_N,
                                  LAPLACE_MU, LAPLACE_C)

    if ACT == 0:
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if pid_e == 0 and not PRE_LSE:
            _store_row_stats(LSE, b, Lq, offs_m, row_ok, m_i, l_i)
    tl.store(O + b * s_ob + offs_m[:, None] * s_om + offs_e[None, :] * s_oe, acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_e[None, :] < E))


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _decode_kernel(Q, K, V, BIAS, KPM, CNT, ACC, M, L,
                   s_qb, s_qz, s_kb, s_kn, s_kz, s_vb, s_vn, s_ve, s_mb, s_cb,
                   Lk, Z, E, S, W, scale, causal, has_mask, keys_per_split, n_split,
                   ACT: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_E: tl.constexpr,
                   LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr, LAPLACE_D: tl.constexpr):
    """One query (position Lk - 1) against a key range [lo, hi) of its block, one E tile: partial results."""
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    pid_e = tl.program_id(2)
    offs_z = tl.arange(0, BLOCK_Z)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    pos1 = tl.full((1,), Lk - 1, tl.int32)
    ok1 = pos1 >= 0
    cs, ce, cnt = row_info(pos1, ok1, Lk, S, CNT + b * s_cb, has_mask)
    q = tl.load(Q + b * s_qb + offs_z * s_qz, mask=offs_z < Z, other=0.0).to(tl.float32)
    lo = (Lk - 1) // S * S + split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Lk)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    m_i = tl.full((1,), float("-inf"), tl.float32)
    l_i = tl.zeros((1,), dtype=tl.float32)
    if ACT != 0:
        inv_n = inv_count(pos1, cs, cnt, causal)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = tl.load(K + b * s_kb + offs_n[:, None] * s_kn + offs_z[None, :] * s_kz,
                    mask=n_ok[:, None] & (offs_z[None, :] < Z), other=0.0).to(tl.float32)
        qk = tl.sum(k * q[None, :], 1)[None, :]                       # (1, BLOCK_N)
        kp = load_key_pad(KPM + b * s_mb, offs_n, Lk, has_mask)
        vis = visible(pos1, ok1, cs, ce, cnt, offs_n, kp, causal, ACT) & n_ok[None, :]
        bias = load_bias(BIAS, pos1, offs_n, W, vis)
        v = tl.load(V + b * s_vb + offs_n[:, None] * s_vn + offs_e[None, :] * s_ve,
                    mask=n_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        if ACT == 0:
            s2 = tl.where(vis, qk * (scale * 1.4426950408889634) + bias * 1.4426950408889634, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s2, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s2 - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha
            m_i = m_new
        else:
            p = tl.where(vis, element_act(qk * inv_n[:, None] + bias, ACT, LAPLACE_MU, LAPLACE_C), 0.0)
        pv = p.to(v.dtype).to(tl.float32)                             # (1, BLOCK_N), rounded like the matmul
        acc += tl.sum(tl.trans(pv) * v.to(tl.float32), 0)
    row = b * n_split + split
    tl.store(ACC + row * E + offs_e, acc, mask=offs_e < E)
    if pid_e == 0:
        tl.store(M + row + tl.arange(0, 1), m_i)
        tl.store(L + row + tl.arange(0, 1), l_i)


# For E >= 256 in 16-bit on a GPU the forward picks by timing, once per (Z, E, causal), between "fwd"
# (BM 128, BE 128), "fwd_e256" (BM 128, BE 256) and, for E >= 1024, "fwd_e512" (BM 64, BE 512): a wider E
# tile recomputes the scores less often (Z / BE), a taller one reuses each K / V tile for more rows.
def _fwd_kinds(pb: Problem):
    return ("fwd", "fwd_e256", "fwd_e512") if pb.edim >= 1024 else ("fwd", "fwd_e256")


# Softmax with E >= PRE_LSE_MIN_E runs the `_lse_kernel` pre-pass (one score pass over the keys) so that each of
# its E tiles skips the online max / sum / accumulator rescale: at the LM shape (E 2048) the rescale alone is
# BLOCK_E / (warps' share) multiplies per thread and key tile in every E tile, the pre-pass one score pass.
PRE_LSE_MIN_E = 1024


def row_stats(q, k, rel_bias, pb: Problem, kpm, counts, has_mask, out=None):
    """The softmax statistics (B, 2, Lq) from the scores alone (`_lse_kernel`): the pre-pass of wide-E forwards,
    and the backward's for a decoding step, whose forward summed q.k as a vector (the backward's tile dot would
    differ from it by an ulp of |s|, too much for p at large scores)."""
    out = torch.empty(pb.bsz, 2, pb.lq, dtype=torch.float32, device=q.device) if out is None else out
    cfg = config("lse", pb, q.dtype)
    _lse_kernel[(triton.cdiv(pb.lq, cfg["BLOCK_M"]), pb.bsz)](
        q, k, rel_bias, kpm, counts, out, *q.stride(), *k.stride(), kpm.stride(0), counts.stride(0),
        pb.lq, pb.lk, pb.zdim, pb.size, pb.width, pb.zdim ** -0.5, pb.causal, has_mask,
        DOT_PRECISION=pb.dot_precision, BLOCK_Z=pb.block_z, **cfg, **constants())
    return out


def _launch_fwd(q, k, v, rel_bias, pb: Problem, kpm, counts, has_mask):
    out = torch.empty(pb.bsz, pb.lq, pb.edim, dtype=v.dtype, device=q.device)
    lse = torch.empty(pb.bsz, 2, pb.lq, dtype=torch.float32, device=q.device) if pb.act == 0 else \
        torch.empty(0, dtype=torch.float32, device=q.device)
    pre_lse = pb.act == 0 and pb.edim >= PRE_LSE_MIN_E
    if pre_lse:
        row_stats(q, k, rel_bias, pb, kpm, counts, has_mask, out=lse)
    if pb.edim >= 256 and may_autotune(q.dtype):
        kernel, cfg = autotuned(_fwd_kernel, _fwd_kinds(pb), pb, q.dtype), {}
        grid = lambda meta: (triton.cdiv(pb.lq, meta["BLOCK_M"]), triton.cdiv(pb.edim, meta["BLOCK_E"]),  # noqa
                             pb.bsz)
    else:
        kernel, cfg = _fwd_kernel, config("fwd", pb, q.dtype)
        grid = (triton.cdiv(pb.lq, cfg["BLOCK_M"]), triton.cdiv(pb.edim, cfg["BLOCK_E"]), pb.bsz)
    kernel[grid](
        q, k, v, rel_bias, kpm, counts, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), kpm.stride(0), counts.stride(0),
        pb.lq, pb.lk, pb.zdim, pb.edim, pb.size, pb.width, pb.zdim ** -0.5, pb.causal, has_mask,
        ACT=pb.act, DOT_PRECISION=pb.dot_precision, PRE_LSE=pre_lse, BLOCK_Z=pb.block_z, **cfg, **constants())
    return out, lse


DECODE_PROGRAMS = 256  # the decoding kernel's target program count: about one wave of the device


def _launch_decode(q, k, v, rel_bias, pb: Problem, kpm, counts, has_mask):
    cfg = config("decode", pb, q.dtype)
    block_n, block_e = cfg["BLOCK_N"], cfg["BLOCK_E"]
    n_keys = pb.lk - (pb.lk - 1) // pb.size * pb.size                 # keys of the query's block
    n_e = triton.cdiv(pb.edim, block_e)
    # enough programs to fill the device, at least BLOCK_N keys per split
    n_split = max(1, min(triton.cdiv(n_keys, block_n), triton.cdiv(DECODE_PROGRAMS, pb.bsz * n_e)))
    per = triton.cdiv(triton.cdiv(n_keys, n_split), block_n) * block_n
    n_split = triton.cdiv(n_keys, per)
    acc = torch.empty(pb.bsz, n_split, pb.edim, dtype=torch.float32, device=q.device)
    m = torch.empty(pb.bsz, n_split, dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)
    _decode_kernel[(pb.bsz, n_split, n_e)](
        q, k, v, rel_bias, kpm, counts, acc, m, l_,
        q.stride(0), q.stride(2), *k.stride(), *v.stride(), kpm.stride(0), counts.stride(0),
        pb.lk, pb.zdim, pb.edim, pb.size, pb.width, pb.zdim ** -0.5, pb.causal, has_mask, per, n_split,
        ACT=pb.act, BLOCK_N=block_n, BLOCK_Z=pb.block_z, BLOCK_E=block_e,
        num_warps=cfg["num_warps"], **constants())
    if pb.act != 0:
        return acc.sum(1, keepdim=True).to(v.dtype), torch.empty(0, dtype=torch.float32, device=q.device)
    m_max = m.max(1, keepdim=True).values
    m_safe = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    w = torch.exp2(m - m_safe)                                         # (B, splits); 0 for empty splits
    total = (l_ * w).sum(1, keepdim=True)
    has = total > 0
    out = (acc * w[:, :, None]).sum(1, keepdim=True) / torch.where(has, total, torch.ones_like(total))[:, :, None]
    log_sum = torch.where(has, torch.log2(torch.where(has, total, torch.ones_like(total))),
                          torch.full_like(total, float("inf")))
    return out.to(v.dtype), torch.stack((m_safe, log_sum), 1)                # (B, 2, 1)


def attention_fwd(q, k, v, rel_bias, activation: str, chunk_size: int, causal: bool, key_padding_mask=None):
    """Forward launcher: q (B, Lq, Z), k (B, Lk, Z), v (B, Lk, E), rel_bias (2W - 1,), key_padding_mask
    (B, Lk) bool or None; chunk_size 0 = one block. Returns out (B, Lq, E) in v's dtype and stats: for softmax
    (B, 2, Lq) float32, each row's max of the log2-domain scores and log2 of its sum (0 and +inf for rows with no
    visible key); an empty tensor otherwise."""
    pb = describe(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask)
    kpm, counts, has_mask = mask_args(key_padding_mask, pb, q.device)
    rel_bias = kernel_bias(rel_bias, pb)
    if pb.lq == 1:
        return _launch_decode(q, k, v, rel_bias, pb, kpm, counts, has_mask)
    return _launch_fwd(q, k, v, rel_bias, pb, kpm, counts, has_mask)
