"""The `cpu` and `cuda` EMA backends: the compiled mega_kernels::ema_fwd / ema_bwd / ema_step ops (csrc/).

Importing this module loads (or JIT-builds) the extension; the backend registry imports it only after
`mega_kernels._ext.unavailable_reason` said the extension is usable. The ops get fake (meta) kernels here,
for torch.compile and opcheck, and the shared autograd of `ops.ema` (`register_ema_autograd`,
`register_ema_step_autograd`).

    ema(x, a, q, c, omega, *, mask, bidirectional, truncation, state, return_state)
        x (B, L, D), a/q/c (kd, N), omega (D,) -> y (B, L, D) [, final state (B, D, N)]
    ema_step(x, a, q, c, omega, state, mask) -> (y (B, D), new state (B, D, N))
Float32 state and accumulation (float64 for float64 x, which only the cpu backend accepts).
"""
from __future__ import annotations

import torch

from .. import _ext
from .ema import CUDA_MAX_N, register_ema_autograd, register_ema_step_autograd

_state = _ext.load()
if not _state["ok"]:
    raise ImportError(f"mega_kernels: the compiled extension is unavailable: {_state['reason']}")


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("mega_kernels::ema_fwd")
def _ema_fwd_fake(x, a, q, c, omega, mask, state, bidirectional, truncation, return_state):
    shape = (x.shape[0], x.shape[2], a.shape[1]) if return_state else (0,)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(shape, dtype=_acc(x))


@torch.library.register_fake("mega_kernels::ema_bwd")
def _ema_bwd_fake(grad_y, grad_state, x, a, q, c, omega, mask, state, bidirectional, truncation):
    gstate = state.new_empty(state.shape) if state is not None else a.new_empty((0,))
    return (x.new_empty(x.shape), a.new_empty(a.shape), q.new_empty(q.shape), c.new_empty(c.shape),
            omega.new_empty(omega.shape), gstate)


@torch.library.register_fake("mega_kernels::ema_step")
def _ema_step_fake(x, a, q, c, omega, state, mask):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], x.shape[1], a.shape[1]), dtype=_acc(x))


def _check_cuda_n(x, a):
    """Refuse N > 32 on CUDA before the op, with the message of the C++ check (check_cuda_args in
    csrc/ema/ema_checks.h). The C++ ops validate every input themselves before allocating or launching;
    this only says it earlier, before the autograd wrapper and the coefficient copies."""
    if x.is_cuda and a.shape[-1] > CUDA_MAX_N:
        raise ValueError(f"ema (cuda): N = {a.shape[-1]} exceeds the CUDA kernels' maximum of {CUDA_MAX_N} "
                           f"(N is the expansion size, a.size(1)); use backend='triton' or 'reference'")


_ema = register_ema_autograd(torch.ops.mega_kernels.ema_fwd.default, torch.ops.mega_kernels.ema_bwd.default)
register_ema_step_autograd(torch.ops.mega_kernels.ema_step.default)


def ema(x, a, q, c, omega, **kwargs):
    """Backend signature of ops.ema (see register_ema_autograd)."""
    _check_cuda_n(x, a)
    return _ema(x, a, q, c, omega, **kwargs)


def ema_step(x, a, q, c, omega, state, mask=None):
    """One decoding step: x (B, D), state (B, D, N) -> (y (B, D), new state (B, D, N)); differentiable
    (register_ema_step_autograd)."""
    _check_cuda_n(x, a)
    dt = _acc(x)
    return torch.ops.mega_kernels.ema_step.default(
        x.contiguous(), a.to(dt).contiguous(), q.to(dt).contiguous(), c.to(dt).contiguous(),
        omega.to(dt).contiguous(), state.to(dt).contiguous(), None if mask is None else mask.to(torch.bool))
