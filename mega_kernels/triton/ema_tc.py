"""Triton EMA forward on tensor cores: the chunked scan of ema_fwd.py, each chunk swept SUB = 16 steps at a time
as small matrix products instead of one fused multiply-add per state and step.

Maths (MEGA spec section 4; per channel, expansion index n, coefficients a, q, c as in ema_fwd.py; u = x * mask).
Within a sub-chunk of S steps entered with the pre-decayed state s = q h (h: the state after the step before):

    h_j    = q^j s + sum_{i <= j} a q^(j-i) u_i                              (j = 0 .. S-1)
    e_j    = sum_n c h_j = (V s)_j + (T u)_j     V[j, n] = c q^j,   T[j, i] = k[j - i] for j >= i (else 0),
                                                 k[l] = sum_n c a q^l, the EMA kernel's first S taps
    s'     = q h_{S-1} = q^S s + W_s u           W_s[n, i] = a q^(S-i)
    h_{S-1} from h = 0:  W_h u                   W_h[n, i] = a q^(S-1-i)

Every (batch row, chunk) column of a channel shares that channel's T, V and W, so a program takes BD channels and
NB columns and multiplies (BD, S, S) by (BD, S, NB) blocks with a batched tl.dot: S + 2N multiply-adds per
element on tensor cores and one loop iteration per S steps of NB columns, where ema_sweep._sweep issues 2N fused
multiply-adds per element and one iteration per step. The states stay float32 between sub-chunks (only their
product with V is rounded to the dot's precision).

Precision: tensor cores take TF32 (10-bit mantissa). By default ("split") the loop-invariant T, V, W are split
once into hi + lo TF32 parts and the float32 data (the states; x when it is float32) each sub-chunk, and the
dots sum hi hi + lo hi + hi lo: float32 class (~2^-21 relative). bfloat16 and float16 inputs are exact in TF32,
so their products with x need two dots, not three. precision="tf32" (one product) rounds T, V, W and s to
2^-11 relative, which only bfloat16 inputs (output rounding 2^-9) may take. omega x joins the output dot (on T's
diagonal; as its own diagonal operator when a mask makes u differ from x), so the epilogue needs no second
layout of x. The operators' powers of q come from exp2 / log2 (~2^-22 relative on a GPU).

Passes, as ema_fwd's three-pass carry (whose `_carry_kernel` runs unchanged between them):
1. `_tc_scan_kernel` with STATES: each column's chunk-local end state a H_loc from zero, into buf. The sub-chunks
   are aligned to the chunk's end, so a partial one comes first, its missing steps zero inputs into a zero state.
   Bidirectional: both directions in one walk forward in time, so x is read once (`_local_states_bi`).
2. `_carry_kernel`: buf[c] <- the state entering chunk c.
3. `_tc_scan_kernel` writing y from s = q h_in (+ the caller's pre-decayed s0 in chunk 0); a partial sub-chunk
   comes last and its missing steps are not stored. Bidirectional: the backward rows [D, 2D) first, their e
   into a float32 buffer (y itself for float32 outputs), then the forward rows.
Or, for one direction, a single launch (lookback=True): programs take tickets in column order, compute their
columns' local states as in pass 1, take the states entering their chunks from earlier programs (`_lookback`:
each column whose successor lies in a later program publishes its end state and sets a flag), then write y as
in pass 3. x comes from DRAM once and is re-read from L2, where the three passes read it twice.
The backward's two scans (ema_bwd.py) run the same passes: its recomputation of z with the EPI_DSILU epilogue
(g = dL/dz and each chunk's sum of g x) from the forward's chunk states (no pass 1 or 2), and the adjoint scan,
reversed in time (REVERSE: rows [:D] backward, rows [D:] forward), with the EPI_DX epilogue (the mask on the
output's EMA part, MASK_OUT) and its chunk-local states from the parameter sweep (no pass 1).
The final state (write_final) is the last chunk's end state, from its local state and the state entering it.
What it does not take (truncation) stays on ema_fwd's sweeps; ema_fwd.ema_scan refuses it rather than run
something else.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import ema_fwd as _fwd
from . import ema_sweep as _sw

Tensor = torch.Tensor
SUB = 16  # steps per sub-chunk: the dots' smallest size
# The most states per channel the passes take: past 32 the tiles (BLOCK_N 64) need more shared memory than one
# sm_90 program can have (232448 B): the 16-bit output pass 344064 B, the backward's parameter sweep 286720 B.
MAX_N = 32


@triton.jit
def _pow(q, k):
    """q ** k elementwise for q in [0, 1] and integer k >= 0 (broadcast tensors); q ** 0 = 1 even for q = 0."""
    kf = k.to(tl.float32)
    pos = q > 0
    return tl.where(kf == 0, 1.0, tl.where(pos, tl.exp2(kf * tl.log2(tl.where(pos, q, 1.0))), 0.0))


@triton.jit
def _operators_kernel(a_ptr, q_ptr, c_ptr, op_ptr, N, SUB: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row r of the operators, laid out [T (SUB, SUB) | W_h (BLOCK_N, SUB) | V (SUB, BLOCK_N) | q^SUB | q]
    (float32, states n >= N zero) from a, q, c (kd, N) row-major."""
    r = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    nm = n < N
    a = tl.load(a_ptr + r * N + n, mask=nm, other=0.0)
    q = tl.load(q_ptr + r * N + n, mask=nm, other=0.0)
    c = tl.load(c_ptr + r * N + n, mask=nm, other=0.0)
    j = tl.arange(0, SUB)
    base = op_ptr + r.to(tl.int64) * (SUB * SUB + 2 * BLOCK_N * SUB + 2 * BLOCK_N)
    lag = j[:, None] - j[None, :]                                     # (SUB, SUB): j - i
    taps = tl.sum((c * a)[None, None, :] * _pow(q[None, None, :], tl.maximum(lag, 0)[:, :, None]), axis=2)
    tl.store(base + j[:, None] * SUB + j[None, :], tl.where(lag >= 0, taps, 0.0))
    w_h = a[:, None] * _pow(q[:, None], SUB - 1 - j[None, :])        # (BLOCK_N, SUB)
    tl.store(base + SUB * SUB + n[:, None] * SUB + j[None, :], w_h)
    v = c[None, :] * _pow(q[None, :], j[:, None])                     # (SUB, BLOCK_N)
    tl.store(base + SUB * SUB + BLOCK_N * SUB + j[:, None] * BLOCK_N + n[None, :], v)
    tl.store(base + SUB * SUB + 2 * BLOCK_N * SUB + n, _pow(q, SUB + 0 * n))
    tl.store(base + SUB * SUB + 2 * BLOCK_N * SUB + BLOCK_N + n, q)


@triton.jit
def _operator_tiles(op_ptr, row0, offs_d, D, SUB: tl.constexpr, BLOCK_N: tl.constexpr, REV_W: tl.constexpr = False):
    """(T (BD, SUB, SUB), W_h (BD, BLOCK_N, SUB), V (BD, SUB, BLOCK_N), q^SUB (BD, BLOCK_N, 1), q (BD, BLOCK_N, 1))
    of the rows row0 + offs_d; channels past D give zeros. REV_W: W_h with its columns reversed, a q^i."""
    j = tl.arange(0, SUB)
    n = tl.arange(0, BLOCK_N)
    dm = (offs_d < D)[:, None, None]
    base = op_ptr + (row0 + offs_d).to(tl.int64)[:, None, None] * (SUB * SUB + 2 * BLOCK_N * SUB + 2 * BLOCK_N)
    t = tl.load(base + j[None, :, None] * SUB + j[None, None, :], mask=dm, other=0.0)
    w_col = SUB - 1 - j if REV_W else j
    w = tl.load(base + SUB * SUB + n[None, :, None] * SUB + w_col[None, None, :], mask=dm, other=0.0)
    v = tl.load(base + SUB * SUB + BLOCK_N * SUB + j[None, :, None] * BLOCK_N + n[None, None, :], mask=dm, other=0.0)
    qs = tl.load(base + SUB * SUB + 2 * BLOCK_N * SUB + n[None, :, None], mask=dm, other=0.0)
    q = tl.load(base + SUB * SUB + 2 * BLOCK_N * SUB + BLOCK_N + n[None, :, None], mask=dm, other=0.0)
    return t, w, v, qs, q


@triton.jit
def _walk_start(b3, t_first, step, L, D, d3, j3):
    """(column offsets (1, 1, NB) int64 of each column's first walk step, within-sub-chunk offsets (BD, SUB, 1))
    of a walk that visits time t_first + step * pos at position pos; an array's element (pos, d) of a column is
    at column offset + (pos // SUB) * SUB * step * D + the within-sub-chunk offset of (pos % SUB, d)."""
    return (b3.to(tl.int64) * L + t_first) * D, j3 * (step * D) + d3


@triton.jit
def _sub_chunk(u_ptr, keep_ptr, col_off, inner, keep_col, keep_inner, pos, n_c, dm, MASK_IN: tl.constexpr,
               EVEN: tl.constexpr):
    """The inputs at walk positions pos (1, SUB, 1) of every column, float32 (BD, SUB, NB): (raw x, masked u, the
    positions' store mask). Positions outside [0, n_c) read as zeros; EVEN: all exist, no load is masked (the mask
    returned is then unused and compiled away)."""
    there = (pos >= 0) & (pos < n_c)
    ok = there & dm
    if EVEN:
        raw = tl.load(u_ptr + col_off + inner).to(tl.float32)
    else:
        raw = tl.load(u_ptr + col_off + inner, mask=ok, other=0.0).to(tl.float32)
    um = raw
    if MASK_IN:
        if EVEN:
            keep = tl.load(keep_ptr + keep_col + keep_inner)
        else:
            keep = tl.load(keep_ptr + keep_col + keep_inner, mask=there, other=0)
        um = tl.where(keep != 0, raw, 0.0)
    return raw, um, ok


@triton.jit
def _tf32_hi(x):
    """x with its 13 low mantissa bits cleared: exact in TF32, and x - hi is exact in float32."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _split(a, PREC: tl.constexpr):
    """A loop-invariant dot operand as (hi, lo) TF32 parts (PREC "split"; "tf32": (a, unused))."""
    if PREC == "split":
        hi = _tf32_hi(a)
        return hi, a - hi
    else:
        return a, a


@triton.jit
def _mm(a_hi, a_lo, x, acc, PREC: tl.constexpr, EXACT_X: tl.constexpr):
    """acc + a @ x from TF32 products. PREC "split": a = a_hi + a_lo (split once by the caller) and x split here
    unless EXACT_X (16-bit inputs are exact in TF32): the dropped lo * lo term leaves ~2^-21 relative error, float32
    class. "tf32": one product, a and x rounded to TF32 (2^-11 relative)."""
    if PREC == "split":
        if EXACT_X:
            return tl.dot(a_lo, x, tl.dot(a_hi, x, acc, input_precision="tf32"), input_precision="tf32")
        else:
            x_hi = _tf32_hi(x)
            acc = tl.dot(a_hi, x_hi, acc, input_precision="tf32")
            acc = tl.dot(a_lo, x_hi, acc, input_precision="tf32")
            return tl.dot(a_hi, x - x_hi, acc, input_precision="tf32")
    else:
        return tl.dot(a_hi, x, acc, input_precision="tf32")


@triton.jit
def _store(ptr, value, ok, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptr, value)
    else:
        tl.store(ptr, value, mask=ok)


@triton.jit
def _walk_ops(op_ptr, row0, offs_d, D, om_diag, PREC: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr):
    """The operators of an output walk over rows row0 + offs_d, split for _mm: T (+ om_diag, the omega term when
    u = x), V and W_s = q W_h, and q^SUB."""
    t, w_h, v, qs, q = _operator_tiles(op_ptr, row0, offs_d, D, SUB, BLOCK_N)
    t_hi, t_lo = _split(t + om_diag, PREC)
    v_hi, v_lo = _split(v, PREC)
    w_hi, w_lo = _split(q * w_h, PREC)
    return t_hi, t_lo, v_hi, v_lo, w_hi, w_lo, qs, q


@triton.jit
def _walk_step(t_hi, t_lo, v_hi, v_lo, w_hi, w_lo, qs, um, s_in, PREC: tl.constexpr, EXACT_X: tl.constexpr):
    """One sub-chunk of an output walk: (e = T u + V s (BD, SUB, NB), the next s = q^SUB s + W_s u)."""
    e = _mm(t_hi, t_lo, um, tl.zeros_like(um), PREC, EXACT_X)
    e = _mm(v_hi, v_lo, s_in, e, PREC, False)
    return e, _mm(w_hi, w_lo, um, qs * s_in, PREC, EXACT_X)


@triton.jit
def _local_states(u_ptr, keep_ptr, op_ptr, row0, fwd, b3, cp3, n_c, L, D, offs_d, nsub, CHUNK,
                  MASK_IN: tl.constexpr, EVEN: tl.constexpr, PREC: tl.constexpr, EXACT_X: tl.constexpr,
                  SUB: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, NB: tl.constexpr,
                  STAGES: tl.constexpr):
    """Each column's chunk end state from zero (BD, BLOCK_N, NB), a H_loc, in the direction of rows row0 +
    offs_d (fwd: forward in time). The sub-chunks are aligned to the chunk's end, so a partial one comes first:
    its missing steps are zero inputs into a zero state."""
    d3 = offs_d[:, None, None]
    j3 = tl.arange(0, SUB)[None, :, None]
    _, w, _, qs, _ = _operator_tiles(op_ptr, row0, offs_d, D, SUB, BLOCK_N)
    w_hi, w_lo = _split(w, PREC)
    step = tl.where(fwd, 1, -1)
    pad = nsub * SUB - n_c
    t_first = tl.where(fwd, cp3 * CHUNK, cp3 * CHUNK + n_c - 1) - step * pad
    col_off, inner = _walk_start(b3, t_first, step, L, D, d3, j3)
    keep_col, keep_inner = col_off // D, j3 * step
    h = tl.zeros((BD, BLOCK_N, NB), tl.float32)
    for s in tl.range(0, nsub, num_stages=STAGES):
        raw, um, ok = _sub_chunk(u_ptr, keep_ptr, col_off, inner, keep_col, keep_inner, s * SUB + j3 - pad, n_c,
                                 d3 < D, MASK_IN, EVEN)
        h = _mm(w_hi, w_lo, um, qs * h, PREC, EXACT_X)
        col_off += SUB * step * D
        keep_col += SUB * step
    return h


@triton.jit
def _local_states_bi(u_ptr, keep_ptr, op_ptr, row_f, row_b, b3, cp3, n_c, L, D, offs_d, nsub, CHUNK,
                     MASK_IN: tl.constexpr, EVEN: tl.constexpr, PREC: tl.constexpr, EXACT_X: tl.constexpr,
                     SUB: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, NB: tl.constexpr,
                     STAGES: tl.constexpr):
    """Both directions' chunk end states from zero in one walk forward in time, so x is read once: (those of the
    rows row_f + offs_d, which run forward in time, as _local_states; those of the rows row_b + offs_d, which run
    backward: a sum_t q^(t - t0) u_t = sum_s q^(SUB s) (W_r u_s) over the sub-chunks s counted from the chunk's
    start, W_r[n, i] = a q^i, which is W_h with its columns reversed). The two sums align their sub-chunks to
    opposite ends of the chunk; where these differ (a partial sub-chunk, never with EVEN) the backward rows load
    their own."""
    d3 = offs_d[:, None, None]
    j3 = tl.arange(0, SUB)[None, :, None]
    dm = d3 < D
    _, w_f, _, qs_f, _ = _operator_tiles(op_ptr, row_f, offs_d, D, SUB, BLOCK_N)
    wf_hi, wf_lo = _split(w_f, PREC)
    _, w_r, _, qs_b, _ = _operator_tiles(op_ptr, row_b, offs_d, D, SUB, BLOCK_N, True)
    wr_hi, wr_lo = _split(w_r, PREC)
    pad = nsub * SUB - n_c
    col_off, inner = _walk_start(b3, cp3 * CHUNK - pad, 1, L, D, d3, j3)
    keep_col = col_off // D
    col_b, _ = _walk_start(b3, cp3 * CHUNK, 1, L, D, d3, j3)
    keep_b = col_b // D
    h_f = tl.zeros((BD, BLOCK_N, NB), tl.float32)
    h_b = tl.zeros((BD, BLOCK_N, NB), tl.float32)
    p = tl.full((BD, BLOCK_N, 1), 1.0, tl.float32)  # q^(SUB s) of the backward rows
    for s in tl.range(0, nsub, num_stages=STAGES):
        raw, um, ok = _sub_chunk(u_ptr, keep_ptr, col_off, inner, keep_col, j3, s * SUB + j3 - pad, n_c, dm,
                                 MASK_IN, EVEN)
        h_f = _mm(wf_hi, wf_lo, um, qs_f * h_f, PREC, EXACT_X)
        if not EVEN:  # pad == 0 under EVEN
            raw, um, ok = _sub_chunk(u_ptr, keep_ptr, col_b, inner, keep_b, j3, s * SUB + j3, n_c, dm, MASK_IN,
                                     EVEN)
        h_b += p * _mm(wr_hi, wr_lo, um, tl.zeros_like(h_b), PREC, EXACT_X)
        p = p * qs_b
        col_off += SUB * D
        keep_col += SUB
        col_b += SUB * D
        keep_b += SUB
    return h_f, h_b


@triton.jit
def _column(tile, k, NB: tl.constexpr):
    """Column k of a (BD, BLOCK_N, NB) tile as (BD, BLOCK_N, 1) (a register pick)."""
    return tl.sum(tl.where(tl.arange(0, NB)[None, None, :] == k, tile, 0.0), axis=2, keep_dims=True)


@triton.jit
def _lookback(buf_ptr, flag_ptr, s0_ptr, q, h_loc, grp, db, B, L, D, N, CHUNK, NDB, NCOL, d3, n3,
              HAS_S0: tl.constexpr, BD: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """The pre-decayed state s entering each of the program's columns (BD, BLOCK_N, NB), in column order: column
    (c, b) starts from s0[b] (c = 0) or q h_end(c - 1, b), taken from an earlier column of this program or, once
    its flag is set, from buf[c, b], where the program holding chunk c - 1 published it. h_end = q^(n - 1) s +
    h_loc (n: the chunk's steps). Columns whose successor lies in a later program publish h_end into buf[c + 1, b]
    and then set their flag (release; the reader acquires)."""
    first = grp * NB
    nc = tl.cdiv(L, CHUNK)
    sm = (d3 < D) & (n3 < N)
    offs_k = tl.arange(0, NB)[None, None, :]
    s_all = tl.zeros((BD, BLOCK_N, NB), tl.float32)
    h_end = tl.zeros((BD, BLOCK_N, NB), tl.float32)
    for k in range(0, NB):
        col = first + k
        if col < NCOL:
            c = col // B
            b = col % B
            at = ((c * B + b).to(tl.int64) * N + n3) * D + d3     # buf[c, b] (BD, BLOCK_N, 1)
            if c == 0:
                s = tl.zeros((BD, BLOCK_N, 1), tl.float32)
                if HAS_S0:
                    s = tl.load(s0_ptr + (b.to(tl.int64) * D + d3) * N + n3, mask=sm, other=0.0)
            elif col - B >= first:
                s = q * _column(h_end, k - B, NB)
            else:
                flag = flag_ptr + (col - B) * NDB + db
                ready = tl.atomic_add(flag, 0, sem="acquire")
                while ready == 0:
                    ready = tl.atomic_add(flag, 0, sem="acquire")
                s = q * tl.load(buf_ptr + at, mask=sm, other=0.0, volatile=True)
            h = _pow(q, tl.minimum(CHUNK, L - c * CHUNK) - 1) * s + _column(h_loc, k, NB)
            s_all = tl.where(offs_k == k, s, s_all)
            h_end = tl.where(offs_k == k, h, h_end)
            if (col + B >= first + NB) & (c + 1 < nc):
                tl.store(buf_ptr + at + B * N * D, h, mask=sm)
                tl.debug_barrier()
                tl.atomic_xchg(flag_ptr + col * NDB + db, 1, sem="release")
    return s_all


@triton.jit
def _walk_from(b3, cp3, n_c, CHUNK, L, D, d3, j3, FWD: tl.constexpr):
    """(col_off, inner, keep_col, keep_inner, step) of an output walk through each column's chunk, from its first
    step (FWD) or its last (backward in time); a partial sub-chunk comes last."""
    if FWD:
        step = 1
        t_first = cp3 * CHUNK
    else:
        step = -1
        t_first = cp3 * CHUNK + n_c - 1
    col_off, inner = _walk_start(b3, t_first, step, L, D, d3, j3)
    return col_off, inner, col_off // D, j3 * step, step


@triton.jit(do_not_specialize=["B", "L", "N", "CHUNK", "NDB", "NCOL"])  # D: see below
def _tc_scan_kernel(u_ptr, keep_ptr, out_ptr, acc_ptr, gy_ptr, dom_ptr, op_ptr, omega_ptr, s0_ptr, buf_ptr, flag_ptr,
                    ticket_ptr, B, L, D, N, CHUNK, NDB, NCOL,
                    STATES: tl.constexpr, NDIR: tl.constexpr, MASK_IN: tl.constexpr, HAS_S0: tl.constexpr,
                    CARRY: tl.constexpr, LOOKBACK: tl.constexpr, EVEN: tl.constexpr, PREC: tl.constexpr,
                    EXACT_X: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr,
                    NB: tl.constexpr, STAGES: tl.constexpr = 1, EPI: tl.constexpr = 1, REVERSE: tl.constexpr = False,
                    MASK_OUT: tl.constexpr = False):
    """One program = BD channels x NB columns (column = physical chunk cp, batch row b: col = cp * B + b).
    STATES: buf[cp, b, :, row] = the chunk's end state from zero in the direction of its row (NDIR = 2: both
    directions from one read of x, _local_states_bi). Else: the columns' chunks (both directions when NDIR = 2:
    rows [D:] into acc first), each chunk from s = q buf[cp] (+ s0 in the primary rows' first chunk) and the
    epilogue EPI (ema_fwd's): EPI_SILU y = silu(z); EPI_DSILU g = gy silu'(z) (float32) and dom[cp, b] = the
    chunk's sum of g x; EPI_DX dx = omega u + keep (e + acc) (MASK_OUT: keep applies to the EMA part, not to the
    input). REVERSE: the primary rows [:D] run backward in time, rows [D:] forward. LOOKBACK (one direction, one
    launch): programs take tickets in column order, compute their columns' local states, take the states
    entering them from earlier programs (_lookback), then write y, re-reading x from L2.
    EVEN: every chunk has CHUNK steps, a multiple of SUB, D is a multiple of BD and B x chunks of NB (the
    launcher checks), so no load or store needs a mask. PREC, EXACT_X: see _mm. D is specialized: where it is a
    multiple of 16, Triton knows each column's rows are 16-byte aligned and loads and stores x and y several
    channels per instruction (sm_90: the bf16 output pass 38 -> 30 SASS per element, 170 -> 123 registers)."""
    if LOOKBACK:
        pid = tl.atomic_add(ticket_ptr, 1)  # in column order: every earlier column's program has started
    else:
        pid = tl.program_id(0)
    db = pid % NDB
    grp = pid // NDB
    offs_d = db * BD + tl.arange(0, BD)
    col = grp * NB + tl.arange(0, NB)
    cm = col < NCOL
    cp = tl.where(cm, col // B, 0)
    b = col % B
    n_c = tl.where(cm, tl.minimum(CHUNK, L - cp * CHUNK), 0)[None, None, :]   # steps in each column's chunk
    cp3 = cp[None, None, :]
    b3 = b[None, None, :]
    n3 = tl.arange(0, BLOCK_N)[None, :, None]
    d3 = offs_d[:, None, None]
    dm = d3 < D
    j3 = tl.arange(0, SUB)[None, :, None]
    nsub = tl.cdiv(CHUNK, SUB)
    KD = NDIR * D
    st_m = dm & (n3 < N) & cm[None, None, :]
    st_off = ((cp3 * B + b3).to(tl.int64) * N + n3) * KD + d3   # element (cp, b, n, d) of buf, rows [:D]
    if STATES and NDIR == 2:  # both directions from one read of x
        row_f = D if REVERSE else 0  # the rows that run forward in time
        h_f, h_b = _local_states_bi(u_ptr, keep_ptr, op_ptr, row_f, D - row_f, b3, cp3, n_c, L, D, offs_d, nsub,
                                    CHUNK, MASK_IN, EVEN, PREC, EXACT_X, SUB, BLOCK_N, BD, NB, STAGES)
        tl.store(buf_ptr + st_off + row_f, h_f, mask=st_m)
        tl.store(buf_ptr + st_off + (D - row_f), h_b, mask=st_m)
    elif STATES:
        h = _local_states(u_ptr, keep_ptr, op_ptr, 0, not REVERSE, b3, cp3, n_c, L, D, offs_d, nsub, CHUNK, MASK_IN,
                          EVEN, PREC, EXACT_X, SUB, BLOCK_N, BD, NB, STAGES)
        tl.store(buf_ptr + st_off, h, mask=st_m)
    else:
        i3 = tl.arange(0, SUB)[None, None, :]
        no_om = tl.zeros((BD, SUB, SUB), tl.float32)
        if NDIR == 2:  # rows [D:], against the primary rows' direction, their e into acc
            t_hi, t_lo, v_hi, v_lo, w_hi, w_lo, qs, q = _walk_ops(op_ptr, D, offs_d, D, no_om, PREC, SUB, BLOCK_N)
            s_in = tl.zeros((BD, BLOCK_N, NB), tl.float32)
            if CARRY:
                s_in = q * tl.load(buf_ptr + st_off + D, mask=st_m, other=0.0)
            col_off, inner, keep_col, keep_inner, step = _walk_from(b3, cp3, n_c, CHUNK, L, D, d3, j3, REVERSE)
            for s in tl.range(0, nsub, num_stages=STAGES):
                raw, um, ok = _sub_chunk(u_ptr, keep_ptr, col_off, inner, keep_col, keep_inner, s * SUB + j3, n_c,
                                         dm, MASK_IN, EVEN)
                e, s_in = _walk_step(t_hi, t_lo, v_hi, v_lo, w_hi, w_lo, qs, um, s_in, PREC, EXACT_X)
                _store(acc_ptr + col_off + inner, e, ok, EVEN)
                col_off += SUB * step * D
                keep_col += SUB * step
            # the primary walk below reads acc in the opposite time order, so each element of it is read by another
            # thread than the one that wrote it: a CTA barrier makes those writes visible
            tl.debug_barrier()
        # omega x joins the output dot: on T's diagonal when the input and the output are unmasked, else as its
        # own diagonal operator on the raw input
        om_diag = tl.where(j3 == i3, tl.load(omega_ptr + d3, mask=dm, other=0.0), 0.0)
        on_t = om_diag
        if MASK_IN or MASK_OUT:
            on_t = no_om
        t_hi, t_lo, v_hi, v_lo, w_hi, w_lo, qs, q = _walk_ops(op_ptr, 0, offs_d, D, on_t, PREC, SUB, BLOCK_N)
        o_hi, o_lo = _split(om_diag, PREC)
        if LOOKBACK:
            h_loc = _local_states(u_ptr, keep_ptr, op_ptr, 0, True, b3, cp3, n_c, L, D, offs_d, nsub, CHUNK,
                                  MASK_IN, EVEN, PREC, EXACT_X, SUB, BLOCK_N, BD, NB, STAGES)
            s_in = _lookback(buf_ptr, flag_ptr, s0_ptr, q, h_loc, grp, db, B, L, D, N, CHUNK, NDB, NCOL, d3, n3,
                             HAS_S0, BD, BLOCK_N, NB)
        else:
            if REVERSE:  # the primary walk's first chunk
                first = cp3 == tl.cdiv(L, CHUNK) - 1
            else:
                first = cp3 == 0
            s_in = tl.zeros((BD, BLOCK_N, NB), tl.float32)
            if HAS_S0:
                s_in = tl.load(s0_ptr + (b3.to(tl.int64) * D + d3) * N + n3, mask=st_m & first, other=0.0)
            if CARRY:
                s_in += q * tl.load(buf_ptr + st_off, mask=st_m & ~first, other=0.0)
        dom = tl.zeros((BD, SUB, NB), tl.float32)  # EPI_DSILU: g x by position, summed over it once at the end
        col_off, inner, keep_col, keep_inner, step = _walk_from(b3, cp3, n_c, CHUNK, L, D, d3, j3, not REVERSE)
        for s in tl.range(0, nsub, num_stages=STAGES):
            raw, um, ok = _sub_chunk(u_ptr, keep_ptr, col_off, inner, keep_col, keep_inner, s * SUB + j3, n_c, dm,
                                     MASK_IN, EVEN)
            z, s_in = _walk_step(t_hi, t_lo, v_hi, v_lo, w_hi, w_lo, qs, um, s_in, PREC, EXACT_X)
            if NDIR == 2:
                if EVEN:
                    z += tl.load(acc_ptr + col_off + inner)
                else:
                    z += tl.load(acc_ptr + col_off + inner, mask=ok, other=0.0)
            if MASK_OUT:
                if EVEN:
                    keep = tl.load(keep_ptr + keep_col + keep_inner)
                else:
                    keep = tl.load(keep_ptr + keep_col + keep_inner, mask=s * SUB + j3 < n_c, other=0)
                z = tl.where(keep != 0, z, 0.0)
            if MASK_IN or MASK_OUT:
                z = _mm(o_hi, o_lo, raw, z, PREC, EXACT_X)
            if EPI == 1:
                z = z * _sw._sigmoid(z)
            elif EPI == 2:
                if EVEN:
                    gy = tl.load(gy_ptr + col_off + inner).to(tl.float32)
                else:
                    gy = tl.load(gy_ptr + col_off + inner, mask=ok, other=0.0).to(tl.float32)
                sig = _sw._sigmoid(z)
                z = gy * sig * (1.0 + z * (1.0 - sig))
                dom += z * raw
            _store(out_ptr + col_off + inner, z.to(out_ptr.dtype.element_ty), ok, EVEN)
            col_off += SUB * step * D
            keep_col += SUB * step
        if EPI == 2:
            tl.store(dom_ptr + (cp3 * B + b3).to(tl.int64) * D + d3, tl.sum(dom, axis=1, keep_dims=True),
                     mask=dm & cm[None, None, :])


def default_block_d(dtype: torch.dtype, lookback: bool) -> int:
    """Channels per program of the passes: 8 for float32 inputs, else 16 (and for the look-back). sm_90, B8 L4096
    D1024 N16, 8 warps: at 16 channels the float32 output pass holds 156 registers and 112 KB of shared memory, one
    program (8 warps) per SM; at 8, 94 registers and 56 KB, two programs, and fewer instructions per 32 elements
    (output 29.8 -> 28.8, adjoint dx 25.5 -> 24.1, dL/dz 39.1 -> 38.9 at 168 -> 116 registers; two directions
    33.6 at 228 -> 123; masked and partial tiles also two programs). 16-bit inputs already fit two programs at
    16 channels, where 8 cost 20% more instructions (the bf16 output pass 30.0 -> 35.9), as does the look-back
    (29.6 -> 31.4 and a longer fold)."""
    return 8 if dtype == torch.float32 and not lookback else 16


def check_ndim(fn: str, n: int) -> None:
    """A ValueError for an N the tensor-core tiles cannot hold (MAX_N), with the fix."""
    if n > MAX_N:
        raise ValueError(f"{fn}: tensor_cores=True takes N <= {MAX_N} states per channel (larger tiles exceed an "
                         f"SM's shared memory), got N = {n}; leave tensor_cores off (the sweeps take any N)")


def block_n_tc(n: int) -> int:
    """States per channel in the tensor-core kernels' tiles (and their operators' rows): N padded to a power of
    two >= 16, the dots' smallest size."""
    return max(16, triton.next_power_of_2(n))


def operators(a: Tensor, q: Tensor, c: Tensor) -> Tensor:
    """(kd, SUB^2 + 2 SUB BLOCK_N + 2 BLOCK_N) float32 per-row operators of `_operators_kernel` for a, q, c (kd, N)."""
    kd, n = q.shape
    block_n = block_n_tc(n)
    op = _fwd._empty((kd, SUB * SUB + 2 * block_n * SUB + 2 * block_n), torch.float32, q.device)
    _operators_kernel[(kd,)](a.contiguous(), q.contiguous(), c.contiguous(), op, n, SUB=SUB, BLOCK_N=block_n)
    return op


def ema_scan_tc(u: Tensor, a: Tensor, q: Tensor, c: Tensor, omega: Tensor, keep: Optional[Tensor],
                s0: Optional[Tensor], *, bidirectional: bool, out_dtype: torch.dtype, chunk: Optional[int] = None,
                block_d: Optional[int] = None, cols: int = 16, num_warps: int = 8, precision: str = "split",
                lookback: bool = False, epilogue: int = _sw.EPI_SILU, gy: Optional[Tensor] = None,
                reverse: bool = False, mask_in: bool = True, states: Optional[Tensor] = None,
                local: Optional[Tensor] = None, write_final: bool = False
                ) -> Tuple[Tensor, Optional[Tensor], int, Optional[Tensor], Optional[Tensor]]:
    """The scan of `ema_fwd.ema_scan` through the tensor-core passes (module docstring): (out (B, L, D), the chunk
    states buf (nc, B, N, kd) (h_in of each chunk after the first in its direction; None for one chunk), the
    chunk length, dom (nc, B, D) for EPI_DSILU else None, with write_final the primary rows' last state h
    (B, D, N) float32 else None), as ema_scan returns them. a, q, c (kd, N) float32; s0
    (B, D, N) pre-decayed initial state or None. epilogue: EPI_SILU, EPI_DSILU (with gy) or EPI_DX (the
    adjoint's; mask_in=False applies keep to its EMA part); reverse: the primary rows run backward in time;
    states: the buf of an identical earlier scan (no state pass, no carry); local: chunk-local states H_loc
    (not yet times a) computed elsewhere, carried in place. write_final: the last state is the end state of the
    primary rows' last chunk, q^(T-1) s + a H_loc (T its steps, s the pre-decayed state entering it), from its
    local state kept before the carry (so not with `states`; with one chunk the state pass runs for it alone).
    block_d channels (a power of two >= 8; None: default_block_d) x cols (batch row, chunk) columns (a power of
    two >= 16, the dots' smallest size) per program;
    precision: "split" (TF32 products of split operands, float32 class; see _mm) or "tf32" (one TF32 product, for
    bfloat16 inputs only). lookback (the forward, one direction): a single launch in which each program takes the
    states entering its chunks from the programs before it (buf then holds them by chunk, not the carry's layout;
    chunk 0's entry is unwritten)."""
    bsz, length, dim = u.shape
    ndim = q.shape[1]
    chunk = int(chunk or _fwd.DEFAULT_CHUNK)
    if chunk < 1:
        raise ValueError(f"ema_scan_tc: chunk must be a positive number of steps, got {chunk}")
    block_d = block_d or default_block_d(u.dtype, lookback)
    if block_d < 8 or cols < 16 or block_d & (block_d - 1) or cols & (cols - 1):
        raise ValueError(f"ema_scan_tc: block_d must be a power of two >= 8 and cols one >= 16 (the dots' smallest "
                         f"size), got {block_d}, {cols}")
    check_ndim("ema_scan_tc", ndim)
    if precision not in ("split", "tf32") or (precision == "tf32" and u.dtype != torch.bfloat16):
        raise ValueError(f"ema_scan_tc: precision must be 'split', or 'tf32' for bfloat16 inputs only; got "
                         f"{precision!r} for {u.dtype}")
    if lookback and (bidirectional or reverse or epilogue != _sw.EPI_SILU or states is not None
                     or local is not None or write_final):
        raise ValueError("ema_scan_tc: lookback=True runs the forward's one direction only, without a final state; "
                         "use the three passes (lookback=False) for a bidirectional, reversed or backward scan")
    if (epilogue == _sw.EPI_DSILU) != (gy is not None):
        raise ValueError("ema_scan_tc: gy (dL/dy) is what EPI_DSILU takes, and only it")
    nc = triton.cdiv(length, chunk)
    ndir = 2 if bidirectional else 1
    block_n = block_n_tc(ndim)
    ndb = triton.cdiv(dim, block_d)
    ncol = nc * bsz
    groups = triton.cdiv(ncol, cols)
    kd = q.shape[0]
    op = operators(a, q, c)
    out = _fwd._empty(u.shape, out_dtype, u.device)
    acc = None
    if bidirectional:
        acc = out if out_dtype == torch.float32 else _fwd._empty(u.shape, torch.float32, u.device)
    dom = _fwd._empty((nc, bsz, dim), torch.float32, u.device) if epilogue == _sw.EPI_DSILU else None
    buf = None
    even = length % chunk == 0 and chunk % SUB == 0 and dim % block_d == 0 and ncol % cols == 0
    flags = dict(MASK_IN=keep is not None and mask_in, HAS_S0=s0 is not None, EVEN=even, PREC=precision,
                 EXACT_X=u.dtype != torch.float32, SUB=SUB, BLOCK_N=block_n, BD=block_d, NB=cols,
                 REVERSE=reverse, num_warps=num_warps)
    if lookback and nc > 1:
        buf = _fwd._empty((nc, bsz, ndim, dim), torch.float32, u.device)
        ticket = torch.zeros(1, dtype=torch.int32, device=u.device)
        ready = torch.zeros(ncol * ndb, dtype=torch.int32, device=u.device)
        _tc_scan_kernel[(ndb * groups,)](u, keep, out, None, None, None, op, omega, s0, buf, ready, ticket, bsz,
                                         length, dim, ndim, chunk, ndb, ncol, STATES=False, NDIR=1, CARRY=False,
                                         LOOKBACK=True, **flags)
        return out, buf, chunk, None, None
    if write_final and states is not None:
        raise ValueError("ema_scan_tc: write_final needs the last chunk's local state, which given `states` lack; "
                         "pass states=None")
    last = 0 if reverse else nc - 1  # the primary rows' last chunk
    if nc > 1 and states is not None:
        if tuple(states.shape) != (nc, bsz, ndim, kd):
            raise ValueError(f"ema_scan_tc: states must be the (nc, B, N, kd) = {(nc, bsz, ndim, kd)} chunk states "
                             f"of an identical scan, got {tuple(states.shape)}")
        buf = states
    elif nc > 1 or write_final:
        loc = local
        if loc is None:
            loc = _fwd._empty((nc, bsz, ndim, kd), torch.float32, u.device)
            _tc_scan_kernel[(ndb * groups,)](u, keep, None, None, None, None, op, omega, s0, loc, None, None,
                                                    bsz, length, dim, ndim, chunk, ndb, ncol, STATES=True, NDIR=ndir,
                                                    CARRY=False, LOOKBACK=False, **flags)
        if write_final:  # a H_loc of the last chunk (B, N, D), before the carry overwrites it
            end_loc = loc[last, :, :, :dim] * (a[:dim].t() if local is not None else 1.0)
        if nc > 1:
            buf = loc
            aT, qT = (t.t().contiguous() for t in (a, q))
            _fwd.run_carry(buf, qT, aT, s0, length, dim, chunk, reverse=reverse, scale_loc=local is not None)
    _tc_scan_kernel[(ndb * groups,)](u, keep, out, acc, gy, dom, op, omega, s0, buf, None, None, bsz, length, dim,
                                     ndim, chunk, ndb, ncol, STATES=False, NDIR=ndir, CARRY=nc > 1, LOOKBACK=False,
                                     EPI=epilogue, MASK_OUT=keep is not None and not mask_in, **flags)
    final = None
    if write_final:
        qt = q[:dim].t()  # (N, D)
        if nc > 1:
            s_in = qt * buf[last, :, :, :dim]
        else:
            s_in = torch.zeros_like(end_loc) if s0 is None else s0.transpose(1, 2)
        steps = min(chunk, length - last * chunk)
        final = (qt ** (steps - 1) * s_in + end_loc).transpose(1, 2).contiguous()
    return out, buf, chunk, dom, final
