"""The tensor-core variant of the Triton EMA scan (mega_kernels/triton/ema_tc.py, `ema_scan(tensor_cores=True)`):
the forward's output against the float64 reference over the shared EMA cases, chunk lengths that leave partial
sub-chunks and partial chunks, masks, initial states, both directions, NaN-poisoned outputs; the chunk states
against the sweeps' (the backward reuses them); the backward's scans (epilogues, reversed rows, given chunk
states) against the sweeps; the options it refuses. Under the interpreter the dots are exact float32
products; the TF32 rounding of a GPU is checked by the GPU test (bfloat16 and float32)."""
from __future__ import annotations

import pytest
import torch

from helpers import EMA_CASES, assert_close_to_reference, ema_params, random_mask, record_launches, triton_ema_gate
from mega_kernels.reference.ema import ema_coefficients, ema_fft

DEVICE, _REASON, pytestmark = triton_ema_gate()

if _REASON is None:
    from mega_kernels.triton import ema_fwd as fwd_mod
    from mega_kernels.triton import ema_sweep
    from mega_kernels.triton.ema_bwd import ema_bwd
    from mega_kernels.triton.ema_fwd import ema_fwd


def _inputs(bsz, length, dim, ndim, bidirectional, with_state, dtype=torch.float32):
    delta, alpha, beta, gamma, omega = ema_params(dim, ndim, bidirectional)
    coefs64 = tuple(t.double().to(DEVICE) for t in ema_coefficients(delta, alpha, beta, gamma)) + (
        omega.double().to(DEVICE),)
    coefs = tuple(t.float() for t in coefs64)
    x = torch.randn(bsz, length, dim, device=DEVICE).to(dtype)
    mask = random_mask(bsz, length, device=DEVICE)
    state = torch.randn(bsz, dim, ndim, device=DEVICE) if with_state else None
    return x, coefs, coefs64, mask, state


def _check_forward(bsz, length, dim, ndim, bidirectional, with_state, use_mask, dtype=torch.float32,
                   compare_states=False, **tuning):
    x, coefs, coefs64, mask, state = _inputs(bsz, length, dim, ndim, bidirectional, with_state, dtype)
    mask = mask if use_mask else None
    y, _, states = ema_fwd(x, *coefs, mask, state, bidirectional, 0, False, return_states=True, tensor_cores=True,
                           **tuning)
    ref = ema_fft(x.double(), *coefs64, mask=mask, bidirectional=bidirectional,
                  state=None if state is None else state.double())
    low = ema_fft(x, *coefs, mask=mask, bidirectional=bidirectional, state=state)
    assert_close_to_reference("y", y, ref, low)
    if not compare_states:
        return
    # the chunk states are the sweeps' (the backward reuses them)
    _, _, sweep_states = ema_fwd(x, *coefs, mask, state, bidirectional, 0, False, return_states=True,
                                 chunk=tuning.get("chunk"))
    torch.testing.assert_close(states, sweep_states, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", EMA_CASES, ids=str)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_forward_against_reference(case, bidirectional):
    """The shared cases in chunks of 56 steps: 3.5 sub-chunks per chunk, and a partial last chunk wherever L is
    not a multiple of 56."""
    _check_forward(*case, bidirectional, not bidirectional, True, chunk=56, block_d=16, cols=16)


@pytest.mark.parametrize("dtype,precision", [(torch.float16, "split"), (torch.bfloat16, "split"),
                                             (torch.bfloat16, "tf32")], ids=str)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_16bit_input(bidirectional, dtype, precision):
    """16-bit inputs and outputs (float32 states and dots; on a GPU three TF32 products, or one for bfloat16
    with tc_precision="tf32")."""
    _check_forward(2, 77, 24, 16, bidirectional, not bidirectional, True, dtype, chunk=40, tc_precision=precision)


@pytest.mark.parametrize("chunk", [16, 40, 1000], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
def test_chunkings_and_masks(chunk, use_mask):
    """Whole sub-chunks, a chunk of 2.5 sub-chunks, one chunk for the whole sequence; more columns than one
    program takes (B x chunks > 16) and channels over two blocks; N = 20 (32 padded states)."""
    _check_forward(3, 131, 20, 20, False, True, use_mask, compare_states=use_mask, chunk=chunk, block_d=16, cols=16)
    _check_forward(3, 131, 20, 5, True, False, use_mask, compare_states=use_mask, chunk=chunk, block_d=16, cols=16)


@pytest.mark.parametrize("block_d", [8, 16])
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
def test_even_shapes_without_masks(use_mask, block_d):
    """Whole chunks of whole sub-chunks, whole channel blocks and column groups: the launcher compiles the
    passes without any load or store mask (EVEN); both channel tiles."""
    _check_forward(2, 128, 32, 16, False, True, use_mask, compare_states=True, chunk=16, block_d=block_d, cols=16)
    _check_forward(2, 128, 32, 3, True, False, use_mask, compare_states=True, chunk=16, block_d=block_d, cols=16)


@pytest.mark.parametrize("bsz,cols", [(2, 16), (3, 16), (40, 16)], ids=["B<NB", "B-odd", "B>NB"])
def test_lookback_single_pass(bsz, cols):
    """One launch: each program takes the states entering its chunks from earlier programs (columns run (chunk,
    batch) in order, so a chunk's predecessor sits in the same program, the one before, or further back when B
    exceeds the columns per program), with masks and an initial state; N = 3 and 20."""
    _check_forward(bsz, 150, 18, 3, False, True, True, chunk=16, cols=cols, lookback=True)
    _check_forward(bsz, 160, 16, 20, False, True, False, chunk=16, cols=cols, lookback=True)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_backward_from_tensor_core_states(bidirectional):
    """The backward run on the chunk states of the tensor-core forward (as the op hands the forward's states to
    the backward): every gradient against the float64 reference."""
    from test_ema_triton import _reference

    x, coefs, coefs64, mask, state = _inputs(3, 131, 20, 5, bidirectional, not bidirectional)
    gy = torch.randn_like(x)
    _, _, states = ema_fwd(x, *coefs, mask, state, bidirectional, 0, False, return_states=True, tensor_cores=True,
                           chunk=40)
    grads = ema_bwd(gy, None, x, *coefs, mask, state, bidirectional, 0, states=states, chunk=40)
    ref = _reference(x.double(), coefs64, mask, None if state is None else state.double(), gy, None,
                     bidirectional, 0)
    low = _reference(x, coefs, mask, state, gy, None, bidirectional, 0)
    for name, g, r, lo in zip(["dx", "da", "dq", "dc", "domega", "dstate"], grads, ref[1], low[1]):
        assert_close_to_reference(name, g, r, lo)


@pytest.mark.parametrize("length,chunk", [(131, 32), (40, 64)], ids=["chunks", "one-chunk"])
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_final_state(length, chunk, with_state):
    """return_state: the last chunk's end state from its local state and the state entering it, against the
    float64 reference, over several chunks (a partial last one) or one, from zero or an initial state."""
    x, coefs, coefs64, mask, state = _inputs(3, length, 20, 5, False, with_state)
    _, final = ema_fwd(x, *coefs, mask, state, False, 0, True, tensor_cores=True, chunk=chunk)
    ref = ema_fft(x.double(), *coefs64, mask=mask, state=None if state is None else state.double(),
                  return_state=True)[1]
    low = ema_fft(x, *coefs, mask=mask, state=state, return_state=True)[1]
    assert_close_to_reference("final state", final, ref, low)


# (B, L, D, N, bidirectional, epilogue, reverse, mask_in, with s0, chunk): the backward's scans
SCANS = [
    (3, 131, 20, 5, False, "dsilu", False, True, True, 32),
    (3, 131, 20, 5, True, "dsilu", False, True, False, 40),
    (3, 131, 20, 5, False, "dx", True, False, True, 32),    # the adjoint: reversed, keep on the output
    (3, 131, 20, 5, True, "dx", True, False, False, 40),
    (2, 128, 32, 16, True, "dx", True, False, False, 16),   # EVEN
    (2, 128, 32, 3, False, "dsilu", False, True, True, 16),  # EVEN
    (2, 50, 17, 3, False, "silu", True, True, True, 24),    # a reversed forward with a masked input
    (2, 50, 17, 3, False, "dx", True, False, True, 64),     # one chunk, reversed
]


@pytest.mark.parametrize("case", SCANS, ids=str)
def test_backward_scans_match_the_sweeps(case):
    """ema_scan(tensor_cores=True) with the backward's epilogues (dL/dz and its per-chunk sums with x; the
    adjoint's dx, keep applied to its EMA part), reversed rows, an initial state, and from given chunk states:
    out, chunk states, dom and (one direction) the final state as the sweeps give them."""
    bsz, length, dim, ndim, bidirectional, epi, reverse, mask_in, with_s0, chunk = case
    x, coefs, _, mask, state, = _inputs(bsz, length, dim, ndim, bidirectional, with_s0)[:5]
    a, q, c, omega = coefs
    epilogue = {"silu": ema_sweep.EPI_SILU, "dsilu": ema_sweep.EPI_DSILU, "dx": ema_sweep.EPI_DX}[epi]
    args = dict(bidirectional=bidirectional, truncation=0, epilogue=epilogue, reverse=reverse, mask_in=mask_in,
                out_dtype=torch.float32, chunk=chunk, gy=torch.randn_like(x) if epi == "dsilu" else None)
    s0 = None if state is None else (q * state).contiguous()
    keep = fwd_mod.keep_of(mask)
    want = fwd_mod.ema_scan(x, a, q, c, omega, keep, s0, write_final=not bidirectional, **args)
    got = fwd_mod.ema_scan(x, a, q, c, omega, keep, s0, tensor_cores=True, write_final=not bidirectional, **args)
    again = fwd_mod.ema_scan(x, a, q, c, omega, keep, s0, tensor_cores=True, states=want.buf, **args)
    for name, g, w in (("out", got.out, want.out), ("buf", got.buf, want.buf), ("dom", got.dom, want.dom),
                       ("final", got.final, want.final), ("out from states", again.out, want.out),
                       ("dom from states", again.dom, want.dom)):
        if w is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_outputs_poisoned_with_nan(monkeypatch):
    """Every output and workspace starts as NaN: the passes must write each element they later read."""
    monkeypatch.setattr(fwd_mod, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                                     dtype=dtype, device=device))
    _check_forward(3, 50, 17, 3, False, True, True, chunk=24)
    _check_forward(3, 50, 17, 3, True, False, True, chunk=24)
    _check_forward(3, 50, 17, 3, False, True, True, chunk=24, lookback=True)


@pytest.mark.parametrize("dtype,lookback,block_d", [(torch.float32, False, 8), (torch.float16, False, 16),
                                                   (torch.float32, True, 16)], ids=str)
def test_default_tile(monkeypatch, dtype, lookback, block_d):
    """Every pass takes ema_tc.default_block_d channels per program when block_d is not given: 8 for float32
    (two programs per SM on sm_90, where 16 fit one), 16 for 16-bit inputs and for the look-back."""
    from mega_kernels.triton import ema_tc

    launches = record_launches(monkeypatch, ema_tc, "_tc_scan_kernel")
    _check_forward(2, 64, 24, 3, False, True, True, dtype, chunk=16, lookback=lookback)
    assert launches and all(kw["BD"] == block_d for kw in launches)


@pytest.mark.parametrize("option,match", [
    (dict(truncation=5), "truncation"),
    (dict(lookback=True, bidirectional=True), "one direction only"),
    (dict(block_d=4), "power of two >= 8"),
    (dict(tc_precision="tf32"), "'tf32' for bfloat16 inputs only"),
])
def test_refuses_what_it_does_not_take(option, match):
    option = dict(option)  # (the parametrized dict is shared: leave it unchanged)
    x, coefs, _, _, _ = _inputs(2, 40, 8, 3, False, False)
    args = dict(truncation=0, return_state=False, bidirectional=False)
    args.update({k: option.pop(k) for k in list(option) if k in args})
    if args["bidirectional"]:
        x, coefs, _, _, _ = _inputs(2, 40, 8, 3, True, False)
    with pytest.raises(ValueError, match=match):
        ema_fwd(x, *coefs, None, None, args["bidirectional"], args["truncation"], args["return_state"],
                tensor_cores=True, chunk=16, **option)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bidirectional,precision", [(torch.bfloat16, False, "split"),
                                                           (torch.bfloat16, True, "tf32"),
                                                           (torch.float32, False, "split")], ids=str)
def test_gpu_tensor_core_precision(dtype, bidirectional, precision):
    """On a GPU the dots are TF32 products (the interpreter's are exact): L = 4096 in chunks of 256 against the
    float64 reference under the tolerance rule, split operands in float32 and bfloat16, one TF32 product in
    bfloat16."""
    _check_forward(2, 4096, 96, 16, bidirectional, not bidirectional, True, dtype, chunk=256, tc_precision=precision)


def test_refuses_more_states_than_its_tiles_hold():
    """N > 32 pads to 64-state tiles, which need more shared memory than an sm_90 program has (the interpreter
    has no such limit): refused by name, with the fix; N = 32 runs."""
    x, coefs, _, _, _ = _inputs(1, 16, 8, 33, False, False)
    with pytest.raises(ValueError, match=r"N <= 32 .* got N = 33; leave tensor_cores off"):
        ema_fwd(x, *coefs, None, None, False, 0, False, tensor_cores=True, chunk=16)
    x, coefs, _, _, _ = _inputs(1, 16, 8, 32, False, False)
    ema_fwd(x, *coefs, None, None, False, 0, False, tensor_cores=True, chunk=16)
