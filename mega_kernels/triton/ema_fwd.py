"""Triton fused multi-dimensional damped EMA: the chunked scan (forward, and the sweeps the backward reuses).

Maths (MEGA spec section 4; per channel d, expansion index n < N, coefficients (a, q, c) of
`mega_kernels.reference.ema.ema_coefficients`):

    h_t = q h_{t-1} + a u_t                       (u = x * mask; h_{-1} = the initial state S)
    e_t = sum_n c h_t                             (the EMA, a causal convolution with k[l] = sum_n c a q^l)
    y_t = silu(e_t + omega x_t)

computed directly as this damped recurrence in float32, never as an FFT. Truncation to K < L taps is exact:
h_t = q h_{t-1} + a (u_t - q^K u_{t-K}) removes the tap leaving the window. Bidirectional: rows [:D] of the
coefficients run forward in time, rows [D:] backward in time (h'_t = q' h'_{t+1} + a' u_t) and both EMAs add.

Initial states. A sweep starts from a "pre-decayed" state s and steps h_t = s + a u_t, s <- q h_t. A caller's
initial state S enters as s = q S; the backward's adjoint sweep (ema_bwd.py) enters the gradient of the final
state g_S as s = g_S directly, with no division by q.

Scaled state. The sweep that writes outputs keeps g = h / a instead of h: g_t = q g_{t-1} + u_t is one fused
multiply-add per state and step (u_t is shared by the N states), and e_t = sum_n (c a) g_t another, against
three operations per state for h. A state s enters as g = s / a. Coefficients a with |a| < TINY = 2^-64 are
raised to TINY: h = a g stays exact for the state's own decay, and the input path gains at most
TINY |c| sum |u|. Two limits follow, shared by the CUDA kernels (ema_kernels.cuh) and written in the README:
that error is below float32 resolution for |c| up to ~1e12 (MEGA's c = gamma / sqrt(N) is O(1)), not for a
huge c paired with a tiny a; and a caller's state overflows g once |S / a| passes ~3e38 (|S| ~ 1e19 where a
is raised to TINY), giving inf where the reference and the cpu kernels stay finite.

Chunked scan. A sequential loop over L per channel block is latency-bound, so L is cut in chunks of T steps
(steps [cT, cT + T), the last chunk shorter, whichever way a direction runs) and the chunks run in parallel.
A chunk's end state is linear in the state h_in just before it:

    h_end = q^T h_in + a H_loc,  H_loc = sum_{t in chunk} q^(t_end - t) (u_t - q^K u_{t-K}),

the chunk's own contribution from a zero state (one cheap sweep, H <- q H + u). Chunk c > 0 then sweeps from
s = q h_in(c); `buf` keeps h_in(c) of every chunk c > 0 (chunk 0 starts from the caller's s), and the backward
reuses it (ema_bwd.py). Two ways to fill it:

- three passes (robust; the only way for bidirectional): `_chunk_state_kernel` computes every chunk's local
  state in both directions (without truncation from one read of the chunk: `_local_states_bi`), `_carry_kernel`
  runs the short scan across chunks (forward order for rows [:D], backward order for rows [D:]) and leaves each
  chunk's h_in in place, `_scan_out_kernel` rescans each chunk from it and writes the output. Bidirectional
  chunks first sweep the backward rows (`_secondary_sweep`, storing their EMA in a float32 buffer, which is y
  itself for float32 outputs) then the forward rows.
- decoupled look-back (unidirectional, one launch; x is read from DRAM once and re-read from L2): programs
  take a ticket from an atomic counter (so chunk c-1 has always started before chunk c), compute H_loc, wait
  on the flag chunk c-1 sets once h_in(c) is published, publish h_in(c+1) = q^T h_in(c) + a H_loc, then sweep
  their chunk writing y. Chunk 0 publishes h_in(1) after its sweep.

Layout. One program holds BLOCK_D channels x N states in registers, each thread all N states of its channels
(coefficients and chunk states are stored (N, kd), channel-contiguous like x), so the sum over N is in-thread.
Size arguments are not specialized (`do_not_specialize`): one compiled kernel per flag combination, whatever
B, L, D, N (the loads are one element per thread, so divisibility hints would not vectorize anything).

The sweeps' building blocks (row tiles, one time step, a chunk's sweep, the local states) are in ema_sweep.py;
this file holds the three passes' kernels and `ema_scan`, the launcher. Its epilogue selects what a sweep
writes: the forward output silu(z), the backward's g = dL/dz = dL/dy * silu'(z) (float32), or the adjoint
dx = omega g + mask * e (see ema_bwd.py).
Shapes: x (B, L, D) contiguous; a, q, c (kd, N) float32, kd = 2D if bidirectional else D; omega (D,) float32;
mask (B, L) bool or None; state (B, D, N) float32 or None.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .ema_sweep import (EPI_DSILU, EPI_SILU, EPI_STORE, INTERPRET, _coef, _local_state, _local_states_bi, _powi,
                        _program, _secondary_sweep, _sweep)

Tensor = torch.Tensor

DEFAULT_CHUNK = 256
DEFAULT_BLOCK_D = 32


def _empty(shape, dtype, device) -> Tensor:
    """Allocates every kernel output and workspace (the tests patch it to fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit(do_not_specialize=["B", "L", "D", "N", "K", "CHUNK", "NDB"])
def _chunk_state_kernel(u_ptr, keep_ptr, a_ptr, q_ptr, buf_ptr, B, L, D, N, K, CHUNK, NDB,
                        NDIR: tl.constexpr, REVERSE: tl.constexpr, MASK_IN: tl.constexpr, TRUNC: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr,
                        BOTH: tl.constexpr = False):
    """buf[c, b, row, :] = a * H_loc of chunk c (steps [c T, c T + T) in physical time), for the rows
    [dirn * D, dirn * D + D) of direction dirn (0: primary, 1: reversed), scanning the chunk in that direction.
    BOTH (bidirectional, no truncation): one program per chunk and channel block writes both directions from one
    read of the chunk (_local_states_bi); else one program per direction."""
    c, b, dirn, offs_d = _program(tl.program_id(0), B, 1 if BOTH else NDIR, NDB, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    KD = NDIR * D
    v0 = c * CHUNK
    n = tl.minimum(CHUNK, L - v0)
    if BOTH:
        row_f = D if REVERSE else 0  # the rows that run forward in physical time
        row_b = 0 if REVERSE else D
        q_f = _coef(q_ptr, row_f, offs_n, offs_d, N, D, KD, 1.0)
        q_b = _coef(q_ptr, row_b, offs_n, offs_d, N, D, KD, 1.0)
        Hf, Hb = _local_states_bi(u_ptr, keep_ptr, q_f, q_b, b, v0, n, L, D, offs_d, MASK_IN, BLOCK_N, BLOCK_D,
                                  UNROLL)
        m = (offs_n[:, None] < N) & (offs_d[None, :] < D)
        ptr = buf_ptr + (c * B + b).to(tl.int64) * KD * N + offs_n[:, None] * KD + offs_d[None, :]
        tl.store(ptr + row_f, _coef(a_ptr, row_f, offs_n, offs_d, N, D, KD) * Hf, mask=m)
        tl.store(ptr + row_b, _coef(a_ptr, row_b, offs_n, offs_d, N, D, KD) * Hb, mask=m)
    else:
        row0 = dirn * D
        q = _coef(q_ptr, row0, offs_n, offs_d, N, D, KD, 1.0)
        a = _coef(a_ptr, row0, offs_n, offs_d, N, D, KD)
        qk = _powi(q, K)
        fwd = (dirn == 0) != REVERSE  # this direction runs forward in physical time
        t0 = tl.where(fwd, v0, v0 + n - 1)
        step = tl.where(fwd, 1, -1)
        H = _local_state(u_ptr, keep_ptr, q, qk, b, t0, step, n, L, D, K, offs_d, MASK_IN, TRUNC, BLOCK_N,
                         BLOCK_D, UNROLL)
        m = (offs_n[:, None] < N) & (offs_d[None, :] < D)
        ptr = buf_ptr + (c * B + b).to(tl.int64) * KD * N + offs_n[:, None] * KD + row0 + offs_d[None, :]
        tl.store(ptr, a * H, mask=m)


@triton.jit
def _compose(a1, b1, a2, b2):
    """The step h <- a h + b that applies (a1, b1) then (a2, b2): the combine of the carry's associative scan."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _carry_steps(buf_ptr, q, a, s0, m, b, B, L, KD, N, CHUNK, NC, e, em, rev, SCALE_LOC: tl.constexpr):
    """The chunks at positions m (GROUP, BLOCK) of each row's order as steps h <- dec h + loc of the state after
    them: dec = q^(chunk length), loc = its local end state (a H_loc when SCALE_LOC); the first chunk starts
    from the pre-decayed s0 instead (dec 0, loc + q^(length - 1) s0); positions outside [0, NC) are (1, 0)."""
    cc = tl.where(rev, NC - 1 - m, m)  # the physical chunk
    ok = em & (m >= 0) & (m < NC)
    loc = tl.load(buf_ptr + (cc * B + b).to(tl.int64) * KD * N + e, mask=ok, other=0.0)
    if SCALE_LOC:
        loc = a * loc
    steps = tl.minimum(CHUNK, L - cc * CHUNK)
    dec = tl.where(ok, _powi(q, tl.maximum(steps, 0)), 1.0)
    loc = tl.where(m == 0, loc + _powi(q, tl.maximum(steps - 1, 0)) * s0, loc)
    return tl.where(m == 0, 0.0, dec), loc


@triton.jit(do_not_specialize=["B", "L", "KD", "D", "N", "CHUNK", "NC"])
def _carry_kernel(buf_ptr, q_ptr, a_ptr, s0_ptr, B, L, KD, D, N, CHUNK, NC,
                  REVERSE: tl.constexpr, HAS_S0: tl.constexpr, SCALE_LOC: tl.constexpr, BLOCK: tl.constexpr,
                  GROUP: tl.constexpr = 16):
    """Scan across chunks: replace buf[c] (local end states a H_loc; H_loc alone when SCALE_LOC) by h_in(c), the
    state h just before chunk c in each row's direction (h_end = q^T h_in + a H_loc). Rows [:D] go in chunk order
    0..NC-1 (NC-1..0 when REVERSE), rows [D:] the other way. The first chunk of each order starts from the
    pre-decayed s0 (rows [:D]) or 0, so its h_end is q^(T-1) s0 + a H_loc, and its own buf entry is set to 0
    (_scan_out_kernel reads s0 there).

    GROUP chunks at a time: one (GROUP, BLOCK) load of their steps (h <- dec h + loc), an associative scan of
    them, one store. A chunk-by-chunk loop waits a full load latency per chunk (its loads cannot pass the stores
    to the same buffer): GPU run 2's B1 L65536 forward took 0.16 ms longer in chunks of 256 than of 1024, about
    what 192 more waits of ~0.8 us cost. Position j of group i0 holds chunk i0 - 1 + j, so the scan gives the
    state entering chunk i0 + j, the value stored there. The next group's steps are loaded before this group's
    stores overwrite the first of them (a barrier orders the two across the program's warps), and it starts
    from this group's last row.
    """
    b = tl.program_id(0)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    em = e < KD * N
    row = e % KD  # buf and q are (N, KD) per batch row (see _coef)
    rev = (row >= D) != REVERSE
    q = tl.load(q_ptr + e, mask=em, other=1.0)[None, :]
    a = q  # read only when SCALE_LOC
    if SCALE_LOC:
        a = tl.load(a_ptr + e, mask=em, other=0.0)[None, :]
    s0 = tl.zeros((1, BLOCK), tl.float32)
    if HAS_S0:
        s0 = tl.load(s0_ptr + b.to(tl.int64) * D * N + row * N + e // KD, mask=em & (row < D), other=0.0)[None, :]
    offs_g = tl.arange(0, GROUP)[:, None]
    e2, em2, rev2 = e[None, :], em[None, :], rev[None, :]
    h = tl.zeros((1, BLOCK), tl.float32)  # the state entering the group's first chunk
    dec, loc = _carry_steps(buf_ptr, q, a, s0, offs_g - 1, b, B, L, KD, N, CHUNK, NC, e2, em2, rev2, SCALE_LOC)
    for i0 in range(0, NC, GROUP):
        dec_n, loc_n = _carry_steps(buf_ptr, q, a, s0, offs_g + (i0 + GROUP - 1), b, B, L, KD, N, CHUNK, NC, e2,
                                    em2, rev2, SCALE_LOC)
        pa, pb = tl.associative_scan((dec, loc), 0, _compose)
        h_in = pa * h + pb  # (GROUP, BLOCK): entering chunks i0 .. i0 + GROUP - 1
        tl.debug_barrier()
        m = offs_g + i0
        cc = tl.where(rev2, NC - 1 - m, m)
        tl.store(buf_ptr + (cc * B + b).to(tl.int64) * KD * N + e2, h_in, mask=em2 & (m < NC))
        h = tl.sum(tl.where(offs_g == GROUP - 1, h_in, 0.0), axis=0)[None, :]
        dec, loc = dec_n, loc_n


@triton.jit(do_not_specialize=["B", "L", "D", "N", "K", "CHUNK", "NDB"])
def _scan_out_kernel(u_ptr, keep_ptr, out_ptr, acc_ptr, gy_ptr, a_ptr, q_ptr, c_ptr, omega_ptr, s0_ptr, buf_ptr,
                     final_ptr, dom_ptr, flag_ptr, ticket_ptr, B, L, D, N, K, CHUNK, NDB,
                     EPI: tl.constexpr, BIDIR: tl.constexpr, REVERSE: tl.constexpr, MASK_IN: tl.constexpr,
                     MASK_OUT: tl.constexpr, TRUNC: tl.constexpr, HAS_S0: tl.constexpr, CARRY: tl.constexpr,
                     LOOKBACK: tl.constexpr, WRITE_FINAL: tl.constexpr,
                     UNROLL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program = one chunk of one batch row b and BLOCK_D channels: sweep the reversed rows (bidirectional)
    into acc, then the primary rows writing the epilogue. Chunks are numbered c in the primary sweep's order:
    physical chunk cp = c (cp = nc - 1 - c when REVERSE) holds steps [cp T, cp T + T). Chunk c = 0 starts from
    s0 (or zero); chunk c > 0 from s = q h_in with h_in = buf[cp], left there by _carry_kernel (CARRY), or
    buf[c] published by chunk c-1 (LOOKBACK: chunk c waits for it, then publishes buf[c+1] = q^T h_in + a H_loc
    before its own sweep). EPI_DSILU also writes the chunk's share of the gradient of omega,
    dom[c, b, :] = sum_t dL/dz_t x_t."""
    if LOOKBACK:
        pid = tl.atomic_add(ticket_ptr, 1)
    else:
        pid = tl.program_id(0)
    per_chunk = B * NDB
    c = pid // per_chunk
    rem = pid % per_chunk
    b = rem // NDB
    offs_d = (rem % NDB) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    sm = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    nc = (L + CHUNK - 1) // CHUNK
    kd = D * (2 if BIDIR else 1)
    KD = kd
    if REVERSE:  # the physical chunk, its first step in the primary sweep and the sweep's direction
        cp = nc - 1 - c
    else:
        cp = c
    v0 = cp * CHUNK
    n = tl.minimum(CHUNK, L - v0)
    if REVERSE:
        tp0 = v0 + n - 1
        step = -1
    else:
        tp0 = v0
        step = 1
    st_off = offs_d[None, :] * N + offs_n[:, None]  # within a (D, N) state (s0, final)
    bst = offs_n[:, None] * kd + offs_d[None, :]     # within a chunk state of buf, (N, kd) like the coefficients
    # -- rows [D:] (bidirectional): reversed direction, from the chunk's far end --------------------------
    if BIDIR:
        _secondary_sweep(u_ptr, keep_ptr, acc_ptr, a_ptr, q_ptr, c_ptr, buf_ptr, b, cp, (rem % NDB) * BLOCK_D,
                         tp0 + (n - 1) * step, -step, n, B, L, D, N, K, MASK_IN, TRUNC, CARRY, UNROLL, BLOCK_N,
                         BLOCK_D)
        # the primary walk adds what that one stored in acc: with more threads than channels (a tile tuned
        # wider than one channel per thread) another thread may hold the element, so order the two walks
        tl.debug_barrier()
    # -- rows [:D]: primary direction -----------------------------------------------------------------------
    a = _coef(a_ptr, 0, offs_n, offs_d, N, D, KD)
    q = _coef(q_ptr, 0, offs_n, offs_d, N, D, KD, 1.0)
    cc = _coef(c_ptr, 0, offs_n, offs_d, N, D, KD)
    omega = tl.load(omega_ptr + offs_d, mask=offs_d < D, other=0.0)
    qk = _powi(q, K)
    s = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if HAS_S0:
        s = tl.load(s0_ptr + b.to(tl.int64) * D * N + st_off, mask=sm & (c == 0), other=0.0)
    if CARRY:
        s += q * tl.load(buf_ptr + (cp * B + b).to(tl.int64) * kd * N + bst, mask=sm & (c > 0), other=0.0)
    if LOOKBACK:
        pub = buf_ptr + (c * B + b).to(tl.int64) * D * N + bst  # h_in(c); chunk c publishes h_in(c + 1)
        nxt = pub + B * D * N
        if c > 0:
            H = _local_state(u_ptr, keep_ptr, q, qk, b, tp0, step, n, L, D, K, offs_d, MASK_IN, TRUNC,
                             BLOCK_N, BLOCK_D, UNROLL)
            flag = flag_ptr + (c - 1) * per_chunk + rem
            ready = tl.atomic_add(flag, 0, sem="acquire")
            while ready == 0:
                ready = tl.atomic_add(flag, 0, sem="acquire")
            h_in = tl.load(pub, mask=sm, other=0.0, volatile=True)
            s = q * h_in
            if c < nc - 1:
                tl.store(nxt, _powi(q, n) * h_in + a * H, mask=sm)
                tl.debug_barrier()
                tl.atomic_xchg(flag_ptr + c * per_chunk + rem, 1, sem="release")
    h, dom = _sweep(u_ptr, keep_ptr, out_ptr, acc_ptr, gy_ptr, a, q, cc, qk, omega, s, b, tp0, step, n, L, D, K,
                    offs_d, EPI, BIDIR, MASK_IN, MASK_OUT, TRUNC, UNROLL)
    if EPI == 2:
        tl.store(dom_ptr + (c * B + b).to(tl.int64) * D + offs_d, dom, mask=offs_d < D)
    if LOOKBACK:
        if (c == 0) & (nc > 1):
            tl.store(nxt, h, mask=sm)
            tl.debug_barrier()
            tl.atomic_xchg(flag_ptr + rem, 1, sem="release")
    if WRITE_FINAL:
        if c == nc - 1:
            tl.store(final_ptr + b.to(tl.int64) * D * N + st_off, h, mask=sm)


def run_carry(buf: Tensor, qT: Tensor, aT: Tensor, s0: Optional[Tensor], length: int, dim: int, chunk: int, *,
              reverse: bool, scale_loc: bool) -> None:
    """Launch `_carry_kernel` on buf (nc, B, N, kd) in place: each chunk's local end state becomes the state
    entering it. qT, aT: (N, kd) float32 (see _coef); s0 as in ema_scan."""
    nc, bsz, ndim, kd = buf.shape
    blk = 128
    _carry_kernel[(bsz, triton.cdiv(kd * ndim, blk))](
        buf, qT, aT, s0, bsz, length, kd, dim, ndim, chunk, nc, REVERSE=reverse, HAS_S0=s0 is not None,
        SCALE_LOC=scale_loc, BLOCK=blk)


def _register_cap(kernel: str, bidirectional: bool, epilogue: int, masked: bool, truncated: bool, carry: bool,
                  lookback: bool, block_d: int, num_warps: int, unroll: int, ndim: int) -> Optional[int]:
    """The maxnreg of a launch of `kernel` ("states": `_chunk_state_kernel`, "out": `_scan_out_kernel`) where a
    cap adds warps per SM without spilling, else None (the compiler's choice). Checked on sm_90 for the
    launcher's GPU tiles only (BLOCK_D 32, one warp, unroll 4, BLOCK_N 16: 9 <= N <= 16) over the flag
    combinations below (benchmarks/NOTES.md, session 9). With fewer states a cap hurts: ptxas then spends the
    registers it is allowed (bidirectional N <= 8: 90 -> 118 registers, 21 -> 17 warps/SM).
    - the chunk states of one direction, no mask: 80 (89 -> 80 registers, 21 -> 25 warps/SM, the same
      instructions per step).
    - the output pass of both directions: 128. The float32 forward goes from 144 registers (14 warps/SM) to 120
      (17), the backward's two scans from 145 / 141 to <= 128, with the same instructions per step; masks, an
      initial state and one chunk fit too.
    - the backward's dL/dz scan, one direction, no mask, several chunks: 96. That is 117 -> 96 registers in
      float32 (17 -> 21 warps/SM, 1% more instructions per step) and 126 -> 96 in bfloat16 (16 -> 21, 3%).
      With a mask it spills 8-24 B.
    No truncation anywhere (24-112 B of spill)."""
    if (block_d, num_warps, unroll, _block_n(ndim)) != (DEFAULT_BLOCK_D, 1, 4, 16) or truncated or lookback:
        return None
    if kernel == "states":
        return None if bidirectional or masked else 80
    if bidirectional:
        return 128
    if epilogue == EPI_DSILU and not masked and carry:
        return 96
    return None


def _block_n(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def block_d_for(dim: int, block_d: Optional[int] = None) -> int:
    """Channels per program: DEFAULT_BLOCK_D on a GPU; under the interpreter as many as possible (up to 256),
    since there the cost is per program-step, not per lane."""
    if block_d:
        return block_d
    return min(256, max(2, triton.next_power_of_2(dim))) if INTERPRET else DEFAULT_BLOCK_D


class Scan(NamedTuple):
    """What `ema_scan` returns."""
    out: Tensor              # (B, L, D) in the requested dtype
    final: Optional[Tensor]  # (B, D, N) float32 last state, when write_final
    buf: Optional[Tensor]    # (nc, B, N, kd) float32 h_in of each physical chunk after the first in its
                             # direction's order (None for a single chunk)
    chunk: int               # steps per chunk
    dom: Optional[Tensor]    # (nc, B, D) float32 per-chunk sums of dL/dz * x (EPI_DSILU only)


def ema_scan(u: Tensor, a: Tensor, q: Tensor, c: Tensor, omega: Tensor, keep: Optional[Tensor],
             s0: Optional[Tensor], *, bidirectional: bool, truncation: int, epilogue: int,
             out_dtype: torch.dtype, reverse: bool = False, mask_in: bool = True, gy: Optional[Tensor] = None,
             write_final: bool = False, chunk: Optional[int] = None, lookback: Optional[bool] = None,
             block_d: Optional[int] = None, num_warps: Optional[int] = None, unroll: int = 4,
             local: Optional[Tensor] = None, states: Optional[Tensor] = None, tensor_cores: bool = False,
             cols: int = 16, tc_precision: str = "split", register_cap: bool = True,
             out: Optional[Tensor] = None) -> Scan:
    """Run the chunked scan of u (B, L, D) (what it returns: `Scan`).

    a (input coefficient), q, c (output coefficient): (kd, N) float32. keep: (B, L) uint8 or None, applied to
    the input (mask_in) or to the EMA part of the EPI_DX output. s0: (B, D, N) float32 incoming pre-decayed
    state of the primary rows. reverse: the primary rows run backward in time. chunk: steps per chunk (None:
    DEFAULT_CHUNK; >= L: one sequential program per channel block). lookback: single-pass look-back (one
    direction only) instead of the three-pass carry (the default, measured faster). block_d, num_warps: channels
    and warps per program; unroll: time steps per loop iteration (rows arrive as (unroll, block_d) tiles loaded
    two iterations ahead). local: (nc, B, N, kd) float32 chunk-local states H_loc of u (not yet times a),
    computed elsewhere (the backward's parameter sweep does it for the adjoint scan): the three-pass carry then
    skips its chunk-state pass and turns `local` into its buf in place. states: the buf of an earlier scan of the
    same u, coefficients, s0 and chunking (the forward's, for the backward's recomputation; read only): the
    three-pass carry then skips both its chunk-state and carry passes. tensor_cores: the chunk-state and output
    passes as batched dots over sub-chunks of 16 steps (ema_tc.py; block_d channels (default: ema_tc's
    default_block_d) x cols columns per program, dots at tc_precision; with lookback, one launch for the
    forward's one direction); every epilogue but EPI_STORE, no truncation (refused). register_cap: the sweeps
    launch with a register cap where `_register_cap` allows one; False leaves registers to the compiler. out: a
    contiguous (B, L, D) out_dtype tensor the output is written into (the sweeps only; else allocated).
    """
    if out is not None and (tensor_cores or tuple(out.shape) != tuple(u.shape) or out.dtype != out_dtype
                            or not out.is_contiguous() or out.device != u.device):
        raise ValueError(f"ema_scan: out must be a contiguous {tuple(u.shape)} {out_dtype} tensor on {u.device} "
                         "(and the sweeps, not tensor_cores)")
    if tensor_cores:
        return _tensor_core_scan(u, a, q, c, omega, keep, s0, bidirectional, truncation, epilogue, out_dtype, reverse,
                                 mask_in, write_final, chunk, lookback, block_d, num_warps, local, states, gy, cols,
                                 tc_precision)
    bsz, length, dim = u.shape
    ndim = q.shape[1]
    chunk = int(chunk or DEFAULT_CHUNK)
    if chunk < 1:
        raise ValueError(f"ema_scan: chunk must be a positive number of steps, got {chunk}")
    check_unroll("ema_scan", unroll)
    nc = triton.cdiv(length, chunk)
    block_d = block_d_for(dim, block_d)
    ndb = triton.cdiv(dim, block_d)
    if lookback is None:
        # Three-pass carry by default: measured faster than the look-back on an H100 (GPU run 2,
        # benchmarks/results/gpu-run2): B8 L4096 D1024 N16 bf16 uni fwd 0.439 vs 0.615 ms, fwd+bwd 1.83 vs 2.67 ms.
        lookback = False
    lookback = lookback and nc > 1 and not bidirectional
    carry = nc > 1 and not lookback
    num_warps = num_warps or max(1, block_d // 32)
    block_n = _block_n(ndim)
    out = _empty(u.shape, out_dtype, u.device) if out is None else out
    acc = None
    if bidirectional:
        acc = out if out_dtype == torch.float32 else _empty(u.shape, torch.float32, u.device)
    final = _empty((bsz, dim, ndim), torch.float32, u.device) if write_final else None
    dom = _empty((nc, bsz, dim), torch.float32, u.device) if epilogue == EPI_DSILU else None
    kd = q.shape[0]
    buf = flags = ticket = None
    aT, qT, cT = (t.t().contiguous() for t in (a, q, c))  # (N, kd): see _coef
    if carry and states is not None:
        if tuple(states.shape) != (nc, bsz, ndim, kd):
            raise ValueError(f"ema_scan: states must be the (nc, B, N, kd) = {(nc, bsz, ndim, kd)} chunk states of "
                             f"an identical scan, got {tuple(states.shape)}")
        buf = states
    elif carry:
        if local is not None:
            buf = local
        else:
            buf = _empty((nc, bsz, ndim, kd), torch.float32, u.device)
            ndir = 2 if bidirectional else 1
            both = bidirectional and truncation == 0  # both directions from one read of each chunk
            cap = _register_cap("states", bidirectional, epilogue, keep is not None and mask_in, truncation > 0,
                                carry, lookback, block_d, num_warps, unroll, ndim) if register_cap else None
            _chunk_state_kernel[(nc * bsz * (1 if both else ndir) * ndb,)](
                u, keep, aT, qT, buf, bsz, length, dim, ndim, truncation, chunk, ndb, NDIR=ndir,
                REVERSE=reverse, MASK_IN=keep is not None and mask_in, TRUNC=truncation > 0,
                BLOCK_N=block_n, BLOCK_D=block_d, UNROLL=unroll, BOTH=both, num_warps=num_warps,
                **({"maxnreg": cap} if cap else {}))
        run_carry(buf, qT, aT, s0, length, dim, chunk, reverse=reverse, scale_loc=local is not None)
    elif lookback:
        buf = _empty((nc, bsz, ndim, dim), torch.float32, u.device)
        flags = torch.zeros(nc * bsz * ndb, dtype=torch.int32, device=u.device)
        ticket = torch.zeros(1, dtype=torch.int32, device=u.device)
    cap = _register_cap("out", bidirectional, epilogue, keep is not None, truncation > 0, carry, lookback, block_d,
                        num_warps, unroll, ndim) if register_cap else None
    _scan_out_kernel[(nc * bsz * ndb,)](
        u, keep, out, acc, gy, aT, qT, cT, omega, s0, buf, final, dom, flags, ticket, bsz, length, dim, ndim,
        truncation, chunk, ndb, EPI=epilogue, BIDIR=bidirectional, REVERSE=reverse,
        MASK_IN=keep is not None and mask_in,
        MASK_OUT=keep is not None and not mask_in, TRUNC=truncation > 0, HAS_S0=s0 is not None,
        CARRY=carry, LOOKBACK=lookback, WRITE_FINAL=write_final, UNROLL=unroll, BLOCK_N=block_n,
        BLOCK_D=block_d, num_warps=num_warps, **({"maxnreg": cap} if cap else {}))
    return Scan(out, final, buf, chunk, dom)


def check_unroll(fn: str, unroll: int, most: Optional[int] = None) -> None:
    """A ValueError unless unroll (time steps per loop iteration, a tile's rows) is a power of two (up to `most`)."""
    if not isinstance(unroll, int) or unroll < 1 or unroll & (unroll - 1) or (most is not None and unroll > most):
        upto = f" up to {most}" if most is not None else ""
        raise ValueError(f"{fn}: unroll must be a power of two{upto} (time steps per tile), got {unroll!r}")


def _tensor_core_scan(u, a, q, c, omega, keep, s0, bidirectional, truncation, epilogue, out_dtype, reverse, mask_in,
                      write_final, chunk, lookback, block_d, num_warps, local, states, gy, cols, precision) -> Scan:
    """ema_scan(..., tensor_cores=True): the passes of ema_tc.py, or a ValueError naming what they do not take."""
    refused = [name for name, given in (("truncation", truncation > 0), ("EPI_STORE", epilogue == EPI_STORE)) if given]
    if refused:
        raise ValueError(f"ema_scan: tensor_cores=True does not take {', '.join(refused)}; leave tensor_cores off "
                         "for those (the sweeps take every option)")
    from .ema_tc import ema_scan_tc  # imports this module

    out, buf, chunk, dom, final = ema_scan_tc(u, a, q, c, omega, keep, s0, bidirectional=bidirectional,
                                              out_dtype=out_dtype, chunk=chunk, block_d=block_d, cols=cols,
                                              num_warps=num_warps or 8, precision=precision, lookback=bool(lookback),
                                              epilogue=epilogue, gy=gy, reverse=reverse, mask_in=mask_in,
                                              states=states, local=local, write_final=write_final)
    return Scan(out, final, buf, chunk, dom)


def check_inputs(fn: str, x: Tensor, a: Tensor, q: Tensor, c: Tensor, omega: Tensor, mask: Optional[Tensor],
                 state: Optional[Tensor], bidirectional: bool, truncation: int) -> None:
    """Launcher checks: shapes, dtypes, devices and contiguity, with the fix in each message."""
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be (B, L, D), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{fn}: x must be float32, float16 or bfloat16 for the triton backend, got {x.dtype}; "
                        "use backend='reference' (or 'cpu') for float64")
    bsz, length, dim = x.shape
    kd = 2 * dim if bidirectional else dim
    for name, t in (("a", a), ("q", q), ("c", c)):
        if t.dim() != 2 or t.shape[0] != kd or t.shape[1] != q.shape[1] or t.dtype != torch.float32:
            raise ValueError(f"{fn}: {name} must be ({kd}, N) float32, got {tuple(t.shape)} {t.dtype}")
    if tuple(omega.shape) != (dim,) or omega.dtype != torch.float32:
        raise ValueError(f"{fn}: omega must be ({dim},) float32, got {tuple(omega.shape)} {omega.dtype}")
    if mask is not None and (tuple(mask.shape) != (bsz, length) or mask.dtype != torch.bool):
        raise ValueError(f"{fn}: mask must be (B, L) = ({bsz}, {length}) bool, got {tuple(mask.shape)} {mask.dtype}")
    if state is not None:
        if bidirectional:
            raise ValueError(f"{fn}: a state exists only for a unidirectional EMA; pass bidirectional=False")
        if tuple(state.shape) != (bsz, dim, q.shape[1]) or state.dtype != torch.float32:
            raise ValueError(f"{fn}: state must be (B, D, N) = ({bsz}, {dim}, {q.shape[1]}) float32, "
                             f"got {tuple(state.shape)} {state.dtype}")
    if truncation < 0:
        raise ValueError(f"{fn}: truncation must be >= 0 (0 = none), got {truncation}")
    for name, t in (("x", x), ("a", a), ("q", q), ("c", c), ("omega", omega), ("mask", mask), ("state", state)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}; move both to one device")
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous; call .contiguous() first")


def keep_of(mask: Optional[Tensor]) -> Optional[Tensor]:
    """The (B, L) bool mask as uint8 for the kernels (no copy)."""
    return None if mask is None else mask.view(torch.uint8)


def chunk_states_shape(x_shape, n: int, bidirectional: bool, chunk: Optional[int] = None) -> Tuple[int, ...]:
    """Shape of the chunk states `ema_fwd(..., return_states=True)` returns for x of x_shape (B, L, D): (nc, B, N,
    kd) when the default three-pass carry runs (more than one chunk), else (0,). Also the fake op's."""
    bsz, length, dim = x_shape
    nc = (length + (chunk or DEFAULT_CHUNK) - 1) // (chunk or DEFAULT_CHUNK)
    return (nc, bsz, n, 2 * dim if bidirectional else dim) if nc > 1 else (0,)


def ema_fwd(x: Tensor, a: Tensor, q: Tensor, c: Tensor, omega: Tensor, mask: Optional[Tensor],
            state: Optional[Tensor], bidirectional: bool, truncation: int, return_state: bool,
            return_states: bool = False, **tuning) -> Tuple[Tensor, ...]:
    """y = silu(EMA(x * mask) + omega * x) (B, L, D) in x's dtype, and the final state (B, D, N) float32
    (an empty tensor unless return_state); with return_states also the chunk states (`chunk_states_shape`), which
    `ema_bwd(..., states=)` reuses instead of recomputing them. `tuning`: chunk, lookback, block_d, num_warps,
    unroll of `ema_scan`."""
    check_inputs("ema_fwd", x, a, q, c, omega, mask, state, bidirectional, truncation)
    if truncation >= x.shape[1]:
        truncation = 0
    s0 = None if state is None else (q * state).contiguous()
    y, final, buf, *_ = ema_scan(x, a, q, c, omega, keep_of(mask), s0, bidirectional=bidirectional,
                                 truncation=truncation, epilogue=EPI_SILU, out_dtype=x.dtype,
                                 write_final=return_state, **tuning)
    if return_state and x.shape[1] == 0:  # no step ran: the final state is the initial one
        final = state.clone() if state is not None else final.zero_()
    final = final if return_state else x.new_empty(0, dtype=torch.float32)
    if not return_states:
        return y, final
    if tuning.get("lookback") or buf is None:  # a look-back buf is laid out by sweep order, not reusable
        buf = x.new_empty(0, dtype=torch.float32)
    return y, final, buf
