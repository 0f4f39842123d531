"""Triton fused EMA backward: gradients of x, a, q, c, omega and the initial state (see ema_fwd.py for the
forward maths and the chunked scan this file reuses).

Derivation (one channel, the forward rows; u = x * mask, h_{-1} = S, truncation K optional):

    h_t = q h_{t-1} + a (u_t - q^K u_{t-K}),  e_t = sum_n c h_t,  z_t = e_t (+ backward rows) + omega x_t,
    y_t = silu(z_t).
    g_t   = dL/dz_t = dL/dy_t * silu'(z_t),   silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
    domega = sum_{b,t} g_t x_t
    dc[n]  = sum_t g_t h_t[n] = a sum_t g_t H_t[n] + S sum_t g_t q^(t+1)   (h_t = a H_t + q^(t+1) S)
    da[n]  = c sum_t g_t H_t[n] + gS H_{L-1},  H_t = dh_t/da = q H_{t-1} + u_t - q^K u_{t-K},  H_{-1} = 0
    dq[n]  = c sum_t g_t P_t[n] + gS P_{L-1},  P_t = dh_t/dq = q P_{t-1} + h_{t-1} - a K q^(K-1) u_{t-K},
             P_{-1} = 0
    (gS = dL/d(final state h_{L-1}), present when the forward returned its state.)

All three parameter sums are forward sweeps that recompute h, so no L x N state is ever stored. They run in
parallel over groups of whole scan chunks (`_param_grad_kernel`): a group starts from the true h of the forward
scan's `buf` (h_in of its first chunk) and runs H_run, P_run from zero; since H and P are linear recurrences with
decay q, the true values are H_t = H_run_t + q^m H_in, P_t = P_run_t + q^m P_in (m = steps since the group
start; P_run already sees the true h), so each group writes sum g H_run, sum g P_run, its H_run, P_run end
values, and per chunk A = sum_j g q^j (j = steps since the chunk start); `_param_carry_kernel` builds
G = sum g q^(m+1) from the A of the group's chunks and walks the groups in order carrying
H_in <- q^T H_in + H_run_end (P likewise) and adding H_in G, P_in G. The backward rows of a bidirectional EMA
run the same sweeps backward in time. The sweep that computes z recomputes the forward from the chunk states
the forward saved (ema_fwd(..., return_states=True)) when it has them.

The input gradient is the adjoint of the convolution, an anti-causal EMA of g:

    lambda_t = dL/dh_t = q lambda_{t+1} + c (g_t - q^K g_{t+K}),  lambda_{L-1} = c g_{L-1} + gS
    dx_t = omega g_t + mask_t * sum_n a lambda_t[n]      (+ the same with a forward-running adjoint of the
                                                            backward rows, when bidirectional)
    dS = q lambda_0

which is the forward's chunked scan with a <-> c swapped, time reversed, the mask moved to the output and the
pre-decayed initial state s = gS (ema_fwd.py's state convention). So the backward is three steps of work:
(1) the forward scan recomputing z and writing g (float32) and per-chunk sums of g x (domega), (2) the
grouped parameter sweep and its carry, writing per-program partial sums reduced in a fixed order (the carry
kernel, then torch.sum over the batch; no atomics: the same result on every run), and each chunk's
sum_j g q^j, which is the adjoint scan's chunk-local state (without truncation), (3) the adjoint scan, from
those local states straight to its carry and output pass, writing dx and lambda_0.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import ema_fwd as _fwd
from . import ema_sweep as _sw
from .ema_fwd import _block_n, block_d_for, check_inputs, ema_scan, keep_of
from .ema_sweep import EPI_DSILU, EPI_DX, _coef, _load_in, _powi

Tensor = torch.Tensor
PARAM_GROUP_STEPS = 1024  # steps per program of the parameter sweep (a multiple of the scan's chunk)
# A unidirectional backward whose float32 g = dL/dz would exceed this many bytes runs in segments of whole chunks,
# right to left, each with the state entering it and the state gradient leaving it (`_segmented_bwd`): one
# segment's g is alive at a time. B1 L1048576 D1024: 4 GiB of g in one piece, beside 8 GiB of x, y and their
# bfloat16 gradients (the issue-3 peak, 1.5x those bytes, needs it).
SEGMENT_BYTES = 1 << 30
# The backward's float32 workspace (g, and the float32 sum of a bidirectional 16-bit dx) may take the bytes of x
# or this much, whichever is more: issue 3's peak (x, y, dx, dy and the rest at most 1.5x the bytes of those four)
# leaves room for one x-sized workspace. A larger one runs in groups of batch rows (contiguous slices: no copies,
# `_batched_bwd`), else (one row, unidirectional, untruncated) in time segments of at most that much.
WORKSPACE_FLOOR_BYTES = 64 << 20
PARAM_SUB = 64  # steps per block of the parameter sweep's two-level sums (a whole number of unroll tiles)


@triton.jit
def _param_step(um, g, ud, hs, hp, H, P, pw, bH, bP, bA, q, qk, kqk1, TRUNC: tl.constexpr):
    """One step of the parameter sweep from the masked input um, g = dL/dz and (TRUNC) the input ud leaving the
    window, each broadcastable to the states: advance hs (= h / a'), H_run and P_run (scaled, P = a' Ps) to this
    step, add g H, g P and g pw (pw = q^j, j = steps since the chunk start) to the block sums, then advance pw.
    hp is hs as P's recurrence sees it: hs itself, or 0 for a state that sits still (with q = 1, um = g = 0:
    ema_tc_bwd's columns outside their walk)."""
    P = q * P + hp
    H = q * H + um
    hs = q * hs + um
    if TRUNC:
        P = P - kqk1 * ud
        H = H - qk * ud
        hs = hs - qk * ud
    return hs, H, P, pw * q, bH + g * H, bP + g * P, bA + g * pw


@triton.jit(do_not_specialize=["B", "L", "D", "N", "K", "CHUNK", "GROUP", "NDB"])
def _param_grad_kernel(x_ptr, keep_ptr, g_ptr, a_ptr, q_ptr, s_ptr, buf_ptr, part_ptr, adj_ptr,
                       B, L, D, N, K, CHUNK, GROUP, NDB, NDIR: tl.constexpr, MASK_IN: tl.constexpr,
                       TRUNC: tl.constexpr, HAS_S: tl.constexpr, HAS_BUF: tl.constexpr, UNROLL: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SUB: tl.constexpr = PARAM_SUB):
    """One program = one group of GROUP scan chunks (GROUP * CHUNK steps), one batch row, one direction, BLOCK_D
    channels. From the true incoming h (S, 0, or buf = h_in of the group's first chunk in its direction) it runs
    h, H_run, P_run (H, P from zero) and writes four (BLOCK_N, BLOCK_D) partials to part[:, group, b, row]:
    sum g H_run, sum g P_run, H_run end, P_run end; and for each chunk cp of the group
    adj[cp, b, :, row] = A_cp = sum_j g q^j (j = steps since the chunk start in the direction's order).
    A_cp is the chunk-local state of the adjoint scan (ema_bwd), which then needs no chunk-state pass of its own,
    and _param_carry_kernel builds G = sum g q^(m+1) (m = steps since the group start) from it. (sum g h needs no
    sweep: h = a H + q^(t+1) S; sum g x comes from the scan that wrote g.) Rows of x and g arrive as
    (UNROLL, BLOCK_D) tiles loaded two iterations ahead (ema_sweep._sweep), the pipeline restarting at each chunk:
    with one row of each in flight per step the sweep would wait on memory, not on its arithmetic."""
    grp, b, dirn, offs_d = _sw._program(tl.program_id(0), B, NDIR, NDB, BLOCK_D)
    per_group = B * NDIR * NDB
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, UNROLL)
    dmask = offs_d < D
    sm = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    row0 = dirn * D
    kd = NDIR * D
    q = _coef(q_ptr, row0, offs_n, offs_d, N, D, kd, 1.0)
    qk = _powi(q, K)
    kqk1 = K * _powi(q, K - 1)
    nc = (L + CHUNK - 1) // CHUNK
    c_first = grp * GROUP                                  # the group's scan chunks: [c_first, c_last]
    c_last = tl.minimum(c_first + GROUP, nc) - 1
    c_in = tl.where(dirn == 0, c_first, c_last)            # the chunk whose h_in starts this direction's sweep
    st = offs_d[None, :] * N + offs_n[:, None]               # within a (D, N) state
    bst = offs_n[:, None] * kd + row0 + offs_d[None, :]     # within an (N, kd) chunk state or partial
    h = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if HAS_BUF:
        from_buf = (dirn == 0) & (c_in > 0) | (dirn == 1) & (c_in < nc - 1)
        h = tl.load(buf_ptr + (c_in * B + b).to(tl.int64) * kd * N + bst, mask=sm & from_buf, other=0.0)
    if HAS_S:
        h += tl.load(s_ptr + b.to(tl.int64) * D * N + st, mask=sm & (dirn == 0) & (c_in == 0), other=0.0)
    # scaled state (ema_fwd.py): hs = h / a', P runs scaled too (P = a' Ps), one multiply-add each per step
    hs = h / _sw._safe(_coef(a_ptr, row0, offs_n, offs_d, N, D, kd))
    H = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    P = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    sum_H = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    sum_P = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    step = tl.where(dirn == 0, 1, -1)
    for k in range(0, c_last - c_first + 1):  # the group's chunks in the direction's order
        cp = tl.where(dirn == 0, c_first + k, c_last - k)
        n = tl.minimum(CHUNK, L - cp * CHUNK)
        n_main = (n // UNROLL) * UNROLL
        t0 = tl.where(dirn == 0, cp * CHUNK, cp * CHUNK + n - 1)
        row = b.to(tl.int64) * L + t0  # (b, t) row index, moved by `step` each step
        xn, xn2 = _sw._tiles_ahead(x_ptr, keep_ptr, row, step, n_main, D, offs_k, offs_d, MASK_IN, UNROLL)
        gn, gn2 = _sw._tiles_ahead(g_ptr, keep_ptr, row, step, n_main, D, offs_k, offs_d, False, UNROLL)
        pw = tl.full((BLOCK_N, BLOCK_D), 1.0, tl.float32)
        A = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for j0 in range(0, n, SUB):  # two-level sums (blocks of SUB steps): float32 rounding ~ (SUB + n/SUB) eps
            bH = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            bP = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            bA = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            for i in tl.range(j0, tl.minimum(j0 + SUB, n_main), UNROLL, num_stages=1):
                xc, xn, xn2 = _sw._advance(x_ptr, keep_ptr, xn, xn2, row, step, n_main - i, D, offs_k, offs_d,
                                            MASK_IN, UNROLL)
                gc, gn, gn2 = _sw._advance(g_ptr, keep_ptr, gn, gn2, row, step, n_main - i, D, offs_k, offs_d,
                                            False, UNROLL)
                for u in tl.static_range(UNROLL):
                    um = _sw._tile_row(xc, offs_k, u)
                    ud = um
                    if TRUNC:
                        td = t0 + (i + u - K) * step
                        _, ud = _load_in(x_ptr, keep_ptr, b, td, L, D, offs_d, (td >= 0) & (td < L), MASK_IN)
                    g = _sw._tile_row(gc, offs_k, u)[None, :]
                    hs, H, P, pw, bH, bP, bA = _param_step(um[None, :], g, ud[None, :], hs, hs, H, P, pw, bH, bP,
                                                           bA, q, qk, kqk1, TRUNC)
                row += UNROLL * step
            for i in tl.range(tl.maximum(j0, n_main), tl.minimum(j0 + SUB, n)):  # the last n % UNROLL steps
                _, um = _load_in(x_ptr, keep_ptr, b, t0 + i * step, L, D, offs_d, True, MASK_IN)
                g = tl.load(g_ptr + row * D + offs_d, mask=dmask, other=0.0)
                ud = um
                if TRUNC:
                    td = t0 + (i - K) * step
                    _, ud = _load_in(x_ptr, keep_ptr, b, td, L, D, offs_d, (td >= 0) & (td < L), MASK_IN)
                hs, H, P, pw, bH, bP, bA = _param_step(um[None, :], g[None, :], ud[None, :], hs, hs, H, P, pw, bH,
                                                       bP, bA, q, qk, kqk1, TRUNC)
                row += step
            sum_H += bH
            sum_P += bP
            A += bA
        tl.store(adj_ptr + (cp * B + b).to(tl.int64) * kd * N + bst, A, mask=sm)
    a = _sw._safe(_coef(a_ptr, row0, offs_n, offs_d, N, D, kd))  # loaded again: not held through the sweep
    ng = tl.num_programs(0) // per_group
    part = part_ptr + (grp * B + b).to(tl.int64) * kd * N + bst
    plane = ng.to(tl.int64) * B * kd * N
    tl.store(part, sum_H, mask=sm)
    tl.store(part + plane, a * sum_P, mask=sm)
    tl.store(part + 2 * plane, H, mask=sm)
    tl.store(part + 3 * plane, a * P, mask=sm)


@triton.jit(do_not_specialize=["B", "L", "KD", "D", "N", "CHUNK", "GROUP", "NG"])
def _param_carry_kernel(part_ptr, adj_ptr, a_ptr, c_ptr, q_ptr, s_ptr, gs_ptr, da_ptr, dq_ptr, dc_ptr, B, L, KD,
                        D, N, CHUNK, GROUP, NG, HAS_S: tl.constexpr, HAS_GS: tl.constexpr, BLOCK: tl.constexpr,
                        GROUP_P2: tl.constexpr):
    """Combine the groups of _param_grad_kernel in each row's direction (rows [:D] forward, [D:] backward):
    H_in(next) = q^T H_in + H_run_end, P_in likewise, and sum g H = sum_groups (sum g H_run + H_in G), same for P,
    with G = sum g q^(m+1) = sum over the group's chunks (in the direction's order) of q^(1 + steps before the
    chunk) A_chunk. Writes da = c sum g H (+ gS H_{L-1}), dq = c sum g P (+ gS P_{L-1}) and dc = sum g h per batch
    row, the last from h_t = a H_t + q^(t+1) S (S: the initial state, rows [:D] only): dc = a sum g H +
    S sum_t g_t q^(t+1), where sum_t g_t q^(t+1) = sum_groups q^(group start) G. A group's G comes from one
    (GROUP_P2, BLOCK) load of its chunks' A (GROUP_P2 >= GROUP, a power of two), so each group waits for one load
    latency, not one per chunk."""
    b = tl.program_id(0)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    em = e < KD * N
    row = e % KD  # partials, a, q and c are (N, KD) per batch row
    rev = row >= D
    q = tl.load(q_ptr + e, mask=em, other=1.0)
    plane = NG.to(tl.int64) * B * KD * N
    nc = (L + CHUNK - 1) // CHUNK
    H_in = tl.zeros((BLOCK,), tl.float32)
    P_in = tl.zeros((BLOCK,), tl.float32)
    acc_H = tl.zeros((BLOCK,), tl.float32)
    acc_P = tl.zeros((BLOCK,), tl.float32)
    acc_G = tl.zeros((BLOCK,), tl.float32)
    q_start = tl.full((BLOCK,), 1.0, tl.float32)  # q^(group start) in the row's direction
    offs_k = tl.arange(0, GROUP_P2)[:, None]  # the group's k-th chunk in the row's direction
    e2, em2, rev2, q2 = e[None, :], em[None, :], rev[None, :], q[None, :]
    for i in range(0, NG):
        gg = tl.where(rev, NG - 1 - i, i)
        c_first = gg * GROUP
        c_last = tl.minimum(c_first + GROUP, nc) - 1
        # G = sum_k q^(1 + steps before chunk k within the group) A_k: every chunk is CHUNK long but the last
        # physical one, so the steps before chunk k run from the group's first step (forward) or last (reverse)
        # to chunk k's first or last step
        cf, cl = c_first[None, :], c_last[None, :]
        cp = tl.where(rev2, cl - offs_k, cf + offs_k)
        before = tl.where(rev2, tl.minimum(L, (cl + 1) * CHUNK) - tl.minimum(L, (cp + 1) * CHUNK),
                          (cp - cf) * CHUNK)
        ok = em2 & (offs_k <= cl - cf)
        A = tl.load(adj_ptr + (cp * B + b).to(tl.int64) * KD * N + e2, mask=ok, other=0.0)
        G = tl.sum(tl.where(ok, _powi(q2, 1 + tl.maximum(before, 0)) * A, 0.0), axis=0)
        ptr = part_ptr + (gg * B + b).to(tl.int64) * KD * N + e
        acc_H += tl.load(ptr, mask=em, other=0.0) + H_in * G
        acc_P += tl.load(ptr + plane, mask=em, other=0.0) + P_in * G
        acc_G += q_start * G
        qt = _powi(q, tl.minimum(GROUP * CHUNK, L - gg * GROUP * CHUNK))
        H_in = qt * H_in + tl.load(ptr + 2 * plane, mask=em, other=0.0)
        P_in = qt * P_in + tl.load(ptr + 3 * plane, mask=em, other=0.0)
        q_start = q_start * qt
    a = tl.load(a_ptr + e, mask=em, other=0.0)
    c = tl.load(c_ptr + e, mask=em, other=0.0)
    da = c * acc_H
    dq = c * acc_P
    dc = a * acc_H
    st = b.to(tl.int64) * D * N + row * N + e // KD  # (b, row, n) of a (B, D, N) state
    if HAS_S:
        dc += tl.load(s_ptr + st, mask=em & ~rev, other=0.0) * acc_G
    if HAS_GS:
        gs = tl.load(gs_ptr + st, mask=em & ~rev, other=0.0)
        da += gs * H_in
        dq += gs * P_in
    out = b.to(tl.int64) * KD * N + e
    tl.store(da_ptr + out, da, mask=em)
    tl.store(dq_ptr + out, dq, mask=em)
    tl.store(dc_ptr + out, dc, mask=em)


def ema_param_grads(g: Tensor, x: Tensor, a: Tensor, q: Tensor, c: Tensor, keep: Optional[Tensor],
                    state: Optional[Tensor], grad_state: Optional[Tensor], buf: Optional[Tensor], chunk: int,
                    bidirectional: bool, truncation: int, block_d: Optional[int] = None,
                    group_steps: int = PARAM_GROUP_STEPS, unroll: int = 4, tensor_cores: bool = False,
                    cols: int = 16) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(da, dq, dc) (kd, N) float32 from g = dL/dz (B, L, D) float32 and the chunk states `buf` of the scan
    that computed g (chunk length `chunk`), and adj (nc, B, N, kd) float32: each chunk's local state of the
    adjoint scan (sum_j g q^j over the chunk, j counted in the adjoint's direction; `ema_scan(local=adj)`).
    Deterministic (fixed-order sums, no atomics). unroll: time steps per loop iteration of the sweep (rows of x
    and g arrive as (unroll, block_d) tiles). tensor_cores: the sweep of ema_tc_bwd.py instead (cols (group,
    batch row) columns per program; no truncation, chunk a multiple of 16), the same partials and carry."""
    bsz, length, dim = x.shape
    kd, ndim = q.shape
    ndir = 2 if bidirectional else 1
    group = max(1, group_steps // chunk)
    nc = triton.cdiv(length, chunk)
    ngroups = triton.cdiv(nc, group)
    aT, qT, cT = (t.t().contiguous() for t in (a, q, c))  # (N, kd): see ema_sweep._coef
    if tensor_cores:
        from .ema_tc_bwd import param_sweep_tc

        part, adj = param_sweep_tc(x, keep, g, a, q, state, buf, chunk, group, bidirectional, truncation,
                                   block_d=block_d, cols=cols)
    else:
        _fwd.check_unroll("ema_param_grads", unroll, most=PARAM_SUB)  # whole tiles in each block of the sums
        block_d = block_d_for(dim, block_d)
        ndb = triton.cdiv(dim, block_d)
        part = _fwd._empty((4, ngroups, bsz, ndim, kd), torch.float32, x.device)
        adj = _fwd._empty((nc, bsz, ndim, kd), torch.float32, x.device)
        _param_grad_kernel[(ngroups * bsz * ndir * ndb,)](
            x, keep, g, aT, qT, state, buf, part, adj, bsz, length, dim, ndim, truncation, chunk, group, ndb,
            NDIR=ndir, MASK_IN=keep is not None, TRUNC=truncation > 0, HAS_S=state is not None,
            HAS_BUF=buf is not None, UNROLL=unroll, BLOCK_N=_block_n(ndim), BLOCK_D=block_d,
            num_warps=max(1, block_d // 32))
    da, dq, dc = (_fwd._empty((bsz, ndim, kd), torch.float32, x.device) for _ in range(3))
    blk = 128
    _param_carry_kernel[(bsz, triton.cdiv(kd * ndim, blk))](
        part, adj, aT, cT, qT, state, grad_state, da, dq, dc, bsz, length, kd, dim, ndim, chunk, group, ngroups,
        HAS_S=state is not None, HAS_GS=grad_state is not None, BLOCK=blk, GROUP_P2=triton.next_power_of_2(group))
    da, dq, dc = (t.sum(0).t().contiguous() for t in (da, dq, dc))  # (B, N, kd) -> (kd, N)
    return da, dq, dc, adj


def ema_bwd(grad_y: Tensor, grad_state: Optional[Tensor], x: Tensor, a: Tensor, q: Tensor, c: Tensor,
            omega: Tensor, mask: Optional[Tensor], state: Optional[Tensor], bidirectional: bool, truncation: int,
            states: Optional[Tensor] = None, **tuning) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx (B, L, D) in x's dtype, da, dq, dc (kd, N), domega (D,), dstate (B, D, N) or empty) of
    the forward `ema_fwd(x, a, q, c, omega, mask, state, bidirectional, truncation, ...)` given grad_y
    (B, L, D) and grad_state (B, D, N) float32 or None. states: the chunk states that forward returned
    (return_states=True, the same tuning; empty or None: recomputed). tuning: ema_scan's, and param_group_steps;
    tensor_cores=True runs the backward on tensor cores: the two scans through ema_tc.py (split TF32 products
    whatever tc_precision asks) and the parameter sweep through ema_tc_bwd.py (no truncation, chunk a multiple
    of 16: refused otherwise). The float32 workspace stays within `workspace_budget` bytes (default: the bytes of
    x, at least WORKSPACE_FLOOR_BYTES): a larger backward runs over groups of batch rows (`batch_rows`,
    `_batched_bwd`), and a single unidirectional, untruncated row whose g would pass it (or SEGMENT_BYTES) in
    time segments (`segment_steps`, `_segmented_bwd`): the same gradients with one piece's workspace alive at a
    time. dx_out: a contiguous (B, L, D) tensor in x's dtype that receives dx (the pieces' rows of the whole)."""
    check_inputs("ema_bwd", x, a, q, c, omega, mask, state, bidirectional, truncation)
    if tuple(grad_y.shape) != tuple(x.shape) or not grad_y.is_contiguous() or grad_y.device != x.device \
            or not grad_y.dtype.is_floating_point:
        raise ValueError(f"ema_bwd: grad_y must be a contiguous floating {tuple(x.shape)} tensor on {x.device}, got "
                         f"{tuple(grad_y.shape)} {grad_y.dtype} on {grad_y.device}")
    if grad_state is not None and (tuple(grad_state.shape) != (x.shape[0], x.shape[2], q.shape[1])
                                   or grad_state.dtype != torch.float32 or not grad_state.is_contiguous()
                                   or grad_state.device != x.device):
        raise ValueError(f"ema_bwd: grad_state must be a contiguous (B, D, N) float32 tensor on {x.device}, "
                         f"got {tuple(grad_state.shape)} {grad_state.dtype} on {grad_state.device}")
    if truncation >= x.shape[1]:
        truncation = 0
    budget = tuning.pop("workspace_budget", None) or max(WORKSPACE_FLOOR_BYTES, x.numel() * x.element_size())
    dx_out = tuning.pop("dx_out", None)  # (`_batched_bwd`: this group's rows of the whole dx)
    rows = batch_rows(x, bidirectional, budget)
    if rows < x.shape[0]:
        assert dx_out is None, "a piece of a split backward fits its budget: it never splits again"
        return _batched_bwd(rows, grad_y, grad_state, x, a, q, c, omega, mask, state, bidirectional, truncation,
                            states, dict(tuning, workspace_budget=budget))
    if segment_steps(x, bidirectional, truncation, tuning, budget) < x.shape[1]:
        return _segmented_bwd(grad_y, grad_state, x, a, q, c, omega, mask, state, states,
                              dict(tuning, workspace_budget=budget), dx_out)
    keep = keep_of(mask)
    group_steps = tuning.pop("param_group_steps", PARAM_GROUP_STEPS)
    tensor_cores = tuning.pop("tensor_cores", False)
    if tensor_cores:
        tuning["tc_precision"] = "split"  # gradients in float32 class; one TF32 product is for bf16 forwards only
        tuning.pop("lookback", None)      # the forward's single pass; the backward's scans start from given states
    s0 = None if state is None else (q * state).contiguous()
    states = states if states is not None and states.numel() > 0 else None
    g, _, buf, chunk, dom = ema_scan(x, a, q, c, omega, keep, s0, bidirectional=bidirectional, truncation=truncation,
                                     epilogue=EPI_DSILU, out_dtype=torch.float32, gy=grad_y, states=states,
                                     tensor_cores=tensor_cores, **tuning)
    da, dq, dc, adj = ema_param_grads(g, x, a, q, c, keep, state, grad_state, buf, chunk, bidirectional,
                                      truncation, block_d=None if tensor_cores else tuning.get("block_d"),
                                      group_steps=group_steps, unroll=tuning.get("unroll", 4),
                                      tensor_cores=tensor_cores, cols=tuning.get("cols", 16))
    # The adjoint scan takes its chunk-local states from the parameter sweep (`adj`; without truncation, whose
    # local states also hold the taps q^K g_(t+K) leaving each window). A bidirectional adjoint sums two sweeps
    # in a float32 buffer: for 16-bit x that buffer is dx itself, cast once g is freed, so g, the sum and a
    # 16-bit dx are never all alive (peak 8 instead of 10 bytes per element).
    wide_dx = bidirectional and x.dtype != torch.float32
    direct = dx_out is not None and not wide_dx and not tensor_cores  # the scan writes into dx_out itself
    dx, lam0, *_ = ema_scan(g, c, q, a, omega, keep, grad_state, bidirectional=bidirectional, truncation=truncation,
                            epilogue=EPI_DX, out_dtype=torch.float32 if wide_dx else x.dtype, reverse=True,
                            mask_in=False, write_final=state is not None, local=adj if truncation == 0 else None,
                            tensor_cores=tensor_cores, out=dx_out if direct else None, **dict(tuning, chunk=chunk))
    del g
    if wide_dx or (dx_out is not None and not direct):
        dx = (_fwd._empty(x.shape, x.dtype, x.device) if dx_out is None else dx_out).copy_(dx)
    dstate = q * lam0 if state is not None else x.new_empty(0, dtype=torch.float32)
    if state is not None and x.shape[1] == 0:  # no step ran: the final state was the initial one
        dstate = grad_state.clone() if grad_state is not None else torch.zeros_like(state)
    return dx, da, dq, dc, dom.sum((0, 1)), dstate


def batch_rows(x: Tensor, bidirectional: bool, budget: int) -> int:
    """Batch rows per backward pass: all of them when the float32 workspace (4 bytes per element of x for g, 4
    more for a bidirectional 16-bit x's dx sum) fits in `budget` bytes, else as many as fit (at least one)."""
    bsz = x.shape[0]
    per_row = 4 * (2 if bidirectional and x.dtype != torch.float32 else 1) * x[:1].numel()
    if bsz <= 1 or bsz * per_row <= budget:
        return bsz
    return max(1, min(budget, SEGMENT_BYTES) // per_row)  # (past SEGMENT_BYTES a group would segment, copying)


def segment_steps(x: Tensor, bidirectional: bool, truncation: int, tuning: dict, budget: Optional[int] = None) -> int:
    """Steps per backward segment: L unless a unidirectional, untruncated backward's float32 g exceeds
    SEGMENT_BYTES (or `budget`, if less), then the most whole chunks whose g fits (at least one chunk). A
    bidirectional or truncated EMA has no state to hand between segments, and the tensor-core path keeps its own
    schedule: one piece."""
    bsz, length, dim = x.shape
    chunk = int(tuning.get("chunk") or _fwd.DEFAULT_CHUNK)
    limit = SEGMENT_BYTES if budget is None else min(SEGMENT_BYTES, budget)
    if bidirectional or truncation or tuning.get("tensor_cores") or 4 * bsz * length * dim <= limit:
        return length
    return max(chunk, limit // (4 * bsz * dim) // chunk * chunk)


def _batched_bwd(rows, grad_y, grad_state, x, a, q, c, omega, mask, state, bidirectional, truncation, states,
                 tuning):
    """ema_bwd over groups of `rows` batch rows in turn (contiguous slices of x, grad_y, mask and the states),
    so that one group's float32 workspace is alive at a time. The parameter gradients add up in a fixed order
    (deterministic)."""
    saved = states is not None and states.numel() > 0
    dx = torch.empty_like(x)
    total, dstates = None, []
    if "param_group_steps" not in tuning:  # as many parameter-sweep programs per launch as the whole batch had
        chunk = int(tuning.get("chunk") or _fwd.DEFAULT_CHUNK)
        steps = PARAM_GROUP_STEPS * rows // x.shape[0] // chunk * chunk
        tuning = dict(tuning, param_group_steps=max(chunk, steps))
    for b0 in range(0, x.shape[0], rows):
        rs = slice(b0, b0 + rows)

        def part(t):
            return None if t is None else t[rs]

        _, *pgrads, ds = ema_bwd(grad_y[rs], part(grad_state), x[rs], a, q, c, omega, part(mask), part(state),
                                 bidirectional, truncation, states=states[:, rs].contiguous() if saved else None,
                                 dx_out=dx[rs], **tuning)
        total = pgrads if total is None else [t + g for t, g in zip(total, pgrads)]
        dstates.append(ds)
    dstate = torch.cat(dstates) if state is not None else x.new_empty(0, dtype=torch.float32)
    return (dx, *total, dstate)


def _segmented_bwd(grad_y, grad_state, x, a, q, c, omega, mask, state, states, tuning, dx_out=None):
    """ema_bwd of a unidirectional, untruncated EMA in segments of `segment_steps` whole chunks, right to left:
    each segment's backward starts from the forward state entering it and hands the gradient of that state to
    the segment before as its grad_state. The entering states are the forward's chunk states where it saved
    them (`states`, (nc, B, N, kd): the state entering each chunk), else one more forward pass over x finds them
    (left to right, each segment's final state). The parameter gradients add up in a fixed order
    (deterministic). dx_out: where dx goes (else allocated)."""
    seg = segment_steps(x, False, 0, tuning, tuning.get("workspace_budget"))
    chunk = int(tuning.get("chunk") or _fwd.DEFAULT_CHUNK)
    length = x.shape[1]
    starts = list(range(0, length, seg))

    def part(t, t0):
        return None if t is None else t[:, t0:t0 + seg].contiguous()

    saved = states is not None and states.dim() == 4 and states.shape[0] == triton.cdiv(length, chunk)
    if saved:  # chunk 0 of a segment starts from its entering state, so its entry in the slice is never read
        entering = [state] + [states[t0 // chunk].transpose(1, 2).contiguous() for t0 in starts[1:]]
    else:
        fwd_tuning = {k: v for k, v in tuning.items() if k not in ("param_group_steps", "lookback", "workspace_budget")}
        entering = [state]
        for t0 in starts[:-1]:
            entering.append(_fwd.ema_fwd(part(x, t0), a, q, c, omega, part(mask, t0), entering[-1], False, 0, True,
                                         **fwd_tuning)[1])
    dx = torch.empty_like(x) if dx_out is None else dx_out
    total = None
    for t0, s in zip(reversed(starts), reversed(entering)):
        seg_states = states[t0 // chunk:(t0 + seg) // chunk] if saved else None
        if x.shape[0] == 1:  # the segment's rows of dx are contiguous: its scan writes them in place
            _, *pgrads, ds = ema_bwd(part(grad_y, t0), grad_state, part(x, t0), a, q, c, omega, part(mask, t0), s,
                                     False, 0, states=seg_states, dx_out=dx[:, t0:t0 + seg], **tuning)
        else:
            dxs, *pgrads, ds = ema_bwd(part(grad_y, t0), grad_state, part(x, t0), a, q, c, omega, part(mask, t0),
                                       s, False, 0, states=seg_states, **tuning)
            dx[:, t0:t0 + seg] = dxs
            del dxs  # (one segment's dx at a time)
        total = pgrads if total is None else [t + g for t, g in zip(total, pgrads)]
        grad_state = ds if s is not None else None
    dstate = grad_state if state is not None else x.new_empty(0, dtype=torch.float32)
    return (dx, *total, dstate)
