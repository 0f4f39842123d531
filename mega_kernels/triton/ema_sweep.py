"""The building blocks of every Triton EMA sweep kernel: coefficient and row-tile loads (two tiles ahead), one
time step of the scaled-state recurrence with its epilogue, a chunk's sweep, and the chunk-local states.

The maths (recurrence, truncation, pre-decayed and scaled states, chunking, layout) is explained once, at the
top of ema_fwd.py, whose three passes (and the backward's, ema_bwd.py; the decoding step, ema_step.py) are
built from these functions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

EPI_STORE, EPI_SILU, EPI_DSILU, EPI_DX = 0, 1, 2, 3  # what the primary sweep writes (see _sweep)
INTERPRET = interpreting()
TINY = tl.constexpr(2.0 ** -64)  # smallest |a| the scaled-state sweep divides by (see _safe)
FAST_SIGMOID = tl.constexpr(not INTERPRET and torch.version.hip is None)  # PTX available (see _sigmoid)


@triton.jit
def _coef(ptr, row0, offs_n, offs_d, N, D, KD, other=0.0):
    """(BLOCK_N, BLOCK_D) tile of rows row0 + offs_d of a coefficient, stored transposed as (N, KD) so that the
    tile is contiguous along the channels like x (each thread then holds all N states of its channels, and
    the sum over N needs no data exchange); padding lanes are `other`."""
    m = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    return tl.load(ptr + offs_n[:, None] * KD + row0 + offs_d[None, :], mask=m, other=other)


@triton.jit
def _program(pid, B, NDIR, NDB, BLOCK_D: tl.constexpr):
    """Program pid of a grid ordered (outer, b, direction, channel block) -> (outer, b, direction, channels)."""
    per_outer = B * NDIR * NDB
    rb = pid % (NDIR * NDB)
    offs_d = (rb % NDB) * BLOCK_D + tl.arange(0, BLOCK_D)
    return pid // per_outer, (pid % per_outer) // (NDIR * NDB), rb // NDB, offs_d


@triton.jit
def _powi(q, k):
    """q ** k for q in [0, 1] (float32 tile) and an integer k >= 0 (a tensor, or a constexpr when Triton
    specializes an argument equal to 1); q ** 0 = 1 even for q = 0."""
    kf = tl.zeros_like(q) + k
    return tl.where(kf == 0, 1.0, tl.exp2(kf * tl.log2(q)))


@triton.jit
def _load_in(u_ptr, keep_ptr, b, t, L, D, offs_d, valid, MASK_IN: tl.constexpr):
    """Row t of batch b of u as float32, (BLOCK_D,): (raw, masked). `valid` (scalar) zeroes a missing row."""
    t_c = tl.minimum(tl.maximum(t, 0), L - 1)
    row = b.to(tl.int64) * L + t_c
    raw = tl.load(u_ptr + row * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    raw = tl.where(valid, raw, 0.0)
    um = raw
    if MASK_IN:
        keep = tl.load(keep_ptr + row)
        um = tl.where(keep != 0, raw, 0.0)
    return raw, um


@triton.jit
def _row_tile(u_ptr, keep_ptr, row, step, rows_left, D, offs_k, offs_d, MASK_IN: tl.constexpr):
    """(UNROLL, BLOCK_D) float32 tile of the rows row, row + step, ... (UNROLL = len(offs_k)) of u, masked when
    MASK_IN; rows k >= rows_left (past the loop's end) are zero."""
    ok = offs_k < rows_left
    base = u_ptr + row * D                                   # one 64-bit address, then 32-bit offsets
    tile = tl.load(base + (offs_k * (step * D))[:, None] + offs_d[None, :],
                   mask=ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    if MASK_IN:
        tile = tl.where(tl.load(keep_ptr + row + offs_k * step, mask=ok, other=0)[:, None] != 0, tile, 0.0)
    return tile


@triton.jit
def _tiles_ahead(u_ptr, keep_ptr, row, step, rows_left, D, offs_k, offs_d, MASK_IN: tl.constexpr,
                 UNROLL: tl.constexpr):
    """The first two tiles of a loop over rows_left rows from `row`, UNROLL rows per iteration."""
    return (_row_tile(u_ptr, keep_ptr, row, step, rows_left, D, offs_k, offs_d, MASK_IN),
            _row_tile(u_ptr, keep_ptr, row + UNROLL * step, step, rows_left - UNROLL, D, offs_k, offs_d, MASK_IN))


@triton.jit
def _advance(u_ptr, keep_ptr, nxt, nxt2, row, step, rows_left, D, offs_k, offs_d, MASK_IN: tl.constexpr,
             UNROLL: tl.constexpr):
    """One iteration of the two-ahead tile pipeline whose current rows start at `row` (rows_left from there):
    returns (the tile to compute now, the next one, the load issued for two iterations ahead)."""
    ahead = _row_tile(u_ptr, keep_ptr, row + 2 * UNROLL * step, step, rows_left - 2 * UNROLL, D, offs_k, offs_d,
                      MASK_IN)
    return nxt, nxt2, ahead


@triton.jit
def _tile_row(tile, offs_k, k: tl.constexpr):
    """Row k of a tile whose first axis sits in each thread's registers (a register pick, no data exchange)."""
    return tl.sum(tl.where(offs_k[:, None] == k, tile, 0.0), axis=0)


@triton.jit
def _local_state(u_ptr, keep_ptr, q, qk, b, t0, step, n, L, D, K, offs_d,
                 MASK_IN: tl.constexpr, TRUNC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 UNROLL: tl.constexpr):
    """H_loc = sum over the n steps t0, t0+step, ... of q^(steps to the end) (u_t - q^K u_{t - step K}).
    Rows come in tiles of UNROLL loaded two iterations ahead (see _sweep)."""
    row = b.to(tl.int64) * L + t0  # (b, t) row index, moved by `step` each iteration
    H = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    n_main = (n // UNROLL) * UNROLL
    offs_k = tl.arange(0, UNROLL)
    nxt, nxt2 = _tiles_ahead(u_ptr, keep_ptr, row, step, n_main, D, offs_k, offs_d, MASK_IN, UNROLL)
    for i in tl.range(0, n_main, UNROLL, num_stages=1):
        cur, nxt, nxt2 = _advance(u_ptr, keep_ptr, nxt, nxt2, row, step, n_main - i, D, offs_k, offs_d, MASK_IN,
                                  UNROLL)
        for k in tl.static_range(UNROLL):
            H = q * H + _tile_row(cur, offs_k, k)[None, :]
            if TRUNC:
                td = t0 + (i + k - K) * step
                _, ud = _load_in(u_ptr, keep_ptr, b, td, L, D, offs_d, (td >= 0) & (td < L), MASK_IN)
                H = H - qk * ud[None, :]
        row += UNROLL * step
    for i in tl.range(n_main, n):
        _, um = _load_in(u_ptr, keep_ptr, b, t0 + i * step, L, D, offs_d, True, MASK_IN)
        H = q * H + um[None, :]
        if TRUNC:
            td = t0 + (i - K) * step
            _, ud = _load_in(u_ptr, keep_ptr, b, td, L, D, offs_d, (td >= 0) & (td < L), MASK_IN)
            H = H - qk * ud[None, :]
        row += step
    return H


@triton.jit
def _local_states_bi(u_ptr, keep_ptr, q_f, q_b, b, t0, n, L, D, offs_d, MASK_IN: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr):
    """Both directions' local states of the chunk [t0, t0 + n) from one walk forward in time, so u is read once:
    (H_f of the rows running forward, as _local_state; H_b = sum_t q_b^(t - t0) u_t of the rows running backward).
    H_b folds each tile of UNROLL rows by Horner from its last row, r = sum_k q_b^k u_k, and adds P r, where
    P = q_b^(tile's first row - t0): UNROLL + 1 operations per state and tile against UNROLL for H_f. No truncation."""
    row = b.to(tl.int64) * L + t0
    Hf = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    Hb = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    P = tl.full((BLOCK_N, BLOCK_D), 1.0, tl.float32)
    q_tile = q_b
    for k in tl.static_range(UNROLL - 1):
        q_tile = q_tile * q_b
    n_main = (n // UNROLL) * UNROLL
    offs_k = tl.arange(0, UNROLL)
    nxt, nxt2 = _tiles_ahead(u_ptr, keep_ptr, row, 1, n_main, D, offs_k, offs_d, MASK_IN, UNROLL)
    for i in tl.range(0, n_main, UNROLL, num_stages=1):
        cur, nxt, nxt2 = _advance(u_ptr, keep_ptr, nxt, nxt2, row, 1, n_main - i, D, offs_k, offs_d, MASK_IN, UNROLL)
        for k in tl.static_range(UNROLL):
            Hf = q_f * Hf + _tile_row(cur, offs_k, k)[None, :]
        r = _tile_row(cur, offs_k, UNROLL - 1)[None, :]
        for k in tl.static_range(1, UNROLL):
            r = q_b * r + _tile_row(cur, offs_k, UNROLL - 1 - k)[None, :]
        Hb += P * r
        P = P * q_tile
        row += UNROLL
    for i in tl.range(n_main, n):
        raw, um = _load_in(u_ptr, keep_ptr, b, t0 + i, L, D, offs_d, True, MASK_IN)
        Hf = q_f * Hf + um[None, :]
        Hb += P * um[None, :]
        P = P * q_b
    return Hf, Hb


@triton.jit
def _sigmoid(z):
    """sigmoid(z) = 1 / (1 + 2^(-z log2 e)). On a GPU as four instructions: the approximate exp2 and reciprocal
    (2 and 1 ulp) with denormals flushed, instead of tl.sigmoid's range-checked division and denormal-safe exp2
    (13 SASS instructions; the sweep issues it every step). Flushing changes silu(z) only by < 1e-37 absolute.
    Under the interpreter and on ROCm (no PTX) it is tl.sigmoid."""
    if FAST_SIGMOID:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000; "
            "rcp.approx.ftz.f32 $0, t; }", "=r,r", [z], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.sigmoid(z)


@triton.jit
def _safe(a):
    """The input coefficient of the scaled state, a with magnitudes below TINY raised to TINY (see "Scaled
    state" above); padding lanes (a = 0) give TINY too, harmlessly (their c is 0)."""
    return tl.where(tl.abs(a) < TINY, TINY, a)


@triton.jit
def _step(u_ptr, keep_ptr, out_at, acc_at, gy_at, keep_at, raw, q, ca, qk, omega, g, b, row, td, L, D, K, offs_d,
          EPI: tl.constexpr, ADD_ACC: tl.constexpr, MASK_IN: tl.constexpr, MASK_OUT: tl.constexpr,
          TRUNC: tl.constexpr):
    """One time step of `_sweep` whose input row `raw` (BLOCK_D,) is loaded: g <- q g + u_t (- q^K u_td), e =
    sum_n (c a) g, then the epilogue; returns the new g and, for EPI_DSILU, the step's term dL/dz * x of the
    gradient of omega (else zeros). The step's rows of out, acc, gy and keep are row `row` counted from the
    pointers out_at, acc_at, gy_at (rows of D) and keep_at (see _sweep); u_ptr and keep_ptr are the arrays
    themselves, for the row (b, td) leaving a truncated window."""
    dmask = offs_d < D
    off = row * D + offs_d
    raw = raw.to(tl.float32)
    w = tl.zeros_like(raw)
    um = raw
    if MASK_IN or MASK_OUT:
        keep = tl.load(keep_at + row)
    if MASK_IN:
        um = tl.where(keep != 0, raw, 0.0)
    g = q * g + um[None, :]
    if TRUNC:
        _, ud = _load_in(u_ptr, keep_ptr, b, td, L, D, offs_d, (td >= 0) & (td < L), MASK_IN)
        g = g - qk * ud[None, :]
    e = tl.sum(ca * g, axis=0)
    if ADD_ACC:
        e += tl.load(acc_at + off, mask=dmask, other=0.0)
    if EPI == 0:
        tl.store(acc_at + off, e, mask=dmask)
    elif EPI == 3:
        if MASK_OUT:
            e = tl.where(keep != 0, e, 0.0)
        tl.store(out_at + off, (omega * raw + e).to(out_at.dtype.element_ty), mask=dmask)
    else:
        z = e + omega * raw
        sig = _sigmoid(z)
        if EPI == 1:
            tl.store(out_at + off, (z * sig).to(out_at.dtype.element_ty), mask=dmask)
        else:
            gy = tl.load(gy_at + off, mask=dmask, other=0.0).to(tl.float32)
            gz = gy * sig * (1.0 + z * (1.0 - sig))
            tl.store(out_at + off, gz, mask=dmask)
            w = gz * raw
    return g, w


@triton.jit
def _sweep(u_ptr, keep_ptr, out_ptr, acc_ptr, gy_ptr, a, q, c, qk, omega, s, b, t0, step, n, L, D, K, offs_d,
           EPI: tl.constexpr, ADD_ACC: tl.constexpr, MASK_IN: tl.constexpr, MASK_OUT: tl.constexpr,
           TRUNC: tl.constexpr, UNROLL: tl.constexpr):
    """Run the recurrence over n >= 1 steps from t0 from the pre-decayed state s; return the last h and, for
    EPI_DSILU, sum_t dL/dz_t x_t over the n steps (BLOCK_D,) (the gradient of omega; zeros otherwise).

    In scaled-state form (a' = _safe(a)): g = s / a' + u_t0, then g <- q g + u_t (- q^K u_{t-step K}), and
    e_t = sum_n (c a') g (h = a' g).
    EPI_STORE: acc[t] = e (float32).  EPI_SILU: out[t] = silu(z), z = e (+ acc[t]) + omega x_t.
    EPI_DSILU: out[t] = gy[t] * silu'(z) (float32).  EPI_DX: out[t] = omega u_t + keep_t * (e (+ acc[t])).
    UNROLL steps per iteration: their row loads do not depend on g, so they are all in flight at once. Each
    iteration points at its first row of out, acc, gy and keep once, and its steps address rows 0, step, ...
    from there: with absolute rows the compiler kept a 64-bit induction variable per unrolled row and array
    (sm_90 SASS per step: forward 54.2 -> 50.8, the g scan 64.8 -> 58.8).
    """
    USE_ACC: tl.constexpr = ADD_ACC or EPI == 0
    USE_KEEP: tl.constexpr = MASK_IN or MASK_OUT
    a = _safe(a)
    ca = c * a
    dmask = offs_d < D
    row = b.to(tl.int64) * L + t0  # (b, t) row index, moved by `step` each step
    first = tl.load(u_ptr + row * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
    g, dom = _step(u_ptr, keep_ptr, out_ptr, acc_ptr, gy_ptr, keep_ptr, first, 1.0, ca, qk, omega, s / a, b, row,
                   t0 - K * step, L, D, K, offs_d, EPI, ADD_ACC, MASK_IN, MASK_OUT, TRUNC)
    row += step
    # Main loop: UNROLL steps per iteration from a (UNROLL, BLOCK_D) tile of rows loaded two iterations ahead,
    # so three tiles' loads are in flight (the time loop is otherwise bound by load latency).
    n_main = 1 + ((n - 1) // UNROLL) * UNROLL
    offs_k = tl.arange(0, UNROLL)
    nxt, nxt2 = _tiles_ahead(u_ptr, keep_ptr, row, step, n_main - 1, D, offs_k, offs_d, False, UNROLL)
    for i in tl.range(1, n_main, UNROLL, num_stages=1):
        cur, nxt, nxt2 = _advance(u_ptr, keep_ptr, nxt, nxt2, row, step, n_main - i, D, offs_k, offs_d, False,
                                  UNROLL)
        out_at = out_ptr + row * D
        acc_at, gy_at, keep_at = acc_ptr, gy_ptr, keep_ptr  # None where the variant has no such array
        if USE_ACC:
            acc_at = acc_ptr + row * D
        if EPI == 2:
            gy_at = gy_ptr + row * D
        if USE_KEEP:
            keep_at = keep_ptr + row
        for k in tl.static_range(UNROLL):
            raw = _tile_row(cur, offs_k, k)
            g, w = _step(u_ptr, keep_ptr, out_at, acc_at, gy_at, keep_at, raw, q, ca, qk, omega, g, b, k * step,
                         t0 + (i + k - K) * step, L, D, K, offs_d, EPI, ADD_ACC, MASK_IN, MASK_OUT, TRUNC)
            if EPI == 2:
                dom += w
        row += UNROLL * step
    for i in tl.range(n_main, n):
        last = tl.load(u_ptr + row * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
        g, w = _step(u_ptr, keep_ptr, out_ptr, acc_ptr, gy_ptr, keep_ptr, last, q, ca, qk, omega, g, b, row,
                     t0 + (i - K) * step, L, D, K, offs_d, EPI, ADD_ACC, MASK_IN, MASK_OUT, TRUNC)
        if EPI == 2:
            dom += w
        row += step
    return a * g, dom


@triton.jit(noinline=True)
def _secondary_sweep(u_ptr, keep_ptr, acc_ptr, a_ptr, q_ptr, c_ptr, buf_ptr, b, cp, d0, t0, step, n, B, L, D, N, K,
                     MASK_IN: tl.constexpr, TRUNC: tl.constexpr, CARRY: tl.constexpr, UNROLL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A bidirectional chunk's first sweep (_scan_out_kernel): the rows [D:] of channels d0 + [0, BLOCK_D), from
    the state buf[cp] of physical chunk cp (CARRY; else zero), their EMA into acc. Not inlined, and so taking
    scalars only: inlined, the compiler kept values of both sweeps live across this one (sm_90, fp32: 249
    registers, 8 warps/SM; called: 144, 14, and 120, 17 under the launcher's cap, _register_cap)."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    a = _coef(a_ptr, D, offs_n, offs_d, N, D, 2 * D)
    q = _coef(q_ptr, D, offs_n, offs_d, N, D, 2 * D, 1.0)
    s = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if CARRY:
        m = (offs_n[:, None] < N) & (offs_d[None, :] < D)
        s = q * tl.load(buf_ptr + (cp * B + b).to(tl.int64) * 2 * D * N + offs_n[:, None] * 2 * D + D
                        + offs_d[None, :], mask=m, other=0.0)
    # EPI_STORE writes acc only: acc stands in for the out and gy pointers it never reads.
    _sweep(u_ptr, keep_ptr, acc_ptr, acc_ptr, acc_ptr, a, q, _coef(c_ptr, D, offs_n, offs_d, N, D, 2 * D),
           _powi(q, K), 0.0, s, b, t0, step, n, L, D, K, offs_d, 0, False, MASK_IN, False, TRUNC, UNROLL)
