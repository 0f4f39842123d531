"""Triton EMA backward on tensor cores: the parameter sweep of ema_bwd.py (`_param_grad_kernel`), each group of
scan chunks swept SUB = 16 steps at a time as small matrix products. It writes the same partial sums, end
states and adjoint chunk states, so ema_bwd's `_param_carry_kernel` and adjoint scan run on them unchanged.

Maths (one channel and expansion index n; ema_bwd.py's scaled recurrences, u = x * mask, g = dL/dz):

    hs_t = q hs_{t-1} + u_t,   H_t = q H_{t-1} + u_t,   P_t = q P_{t-1} + hs_{t-1}

A sub-chunk of S steps entered with hs0, H0, P0 (the states after the step before it) has, for j = 0 .. S-1,

    H_j = q^(j+1) H0 + sum_{i <= j} q^(j-i) u_i                    (hs_j likewise from hs0)
    P_j = q^(j+1) P0 + (j+1) q^j hs0 + sum_{i < j} (j-i) q^(j-i-1) u_i

so its contributions to the three sums and its end states are

    sum_j g_j H_j = q H0 (R0 g) + sum_{i <= j} g_j u_i q^(j-i)
    sum_j g_j P_j = q P0 (R0 g) + hs0 (R1 g) + sum_{i < j} g_j u_i (j-i) q^(j-i-1)
    H_end = q^S H0 + Wu u,   hs_end = q^S hs0 + Wu u,   P_end = q^S P0 + S q^(S-1) hs0 + Wp u
    sum_j g_j q^(o+j) = q^o (R0 g)          (the adjoint's chunk state A, o = steps since the chunk start)

with the (N, S) operators R0[n, j] = q^j, R1[n, j] = (j+1) q^j, Wu[n, i] = q^(S-1-i), Wp[n, i] = (S-1-i)
q^(S-2-i). Each is one (N, S) x (S, columns) dot per sub-chunk, shared by every (group, batch row) column of the
channel. The pairs (i, j) inside a sub-chunk weigh g_j u_i by a function of j - i alone, so one (S, S)
matrix M = sum over the program's columns and sub-chunks of g u^T (a dot whose inner size is the columns) holds
them all: after the sweep, with m_l = sum_{j - i = l} M[j, i], they add sum_l q^l m_l to sum g H and
sum_l l q^(l-1) m_l to sum g P. Steps that do not fill a sub-chunk (the partial chunk at the sequence's end, where
L is not a multiple of S) are swept one at a time.

Precision: the operators are split once into hi + lo TF32 parts and g (and float32 x) each sub-chunk; every dot
is three TF32 products (two when x is 16-bit), float32 class (ema_tc._mm). The sums and states stay float32.
Not taken: truncation, and chunks that are not a multiple of SUB (`param_sweep_tc` refuses both).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import ema_fwd as _fwd
from . import ema_sweep as _sw
from .ema_bwd import _param_step
from .ema_tc import SUB, _mm, _pow, _split, _sub_chunk, block_n_tc, check_ndim

Tensor = torch.Tensor
BLOCK_D, NUM_WARPS = 8, 8  # channels and warps per program (sm_90: 236 registers, no spill; 16 channels spill)


@triton.jit
def _param_operators_kernel(q_ptr, op_ptr, N, SUB: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row r of the operators, laid out [R0 | R1 | Wu | Wp], each (BLOCK_N, SUB) float32 (states n >= N zero),
    from q (kd, N) row-major."""
    r = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)[:, None]
    q = tl.load(q_ptr + r * N + n, mask=n < N, other=0.0)
    j = tl.arange(0, SUB)[None, :]
    back = SUB - 1 - j
    live = tl.where(n < N, 1.0, 0.0)
    at = op_ptr + r.to(tl.int64) * (4 * BLOCK_N * SUB) + n * SUB + j
    tl.store(at, live * _pow(q, j))
    tl.store(at + BLOCK_N * SUB, live * (j + 1) * _pow(q, j))
    tl.store(at + 2 * BLOCK_N * SUB, live * _pow(q, back))
    tl.store(at + 3 * BLOCK_N * SUB, live * back * _pow(q, tl.maximum(back - 1, 0)))


@triton.jit
def _operator(op_ptr, rows3, k: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr):
    """Operator k of rows3 (BD, 1, 1) as (hi, lo) TF32 parts of a (BD, BLOCK_N, SUB) tile."""
    n3 = tl.arange(0, BLOCK_N)[None, :, None]
    j3 = tl.arange(0, SUB)[None, None, :]
    t = tl.load(op_ptr + rows3.to(tl.int64) * (4 * BLOCK_N * SUB) + k * BLOCK_N * SUB + n3 * SUB + j3)
    return _split(t, "split")


@triton.jit
def _one_step(x_ptr, keep_ptr, g_ptr, at, keep_at, live, dm, q, hs, H, P, pw, sH, sP, A, MASK_IN: tl.constexpr):
    """One time step (ema_bwd._param_step) of every live column (at, keep_at, live: (1, 1, NB) per column); the
    other columns stand still (q = 1, u = g = 0, and no hs term in P)."""
    ok = live & dm
    u = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
    if MASK_IN:
        u = tl.where(tl.load(keep_ptr + keep_at, mask=live, other=0) != 0, u, 0.0)
    g = tl.load(g_ptr + at, mask=ok, other=0.0)
    return _param_step(u, g, u, hs, tl.where(live, hs, 0.0), H, P, pw, sH, sP, A, tl.where(live, q, 1.0), 0.0, 0.0,
                       False)


@triton.jit
def _end_chunks(adj_ptr, A, pw, done, live, n_first, n_steps, c_first, c_last, fwd, b3, B, N, KD, row0, d3, n3,
                st_m, CHUNK):
    """After `done` (1, 1, NB) steps of each column's walk: store A into adj[chunk, b] for the columns whose
    current chunk ends there (chunk ends in walk order: n_first, then every CHUNK, and the walk's end) and restart
    their A and pw = q^(steps since the chunk start)."""
    ends = live & (done >= n_first) & (done <= n_steps) & (((done - n_first) % CHUNK == 0) | (done == n_steps))
    if tl.max(ends.to(tl.int32)) > 0:
        k = (done - n_first + CHUNK - 1) // CHUNK
        cp = tl.where(fwd, c_first + k, c_last - k)
        at = ((cp * B + b3).to(tl.int64) * N + n3) * KD + row0 + d3
        tl.store(adj_ptr + at, A, mask=st_m & ends)
        A = tl.where(ends, 0.0, A)
        pw = tl.where(ends, 1.0, pw)
    return A, pw


@triton.jit(do_not_specialize=["B", "L", "N", "CHUNK", "GROUP", "NDB", "NCOL"])
def _tc_param_kernel(x_ptr, keep_ptr, g_ptr, a_ptr, q_ptr, op_ptr, s_ptr, buf_ptr, part_ptr, adj_ptr,
                     B, L, D, N, CHUNK, GROUP, NDB, NCOL, NDIR: tl.constexpr, MASK_IN: tl.constexpr,
                     HAS_S: tl.constexpr, HAS_BUF: tl.constexpr, EVEN: tl.constexpr, EXACT_X: tl.constexpr,
                     SUB: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, NB: tl.constexpr,
                     STAGES: tl.constexpr = 3):
    """One program = BD channels x NB columns of one direction (column = (group of GROUP scan chunks, batch row b):
    col = group * B + b). Writes what `ema_bwd._param_grad_kernel` writes: part[:, group, b, :, row] (sum g
    H_run, a sum g P_run, H_run end, a P_run end; the sub-chunks' inner pairs of all its columns go to its first
    column's sums, which the carry only adds up) and adj[chunk, b, :, row] = sum_j g q^j per chunk. A column's
    walk: head steps (the reverse walk's partial chunk's first L % SUB steps), whole sub-chunks, tail steps (the
    forward walk's last L % SUB); EVEN: every column has GROUP * CHUNK steps and no load needs a mask. STAGES:
    sub-chunks of x and g in flight (sm_90, float32: 3 stages keep two sub-chunks, 32 KB per program, ahead;
    at 236 registers one program of 8 warps fits an SM, so these loads are all that hides DRAM latency)."""
    pid = tl.program_id(0)
    db = pid % NDB
    rest = pid // NDB
    dirn = rest % NDIR
    fwd = dirn == 0
    row0 = dirn * D
    KD = NDIR * D
    offs_d = db * BD + tl.arange(0, BD)
    d3 = offs_d[:, None, None]
    dm = d3 < D
    n3 = tl.arange(0, BLOCK_N)[None, :, None]
    j3 = tl.arange(0, SUB)[None, :, None]
    col = (rest // NDIR) * NB + tl.arange(0, NB)[None, None, :]
    cm = col < NCOL
    grp = tl.where(cm, col // B, 0)
    b3 = col % B
    st_m = dm & (n3 < N) & cm
    nc = tl.cdiv(L, CHUNK)
    GS = GROUP * CHUNK
    n_steps = tl.where(cm, tl.minimum(GS, L - grp * GS), 0)
    c_first = grp * GROUP
    c_last = tl.minimum(c_first + GROUP, nc) - 1
    n_first = tl.where(fwd, tl.minimum(CHUNK, n_steps), tl.where(cm, tl.minimum(CHUNK, L - c_last * CHUNK), 0))
    head = tl.where(fwd, 0, n_first % SUB)
    tail = tl.where(fwd, n_steps % SUB, 0)
    nsub = (n_steps - head - tail) // SUB
    step = tl.where(fwd, 1, -1)
    t0 = tl.where(fwd, grp * GS, grp * GS + n_steps - 1)   # time of each column's walk position 0
    # coefficients (BD, BLOCK_N, 1) and the true states entering each column (scaled: hs = h / a')
    rows3 = row0 + tl.where(dm, d3, 0)
    cf = (n3 < N) & dm
    q = tl.load(q_ptr + rows3 * N + n3, mask=cf, other=0.0)
    a = _sw._safe(tl.load(a_ptr + rows3 * N + n3, mask=cf, other=0.0))
    hs = tl.zeros((BD, BLOCK_N, NB), tl.float32)
    c_in = tl.where(fwd, c_first, c_last)
    if HAS_BUF:
        from_buf = tl.where(fwd, c_in > 0, c_in < nc - 1)
        hs = tl.load(buf_ptr + ((c_in * B + b3).to(tl.int64) * N + n3) * KD + row0 + d3, mask=st_m & from_buf,
                     other=0.0)
    if HAS_S:
        hs += tl.load(s_ptr + (b3.to(tl.int64) * D + d3) * N + n3, mask=st_m & fwd & (c_in == 0), other=0.0)
    hs = hs / a
    H = tl.zeros((BD, BLOCK_N, NB), tl.float32)
    P = tl.zeros((BD, BLOCK_N, NB), tl.float32)
    sH = tl.zeros((BD, BLOCK_N, NB), tl.float32)
    sP = tl.zeros((BD, BLOCK_N, NB), tl.float32)
    A = tl.zeros((BD, BLOCK_N, NB), tl.float32)
    pw = tl.full((BD, BLOCK_N, NB), 1.0, tl.float32)
    walk0 = (b3.to(tl.int64) * L + t0) * D    # each column's walk position 0, as an element offset of x
    done = tl.zeros((1, 1, NB), tl.int32)      # steps of each column's walk swept so far
    if not EVEN:
        for i in range(0, tl.max(head)):
            live = i < head
            hs, H, P, pw, sH, sP, A = _one_step(x_ptr, keep_ptr, g_ptr, walk0 + (i * step) * D + d3,
                                                walk0 // D + i * step, live, dm, q, hs, H, P, pw,
                                                sH, sP, A, MASK_IN)
            done = tl.where(live, done + 1, done)
            A, pw = _end_chunks(adj_ptr, A, pw, done, live, n_first, n_steps, c_first, c_last, fwd, b3, B, N, KD,
                                row0, d3, n3, st_m, CHUNK)
    r0_hi, r0_lo = _operator(op_ptr, rows3, 0, SUB, BLOCK_N)
    r1_hi, r1_lo = _operator(op_ptr, rows3, 1, SUB, BLOCK_N)
    wu_hi, wu_lo = _operator(op_ptr, rows3, 2, SUB, BLOCK_N)
    wp_hi, wp_lo = _operator(op_ptr, rows3, 3, SUB, BLOCK_N)
    qS = _sw._powi(q, SUB)
    qS1 = SUB * _sw._powi(q, SUB - 1)
    M = tl.zeros((BD, SUB, SUB), tl.float32)
    col_off = walk0 + (head * step) * D
    inner = j3 * (step * D) + d3
    for s in tl.range(0, tl.max(nsub), num_stages=STAGES):
        _, u, _ = _sub_chunk(x_ptr, keep_ptr, col_off, inner, col_off // D, j3 * step, s * SUB + j3, nsub * SUB, dm,
                             MASK_IN, EVEN)
        g, _, _ = _sub_chunk(g_ptr, keep_ptr, col_off, inner, col_off // D, j3 * step, s * SUB + j3, nsub * SUB,
                             dm, False, EVEN)
        rg = _mm(r0_hi, r0_lo, g, tl.zeros_like(hs), "split", False)
        r1g = _mm(r1_hi, r1_lo, g, tl.zeros_like(hs), "split", False)
        wu = _mm(wu_hi, wu_lo, u, tl.zeros_like(hs), "split", EXACT_X)
        wp = _mm(wp_hi, wp_lo, u, tl.zeros_like(hs), "split", EXACT_X)
        g_hi, g_lo = _split(g, "split")
        M = _mm(g_hi, g_lo, tl.permute(u, (0, 2, 1)), M, "split", EXACT_X)
        qe = qS
        hs_in = qS1 * hs
        if not EVEN:
            live = s < nsub
            qe = tl.where(live, qS, 1.0)
            hs_in = tl.where(live, hs_in, 0.0)
        qrg = q * rg
        sH += H * qrg
        sP += P * qrg + hs * r1g
        A += pw * rg
        pw = pw * qe
        P = qe * P + hs_in + wp
        H = qe * H + wu
        hs = qe * hs + wu
        if EVEN:  # every column's chunks end together, after each CHUNK // SUB sub-chunks
            if (s + 1) % (CHUNK // SUB) == 0:
                k = (s + 1) // (CHUNK // SUB) - 1
                cp = tl.where(fwd, c_first + k, c_last - k)
                tl.store(adj_ptr + ((cp * B + b3).to(tl.int64) * N + n3) * KD + row0 + d3, A, mask=st_m)
                A = tl.zeros_like(A)
                pw = tl.full(pw.shape, 1.0, tl.float32)
        else:
            done = tl.where(live, done + SUB, done)
            A, pw = _end_chunks(adj_ptr, A, pw, done, live, n_first, n_steps, c_first, c_last, fwd, b3, B, N, KD,
                                row0, d3, n3, st_m, CHUNK)
        col_off += (SUB * step) * D
    if not EVEN:
        for i in range(0, tl.max(tail)):
            live = i < tail
            pos = (head + nsub * SUB + i) * step
            hs, H, P, pw, sH, sP, A = _one_step(x_ptr, keep_ptr, g_ptr, walk0 + pos * D + d3, walk0 // D + pos,
                                                live, dm, q, hs, H, P, pw, sH, sP, A, MASK_IN)
            done = tl.where(live, done + 1, done)
            A, pw = _end_chunks(adj_ptr, A, pw, done, live, n_first, n_steps, c_first, c_last, fwd, b3, B, N, KD,
                                row0, d3, n3, st_m, CHUNK)
    # the sub-chunks' inner pairs: m_l = sum_{j - i = l} M[j, i] weighs q^l into sum g H, l q^(l-1) into sum g P
    lag = tl.arange(0, SUB)[None, :, None] - tl.arange(0, SUB)[None, None, :]
    in_H = tl.zeros((BD, BLOCK_N, 1), tl.float32)
    in_P = tl.zeros((BD, BLOCK_N, 1), tl.float32)
    for l in tl.static_range(SUB):
        m = tl.sum(tl.sum(tl.where(lag == l, M, 0.0), axis=2), axis=1)[:, None, None]
        in_H += _sw._powi(q, l) * m
        if l > 0:
            in_P += (l * _sw._powi(q, l - 1)) * m
    first = col == (rest // NDIR) * NB
    sH += tl.where(first, in_H, 0.0)
    sP += tl.where(first, in_P, 0.0)
    part = part_ptr + (col.to(tl.int64) * N + n3) * KD + row0 + d3
    plane = NCOL.to(tl.int64) * N * KD
    tl.store(part, sH, mask=st_m)
    tl.store(part + plane, a * sP, mask=st_m)
    tl.store(part + 2 * plane, H, mask=st_m)
    tl.store(part + 3 * plane, a * P, mask=st_m)


def param_operators(q: Tensor) -> Tensor:
    """(kd, 4 BLOCK_N SUB) float32 operators [R0 | R1 | Wu | Wp] of `_param_operators_kernel` for q (kd, N)."""
    kd, n = q.shape
    block_n = block_n_tc(n)
    op = _fwd._empty((kd, 4 * block_n * SUB), torch.float32, q.device)
    _param_operators_kernel[(kd,)](q.contiguous(), op, n, SUB=SUB, BLOCK_N=block_n)
    return op


def param_sweep_tc(x: Tensor, keep: Optional[Tensor], g: Tensor, a: Tensor, q: Tensor, state: Optional[Tensor],
                   buf: Optional[Tensor], chunk: int, group: int, bidirectional: bool, truncation: int,
                   block_d: Optional[int] = None, cols: int = 16, num_warps: int = NUM_WARPS
                   ) -> Tuple[Tensor, Tensor]:
    """(part (4, ngroups, B, N, kd), adj (nc, B, N, kd)) float32, as `ema_bwd.ema_param_grads` gets them from
    `_param_grad_kernel`, on tensor cores: x (B, L, D), keep (B, L) uint8 or None, g = dL/dz (B, L, D) float32,
    a, q (kd, N) float32, state (B, D, N) or None, buf the scan's chunk states or None (one chunk), in groups of
    `group` chunks of `chunk` steps. block_d channels (a power of two; default BLOCK_D, under the interpreter up
    to 64, whose cost is per program and step) x cols (group, batch row) columns (a power of two >= 16) per
    program. Refuses truncation and chunks that are not a multiple of 16."""
    if truncation > 0:
        raise ValueError("param_sweep_tc: the tensor-core parameter sweep does not take truncation; leave "
                         "tensor_cores off for a truncated EMA")
    check_ndim("param_sweep_tc", q.shape[1])
    if chunk % SUB:
        raise ValueError(f"param_sweep_tc: the tensor-core parameter sweep needs chunk to be a multiple of {SUB}, "
                         f"got {chunk}")
    if block_d is None:
        block_d = min(64, triton.next_power_of_2(x.shape[2])) if _sw.INTERPRET else BLOCK_D
    if block_d < 1 or cols < 16 or block_d & (block_d - 1) or cols & (cols - 1):
        raise ValueError(f"param_sweep_tc: block_d must be a power of two and cols a power of two >= 16, got "
                         f"{block_d}, {cols}")
    bsz, length, dim = x.shape
    kd, ndim = q.shape
    ndir = 2 if bidirectional else 1
    nc = triton.cdiv(length, chunk)
    ngroups = triton.cdiv(nc, group)
    ncol = ngroups * bsz
    ndb = triton.cdiv(dim, block_d)
    block_n = block_n_tc(ndim)
    part = _fwd._empty((4, ngroups, bsz, ndim, kd), torch.float32, x.device)
    adj = _fwd._empty((nc, bsz, ndim, kd), torch.float32, x.device)
    even = length % (group * chunk) == 0 and dim % block_d == 0 and ncol % cols == 0
    _tc_param_kernel[(ndb * ndir * triton.cdiv(ncol, cols),)](
        x, keep, g, a.contiguous(), q.contiguous(), param_operators(q), state, buf, part, adj, bsz, length, dim,
        ndim, chunk, group, ndb, ncol, NDIR=ndir, MASK_IN=keep is not None, HAS_S=state is not None,
        HAS_BUF=buf is not None, EVEN=even, EXACT_X=x.dtype != torch.float32, SUB=SUB, BLOCK_N=block_n,
        BD=block_d, NB=cols, num_warps=num_warps)
    return part, adj
