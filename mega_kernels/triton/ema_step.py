"""Triton fused single-token EMA decode step (cached generation), unidirectional only.

    h = q * state + a * x * mask        (float32, (B, D, N))
    y = silu(sum_n c h + omega * x)     (B, D) in x's dtype

One program = one batch row and BLOCK_D channels with all N states in registers; x and y are read and written
once, the state once each way. A padded token (mask False) leaves the state decaying without input.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import ema_fwd as _fwd
from .ema_fwd import _block_n, block_d_for, check_inputs, keep_of
from .ema_sweep import _coef

Tensor = torch.Tensor


@triton.jit(do_not_specialize=["D", "N", "NDB"])
def _ema_step_kernel(x_ptr, keep_ptr, a_ptr, q_ptr, c_ptr, omega_ptr, s_ptr, y_ptr, ns_ptr, D, N, NDB,
                     HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // NDB
    offs_d = (pid % NDB) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < D
    sm = (offs_n[:, None] < N) & dmask[None, :]
    a = _coef(a_ptr, 0, offs_n, offs_d, N, D, D)
    q = _coef(q_ptr, 0, offs_n, offs_d, N, D, D, 1.0)
    c = _coef(c_ptr, 0, offs_n, offs_d, N, D, D)
    omega = tl.load(omega_ptr + offs_d, mask=dmask, other=0.0)
    x = tl.load(x_ptr + b.to(tl.int64) * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
    xm = x
    if HAS_MASK:
        xm = tl.where(tl.load(keep_ptr + b) != 0, x, 0.0)
    st = b.to(tl.int64) * D * N + offs_d[None, :] * N + offs_n[:, None]
    h = q * tl.load(s_ptr + st, mask=sm, other=0.0) + a * xm[None, :]
    z = tl.sum(c * h, axis=0) + omega * x
    tl.store(y_ptr + b.to(tl.int64) * D + offs_d, (z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=dmask)
    tl.store(ns_ptr + st, h, mask=sm)


def ema_step_fwd(x: Tensor, a: Tensor, q: Tensor, c: Tensor, omega: Tensor, state: Tensor,
                 mask: Optional[Tensor], block_d: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """x (B, D), state (B, D, N) float32, mask (B,) bool or None -> (y (B, D) x's dtype, new state float32)."""
    if x.dim() != 2:
        raise ValueError(f"ema_step: x must be (B, D), got {tuple(x.shape)}")
    check_inputs("ema_step", x[:, None], a, q, c, omega, None if mask is None else mask[:, None], state, False, 0)
    bsz, dim = x.shape
    block_d = block_d_for(dim, block_d)
    ndb = triton.cdiv(dim, block_d)
    y = _fwd._empty(x.shape, x.dtype, x.device)
    new_state = _fwd._empty(state.shape, torch.float32, x.device)
    aT, qT, cT = (t.t().contiguous() for t in (a, q, c))  # (N, D): see ema_sweep._coef
    _ema_step_kernel[(bsz * ndb,)](x, keep_of(mask), aT, qT, cT, omega, state, y, new_state, dim, q.shape[1], ndb,
                                   HAS_MASK=mask is not None, BLOCK_N=_block_n(q.shape[1]), BLOCK_D=block_d,
                                   num_warps=max(1, block_d // 32))
    return y, new_state
