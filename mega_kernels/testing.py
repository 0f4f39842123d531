"""The tolerance rule of DESIGN.md, shared by the test suite and `mega-kernels check`.

A kernel's output is compared with the reference computed in float64 on the same inputs; its error may be
at most `factor` times the reference's own error in the input dtype (the reference run in that dtype), plus a
tiny absolute term scaled by the output's magnitude.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def error_and_bound(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: Optional[torch.Tensor] = None,
                    factor: float = 3.0) -> Tuple[float, float, float]:
    """(max |out - ref64|, allowed bound, the reference's own error in the low precision)."""
    if out.numel() == 0:
        return 0.0, 0.0, 0.0
    err = (out.double() - ref64.double()).abs().max().item()
    base = 0.0 if ref_lowp is None else (ref_lowp.double() - ref64.double()).abs().max().item()
    scale = 1.0 + ref64.double().abs().max().item()
    return err, factor * base + ATOL[out.dtype] * scale, base


def assert_close_to_reference(name: str, out: torch.Tensor, ref64: torch.Tensor,
                              ref_lowp: Optional[torch.Tensor] = None, factor: float = 3.0) -> None:
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err, bound, base = error_and_bound(out, ref64, ref_lowp, factor)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (reference's own error {base:.3e})"


def ema_params(dim: int, ndim: int, bidirectional: bool = False, dtype=torch.float64, device="cpu",
               requires_grad: bool = False, generator: Optional[torch.Generator] = None):
    """Fresh module-shaped EMA parameters [delta, alpha, beta, gamma, omega] drawn like MEGA's init
    (spec section 8): delta, alpha ~ N(0, 0.2); beta ~ N(0, 0.02) + [1, -1, 1, ...]; gamma, omega ~ N(0, 1)."""
    kd = 2 * dim if bidirectional else dim

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, generator=generator)

    sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(ndim)], dtype=dtype).view(1, ndim, 1)
    params = [randn(kd, ndim, 1) * 0.2, randn(kd, ndim, 1) * 0.2, randn(kd, ndim, 1) * 0.02 + sign,
              randn(kd, ndim), randn(dim)]
    return [p.to(device).requires_grad_(requires_grad) for p in params]
