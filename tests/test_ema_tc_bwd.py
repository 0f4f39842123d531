"""The Triton EMA backward on tensor cores, `ema_bwd(tensor_cores=True)`: the parameter sweep
(mega_kernels/triton/ema_tc_bwd.py) against the sweep it replaces (`_param_grad_kernel`: gradients and adjoint
chunk states), over walks whose partial chunk leaves steps outside whole sub-chunks at either end, one or several
column groups and channel blocks, the unmasked EVEN build; then the whole backward (its two scans on ema_tc.py
too) with every gradient against the float64 reference; NaN-poisoned workspaces; the options it refuses. Under
the interpreter the dots are exact float32 products; the GPU test checks the TF32 products."""
from __future__ import annotations

import pytest
import torch

from helpers import EMA_CASES, assert_close_to_reference, triton_ema_gate

DEVICE, _REASON, pytestmark = triton_ema_gate()

if _REASON is None:
    from test_ema_triton import _case, _reference

    from mega_kernels.triton import ema_fwd as fwd_mod
    from mega_kernels.triton.ema_bwd import ema_bwd, ema_param_grads
    from mega_kernels.triton.ema_fwd import EPI_DSILU, ema_fwd, ema_scan, keep_of


def _both_param_grads(coefs, x, mask, state, gy, gs, bidirectional, chunk, group, block_d):
    """(da, dq, dc, adj) of ema_param_grads with and without tensor cores, on g and the chunk states of the scan
    ema_bwd runs first (on tensor cores: the sweeps' scan is the interpreter's slowest part)."""
    a, q, c, omega = coefs
    keep = keep_of(mask)
    s0 = None if state is None else (q * state).contiguous()
    g, _, buf, chunk, _ = ema_scan(x, a, q, c, omega, keep, s0, bidirectional=bidirectional, truncation=0,
                                   epilogue=EPI_DSILU, out_dtype=torch.float32, gy=gy, chunk=chunk, tensor_cores=True)
    return [ema_param_grads(g, x, a, q, c, keep, state, gs, buf, chunk, bidirectional, 0, block_d=block_d,
                            group_steps=group * chunk, tensor_cores=tc) for tc in (True, False)]


# (B, L, D, N, bidirectional, with state, with mask, chunk, chunks per group, channels per program)
PARITY = [
    (8, 64, 16, 16, False, True, False, 16, 2, 8),   # EVEN: whole groups, channel blocks and column groups
    (8, 64, 16, 3, True, False, False, 16, 2, 16),   # EVEN, both directions
    (3, 131, 20, 5, False, True, True, 32, 2, 8),    # forward walk: 3 steps after the last whole sub-chunk
    (3, 131, 20, 5, True, False, True, 32, 2, 32),   # reverse walk: its partial chunk (3 steps) ends in the head
    (2, 100, 7, 3, True, False, True, 48, 1, 8),     # reverse head of 4 steps, then whole sub-chunks of that chunk
    (5, 200, 9, 20, False, True, True, 32, 2, 16),   # 20 columns: two column groups; N 20 (32 padded states)
    (2, 40, 24, 3, True, False, True, 48, 1, 32),    # one chunk: no chunk states
    (2, 1, 24, 3, False, True, False, 16, 1, 32),    # one step
]


@pytest.mark.parametrize("case", PARITY, ids=str)
def test_matches_the_sweep(case):
    """da, dq, dc (the carry of the sweep's partials: sums, end states) and each chunk's adjoint state, against
    `_param_grad_kernel` on the same g, to float32 rounding."""
    bsz, length, dim, ndim, bidirectional, with_state, with_mask, chunk, group, block_d = case
    coefs, _, x, mask, state, gy, gs = _case(bsz, length, dim, ndim, bidirectional, with_state)
    mask = mask if with_mask else None
    tc, sweep = _both_param_grads(coefs, x, mask, state, gy, gs, bidirectional, chunk, group, block_d)
    for name, got, want in zip(["da", "dq", "dc", "adj"], tc, sweep):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _check_gradients(bsz, length, dim, ndim, bidirectional, with_state, dtype=torch.float32, chunk=64,
                     group_steps=128, initial=True):
    """ema_bwd(tensor_cores=True) against the float64 reference; with_state: the final state's gradient too, and
    (initial) the initial state."""
    coefs, coefs64, x, mask, state, gy, gs = _case(bsz, length, dim, ndim, bidirectional, with_state, dtype)
    state = state if initial else None
    grads = ema_bwd(gy, gs, x, *coefs, mask, state, bidirectional, 0, chunk=chunk, param_group_steps=group_steps,
                    tensor_cores=True)
    ref = _reference(x.double(), coefs64, mask, None if state is None else state.double(), gy, gs, bidirectional, 0)
    low = _reference(x, coefs, mask, state, gy, gs, bidirectional, 0)
    for name, g, r, lo in zip(["dx", "da", "dq", "dc", "domega", "dstate"], grads, ref[1], low[1]):
        assert_close_to_reference(name, g, r, lo)


@pytest.mark.parametrize("case", EMA_CASES, ids=str)
@pytest.mark.parametrize("mode", ["uni-states", "uni-final", "bi"])
def test_gradients_against_reference(case, mode):
    """Every gradient of ema_bwd(tensor_cores=True) over the shared EMA cases, with a mask, against the float64
    reference (tolerance rule): one direction with an initial state (its gradient is the adjoint's final state)
    and the final state's gradient, with the final state's gradient alone (it enters the adjoint as its initial
    state), and both directions."""
    _check_gradients(*case, mode == "bi", mode != "bi", initial=mode == "uni-states")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_16bit_input(bidirectional, dtype):
    """16-bit x is exact in TF32: its dots take two products, not three."""
    _check_gradients(2, 77, 24, 16, bidirectional, not bidirectional, dtype, chunk=16, group_steps=32)


def test_with_the_tensor_core_forward():
    """As the op runs it: the tensor-core forward's chunk states into the backward with tensor_cores=True."""
    coefs, coefs64, x, mask, state, gy, _ = _case(3, 131, 20, 5, False, True)
    _, _, states = ema_fwd(x, *coefs, mask, state, False, 0, False, return_states=True, tensor_cores=True,
                           chunk=32)
    grads = ema_bwd(gy, None, x, *coefs, mask, state, False, 0, states=states, chunk=32, tensor_cores=True)
    ref = _reference(x.double(), coefs64, mask, state.double(), gy, None, False, 0)
    low = _reference(x, coefs, mask, state, gy, None, False, 0)
    for name, g, r, lo in zip(["dx", "da", "dq", "dc", "domega", "dstate"], grads, ref[1], low[1]):
        assert_close_to_reference(name, g, r, lo)


def test_workspaces_poisoned_with_nan(monkeypatch):
    """Every output and workspace starts as NaN: the sweep must write each partial and chunk state it hands on."""
    monkeypatch.setattr(fwd_mod, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                                     dtype=dtype, device=device))
    _check_gradients(3, 70, 17, 3, False, True, chunk=16, group_steps=32)
    _check_gradients(3, 70, 17, 3, True, False, chunk=16, group_steps=32)


@pytest.mark.parametrize("option,match", [
    (dict(truncation=5), "does not take truncation"),
    (dict(chunk=40), "multiple of 16"),
])
def test_refuses_what_it_does_not_take(option, match):
    option = dict(option)  # (the parametrized dict is shared: leave it unchanged)
    coefs, _, x, _, _, gy, _ = _case(2, 90, 8, 3, False, False)
    truncation = option.pop("truncation", 0)
    with pytest.raises(ValueError, match=match):
        ema_bwd(gy, None, x, *coefs, None, None, False, truncation, tensor_cores=True, **option)


def test_refuses_more_states_than_its_tiles_hold():
    """The parameter sweep's 64-state tiles (N > 32) exceed an sm_90 program's shared memory: refused by name."""
    coefs, _, x, mask, state, gy, gs = _case(1, 16, 8, 33, False, False)
    a, q, c, omega = coefs
    g = gy.float()
    with pytest.raises(ValueError, match=r"param_sweep_tc: tensor_cores=True takes N <= 32"):
        ema_param_grads(g, x, a, q, c, None, None, None, None, 16, False, 0, tensor_cores=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bidirectional", [(torch.bfloat16, False), (torch.float32, True)], ids=str)
def test_gpu_tensor_core_param_sweep(dtype, bidirectional):
    """On a GPU the dots are TF32 products of split operands: L = 4096 in chunks of 256 against the float64
    reference under the tolerance rule."""
    _check_gradients(2, 4096, 96, 16, bidirectional, not bidirectional, dtype, chunk=256, group_steps=1024)
