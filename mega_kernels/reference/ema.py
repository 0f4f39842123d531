"""Reference multi-dimensional damped EMA (MEGA spec section 4), in plain PyTorch.

Maths (channel d, expansion dimension n < N, scale = sqrt(1/N)):

    p = sigmoid(delta),  q = 1 - p * sigmoid(alpha)
    a = p * beta            (input coefficient,  (kd, N))
    c = gamma * scale       (output coefficient, (kd, N))

    unidirectional recurrence:  h_t = q * h_{t-1} + a * x_t,   ema_t = sum_n c * h_t
    as a convolution:           k[d, l] = sum_n c a q^l,  ema_t = sum_{l<K} k[l] x_{t-l}
    bidirectional:              rows [:D] give the forward taps k1, rows [D:] the backward taps k2,
                                ema_t = sum_l k1[l] x_{t-l} + sum_l k2[l] x_{t+l}
    output:                     y = silu(ema(x * mask) + omega * x)

K = min(truncation, L) taps. An initial state h_{-1} = s adds sum_n c q^(t+1) s to ema_t and the final
state is h_{L-1} = sum_l a q^(L-1-l) x_l + q^L s.

Two forms live here and agree in float64: `ema_fft` (the transformers way: FFT convolution in at least
float32) and `ema_recurrent` (a sequential loop over L, slow, the plainest statement of the maths).
`ema_step` is one decoding step. All take the (a, q, c) coefficients of `ema_coefficients`.
Shapes: x (B, L, D); mask (B, L) bool or None; a, q, c (kd, N); omega (D,); state (B, D, N).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def ema_coefficients(delta: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Module parameters -> recurrence coefficients (a, q, c), each (kd, N), differentiable.

    delta, alpha, beta: (kd, N, 1) as the module holds them; gamma: (kd, N).
    """
    n = gamma.shape[-1]
    p = torch.sigmoid(delta.squeeze(-1))
    q = 1.0 - p * torch.sigmoid(alpha.squeeze(-1))
    a = p * beta.squeeze(-1)
    c = gamma * math.sqrt(1.0 / n)
    return a, q, c


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


TAP_BLOCK = 64  # taps per row of the power tables of `ema_kernel`


def _log_q(q: Tensor) -> Tensor:
    """log q, finite where q = 0 (a saturated damping: p and alpha both round to 1), so the powers q^l =
    exp(l log q) are 1 at l = 0 and 0 after, as the recurrence gives, instead of NaN from 0 * log 0 (transformers'
    FFT kernel returns NaN there). The log never sees the 0, so its gradient is finite too (there it drops the
    l = 1 term's d q^l / dq = 1, as any finite stand-in for log 0 must)."""
    live = q > 0
    return torch.where(live, torch.log(torch.where(live, q, torch.ones_like(q))), torch.full_like(q, -1e4))


def ema_kernel(a: Tensor, q: Tensor, c: Tensor, length: int) -> Tensor:
    """Convolution taps k[d, l] = sum_n c a q^l for l < length: (kd, length).

    With l = i T + j (T = TAP_BLOCK), k[d, iT + j] = sum_n (c a q^j)[d, n] (q^(iT))[d, n]: one batched
    matmul of two small power tables, so no (kd, N, length) tensor of exponentials is formed (30x cheaper than
    transformers' exp(l log q) on 2 CPU cores at kd 512, N 16, L 1024, and equal to float32 rounding). T is a
    constant, not ~sqrt(length), so torch.compile with dynamic shapes traces it (math.isqrt of a symbolic length
    cannot be); the tables' L / T + T exponentials stay far below the matmul's N L products.
    """
    kd = q.shape[0]
    inner_len = TAP_BLOCK
    outer_len = -(-length // inner_len)
    logq = _log_q(q).unsqueeze(-1)                                                      # (kd, N, 1)
    inner = (a * c).unsqueeze(-1) * torch.exp(torch.arange(inner_len, device=q.device, dtype=q.dtype) * logq)
    outer = torch.exp(torch.arange(outer_len, device=q.device, dtype=q.dtype) * inner_len * logq)
    taps = torch.bmm(outer.transpose(1, 2), inner)                                       # (kd, outer, inner)
    return taps.reshape(kd, outer_len * inner_len)[:, :length]


def _fft_conv(x: Tensor, k: Tensor, length: int) -> Tensor:
    """Linear convolution of x (B, D, T) with k (D, K) through an FFT of size 2 * length (T, K <= length)."""
    n = 2 * length
    return torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(k, n=n), n=n)


def _check_state_args(truncation: Optional[int], bidirectional: bool, state: Optional[Tensor], return_state: bool):
    if (state is not None or return_state) and bidirectional:
        raise ValueError("ema: a state (state= or return_state=True) exists only for a unidirectional EMA; "
                         "pass bidirectional=False or drop the state arguments")
    if (state is not None or return_state) and truncation is not None:
        raise ValueError("ema: a truncated EMA has no finite recurrent state; drop truncation= or keep the last "
                         "`truncation` inputs and recompute (the models do this for cached decoding)")


def _prepare(x, mask, a, q, c, omega):
    cd = _compute_dtype(x)
    xc = x.to(cd)
    xm = _masked(xc, mask)
    return xc, xm, a.to(cd), q.to(cd), c.to(cd), omega.to(cd)


def _masked(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """x with padded positions set to zero (not multiplied by 0: a NaN or inf there must not enter the sums,
    as in the kernels)."""
    return x if mask is None else torch.where(mask.to(torch.bool).unsqueeze(-1), x, 0)


def _state_terms(q: Tensor, c: Tensor, state: Tensor, length: int) -> Tensor:
    """sum_n c q^(t+1) s[n] for t < length: (B, length, D)."""
    steps = torch.arange(1, length + 1, device=q.device, dtype=q.dtype)
    powers = torch.exp(steps.view(1, 1, length) * _log_q(q).unsqueeze(-1))  # (D, N, L)
    return torch.einsum("dnl,dn,bdn->bld", powers, c, state.to(q.dtype))


def _final_state(xm: Tensor, a: Tensor, q: Tensor, state: Optional[Tensor]) -> Tensor:
    """h_{L-1} = sum_l a q^(L-1-l) x_l + q^L s: (B, D, N) float32."""
    length = xm.shape[1]
    steps = torch.arange(length - 1, -1, -1, device=q.device, dtype=q.dtype)
    powers = torch.exp(steps.view(1, 1, length) * _log_q(q).unsqueeze(-1))  # (D, N, L)
    h = torch.einsum("bld,dnl->bdn", xm, powers) * a
    if state is not None:
        h = h + q.pow(length) * state.to(q.dtype)
    return h.float() if xm.dtype != torch.float64 else h


def ema_fft(x: Tensor, a: Tensor, q: Tensor, c: Tensor, omega: Tensor, *, mask: Optional[Tensor] = None,
            bidirectional: bool = False, truncation: Optional[int] = None, state: Optional[Tensor] = None,
            return_state: bool = False):
    """silu(EMA(x * mask) + omega * x) by FFT convolution, as transformers computes it.

    x (B, L, D) -> y (B, L, D) in x's dtype [, final state (B, D, N) float32 when return_state].
    """
    _check_state_args(truncation, bidirectional, state, return_state)
    bsz, length, dim = x.shape
    xc, xm, a, q, c, omega = _prepare(x, mask, a, q, c, omega)
    ksize = length if truncation is None else min(truncation, length)
    if x.numel() == 0:  # nothing to convolve (an FFT of an empty batch or length fails); a, q, c get zero gradients
        ema = torch.zeros_like(xm) + (a[:0].sum() + q[:0].sum() + c[:0].sum())
        y = F.silu(ema + omega * xc).to(x.dtype)
        return (y, _final_state(xm, a, q, state)) if return_state else y
    kernel = ema_kernel(a, q, c, ksize)
    inp = xm.transpose(1, 2)  # (B, D, L)
    if bidirectional:
        k1, k2 = kernel[:dim], kernel[dim:]
        full = F.pad(k1, (ksize - 1, 0)) + F.pad(k2.flip(-1), (0, ksize - 1))  # taps at offsets -(K-1)..(K-1)
        out = _fft_conv(F.pad(inp, (ksize - 1, 0)), full, length + ksize - 1)
        s = 2 * ksize - 2
        ema = out[..., s: s + length]
    else:
        ema = _fft_conv(inp, kernel, length)[..., :length]
    ema = ema.transpose(1, 2)
    if state is not None:
        ema = ema + _state_terms(q, c, state, length)
    y = F.silu(ema + omega * xc).to(x.dtype)
    if return_state:
        return y, _final_state(xm, a, q, state)
    return y


def _scan(xm: Tensor, a: Tensor, q: Tensor, c: Tensor, truncation: Optional[int], h0: Optional[Tensor]) -> Tensor:
    """Sequential scan h_t = q h_{t-1} + a x_t (minus the tap leaving a truncated window); returns sum_n c h_t."""
    bsz, length, dim = xm.shape
    h = xm.new_zeros(bsz, dim, a.shape[-1]) if h0 is None else h0.to(xm.dtype).clone()
    drop = None if truncation is None else a * q.pow(truncation)
    out = []
    for t in range(length):
        h = q * h + a * xm[:, t, :, None]
        if drop is not None and t >= truncation:
            h = h - drop * xm[:, t - truncation, :, None]
        out.append((h * c).sum(-1))
    return torch.stack(out, 1), h


def ema_recurrent(x: Tensor, a: Tensor, q: Tensor, c: Tensor, omega: Tensor, *, mask: Optional[Tensor] = None,
                  bidirectional: bool = False, truncation: Optional[int] = None, state: Optional[Tensor] = None,
                  return_state: bool = False):
    """The same function as `ema_fft`, computed by the plain sequential recurrence (slow; for tests)."""
    _check_state_args(truncation, bidirectional, state, return_state)
    dim = x.shape[-1]
    xc, xm, a, q, c, omega = _prepare(x, mask, a, q, c, omega)
    ema, h = _scan(xm, a[:dim], q[:dim], c[:dim], truncation, state)
    if bidirectional:
        back, _ = _scan(xm.flip(1), a[dim:], q[dim:], c[dim:], truncation, None)
        ema = ema + back.flip(1)
    y = F.silu(ema + omega * xc).to(x.dtype)
    if return_state:
        return y, h.float() if xm.dtype != torch.float64 else h
    return y


def ema_step(x: Tensor, a: Tensor, q: Tensor, c: Tensor, omega: Tensor, state: Tensor,
             mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One decoding step: x (B, D), state (B, D, N) -> (y (B, D) in x's dtype, new state (B, D, N) float32).

    mask (B,) bool or None: a padded token does not enter the state (but the state still decays).
    """
    cd = _compute_dtype(x)
    xc = x.to(cd)
    xm = _masked(xc, mask)
    h = q.to(cd) * state.to(cd) + a.to(cd) * xm.unsqueeze(-1)
    y = F.silu((h * c.to(cd)).sum(-1) + omega.to(cd) * xc).to(x.dtype)
    return y, (h if cd == torch.float64 else h.float())
