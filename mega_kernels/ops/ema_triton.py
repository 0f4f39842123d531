"""The `triton` backend of `mega_kernels.ops.ema`: torch.library custom ops around the Triton launchers.

    mega_kernels::ema_fwd_triton   EMA_FWD_SAVING_SCHEMA -> (y (B, L, D), final state (B, D, N) or empty,
                                                             chunk states (nc, B, N, kd) or empty)
    mega_kernels::ema_bwd_triton   EMA_BWD_SAVED_SCHEMA  -> (dx, da, dq, dc, domega, dstate or empty)
    mega_kernels::ema_step_triton  EMA_STEP_SCHEMA       -> (y (B, D), new state (B, D, N))

The forward's chunk states go to the backward, whose recomputation of the forward then skips its chunk-state
and carry passes (one read of x less).

`custom_op` + `register_fake` (not `triton_op`): it traces under torch.compile on a GPU and also on the CPU
under TRITON_INTERPRET=1, where the interpreter's data access breaks triton_op's fake-tensor tracing
(DESIGN.md). Autograd is the shared `register_ema_autograd` / `register_ema_step_autograd` of ops/ema.py.
"""
from __future__ import annotations

import torch

from .. import triton as _triton
from ..triton.ema_bwd import ema_bwd as _ema_bwd
from ..triton.ema_fwd import chunk_states_shape
from ..triton.ema_fwd import ema_fwd as _ema_fwd
from ..triton.ema_step import ema_step_fwd as _ema_step
from .ema import (EMA_BWD_SAVED_SCHEMA, EMA_FWD_SAVING_SCHEMA, EMA_STEP_SCHEMA, register_ema_autograd,
                  register_ema_step_autograd)

_EMPTY_STATE = (0,)


@torch.library.custom_op("mega_kernels::ema_fwd_triton", mutates_args=(), schema=EMA_FWD_SAVING_SCHEMA)
def ema_fwd_triton(x, a, q, c, omega, mask, state, bidirectional, truncation, return_state):
    with _triton.on_device_of(x):
        return _ema_fwd(x, a, q, c, omega, mask, state, bidirectional, truncation, return_state, return_states=True)


@ema_fwd_triton.register_fake
def _(x, a, q, c, omega, mask, state, bidirectional, truncation, return_state):
    final = x.new_empty((x.shape[0], x.shape[2], q.shape[1]) if return_state else _EMPTY_STATE, dtype=torch.float32)
    states = x.new_empty(chunk_states_shape(x.shape, q.shape[1], bidirectional), dtype=torch.float32)
    return torch.empty_like(x), final, states


@torch.library.custom_op("mega_kernels::ema_bwd_triton", mutates_args=(), schema=EMA_BWD_SAVED_SCHEMA)
def ema_bwd_triton(grad_y, grad_state, x, a, q, c, omega, mask, state, bidirectional, truncation, saved=None):
    with _triton.on_device_of(x):
        return _ema_bwd(grad_y, grad_state, x, a, q, c, omega, mask, state, bidirectional, truncation, states=saved)


@ema_bwd_triton.register_fake
def _(grad_y, grad_state, x, a, q, c, omega, mask, state, bidirectional, truncation, saved=None):
    dstate = torch.empty_like(state) if state is not None else x.new_empty(_EMPTY_STATE, dtype=torch.float32)
    return (torch.empty_like(x), torch.empty_like(a), torch.empty_like(q), torch.empty_like(c),
            torch.empty_like(omega), dstate)


@torch.library.custom_op("mega_kernels::ema_step_triton", mutates_args=(), schema=EMA_STEP_SCHEMA)
def ema_step_triton(x, a, q, c, omega, state, mask):
    with _triton.on_device_of(x):
        return _ema_step(x, a, q, c, omega, state, mask)


@ema_step_triton.register_fake
def _(x, a, q, c, omega, state, mask):
    return torch.empty_like(x), torch.empty_like(state)


ema = register_ema_autograd(ema_fwd_triton, ema_bwd_triton, saves=True)
register_ema_step_autograd(ema_step_triton)


def ema_step(x, a, q, c, omega, state, mask=None):
    """One decoding step (backend signature of ops.ema_step): x (B, D), state (B, D, N) ->
    (y (B, D) in x's dtype, new state (B, D, N) float32); differentiable (register_ema_step_autograd)."""
    return ema_step_triton(x.contiguous(), a.float().contiguous(), q.float().contiguous(), c.float().contiguous(),
                           omega.float().contiguous(), state.float().contiguous(),
                           None if mask is None else mask.to(torch.bool).contiguous())
