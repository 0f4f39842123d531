"""Triton-specific EMA tests: the chunked-scan variants (three-pass carry, single-pass look-back, sequential),
NaN-poisoned outputs, determinism, torch.library registration (opcheck, torch.compile), input errors, and the
GPU-only checks (bfloat16, long sequences). Backend-generic accuracy tests live in test_ema_backends.py."""
from __future__ import annotations

import os

import pytest
import torch

import mega_kernels.ops as ops
from helpers import (assert_close_to_reference, ema_params, guarded, poison_empty, random_mask, record_launches,
                     triton_ema_gate)
from mega_kernels.reference.ema import ema_coefficients, ema_fft

DEVICE, _REASON, pytestmark = triton_ema_gate()

if _REASON is None:
    from mega_kernels.ops.ema_triton import ema_bwd_triton, ema_fwd_triton, ema_step_triton
    from mega_kernels.triton import ema_fwd as fwd_mod
    from mega_kernels.triton.ema_bwd import ema_bwd
    from mega_kernels.triton.ema_fwd import ema_fwd
    from mega_kernels.triton.ema_step import ema_step_fwd


def _coefs(dim, ndim, bidirectional, device=DEVICE):
    """Float32 (a, q, c, omega) from fresh module parameters, and the float64 copies."""
    delta, alpha, beta, gamma, omega = ema_params(dim, ndim, bidirectional)
    a, q, c = (t.float().to(device) for t in ema_coefficients(delta, alpha, beta, gamma))
    omega = omega.float().to(device)
    return (a, q, c, omega), tuple(t.double() for t in (a, q, c, omega))


def _case(bsz, length, dim, ndim, bidirectional, with_state, dtype=torch.float32, device=DEVICE):
    coefs, coefs64 = _coefs(dim, ndim, bidirectional, device)
    x = torch.randn(bsz, length, dim, device=device).to(dtype)
    mask = random_mask(bsz, length, device=device)
    state = torch.randn(bsz, dim, ndim, device=device) if with_state else None
    gy = torch.randn(bsz, length, dim, device=device).to(dtype)
    gs = torch.randn(bsz, dim, ndim, device=device) if with_state else None
    return coefs, coefs64, x, mask, state, gy, gs


def _reference(x, coefs, mask, state, gy, gs, bidirectional, truncation):
    """Reference outputs and gradients (x, a, q, c, omega[, state]) in the dtype of x / coefs."""
    leaves = [x.detach().clone().requires_grad_()] + [t.detach().clone().requires_grad_() for t in coefs]
    st = None if state is None else state.detach().clone().to(coefs[0].dtype).requires_grad_()
    out = ema_fft(*leaves, mask=mask, bidirectional=bidirectional, truncation=truncation or None, state=st,
                  return_state=gs is not None)
    y, final = out if gs is not None else (out, None)
    loss = (y.double() * gy.double()).sum() + (0 if gs is None else (final.double() * gs.double()).sum())
    grads = torch.autograd.grad(loss, leaves + ([st] if st is not None else []))
    return (y, final), grads


def _check(x, coefs, coefs64, mask, state, gy, gs, bidirectional, truncation, **tuning):
    fwd_tuning = {k: v for k, v in tuning.items() if k != "param_group_steps"}
    y, final = ema_fwd(x, *coefs, mask, state, bidirectional, truncation, gs is not None, **fwd_tuning)
    grads = ema_bwd(gy, gs, x, *coefs, mask, state, bidirectional, truncation, **tuning)
    ref = _reference(x.double(), coefs64, mask, None if state is None else state.double(), gy, gs, bidirectional,
                     truncation)
    low = _reference(x, coefs, mask, state, gy, gs, bidirectional, truncation)
    assert_close_to_reference("y", y, ref[0][0], low[0][0])
    if gs is not None:
        assert_close_to_reference("final state", final, ref[0][1], low[0][1])
    names = ["dx", "da", "dq", "dc", "domega", "dstate"]
    for name, g, r, lo in zip(names, grads, ref[1], low[1]):
        assert_close_to_reference(name, g, r, lo)
    return (y, final), grads


# -- chunked-scan variants --------------------------------------------------------------------------------
# chunk 8 over L = 21: three chunks, the last one partial; lookback only exists for one direction. The
# parameter sweep runs in groups of param_group_steps (whole chunks): 2 groups, the last one partial.
CARRY = dict(chunk=8, lookback=False, param_group_steps=16, unroll=1)
LOOKBACK = dict(chunk=8, lookback=True, param_group_steps=8)
SEQUENTIAL = dict(chunk=64)
# chunks of 6 steps with 4-row tiles: every chunk ends in a partial tile (the sweeps' scalar tails mid-sequence)
ODD_CHUNK = dict(chunk=6, lookback=False, param_group_steps=12, unroll=4)
VARIANTS = [(bi, trunc, tuning) for bi in (False, True) for trunc in (0, 5)
            for tuning in ((CARRY, LOOKBACK, SEQUENTIAL, ODD_CHUNK) if not bi else (CARRY, SEQUENTIAL, ODD_CHUNK))]


@pytest.mark.parametrize("bidirectional,truncation,tuning", VARIANTS, ids=str)
def test_chunked_variants(bidirectional, truncation, tuning):
    with_state = not bidirectional and truncation == 0
    coefs, coefs64, x, mask, state, gy, gs = _case(3, 21, 5, 3, bidirectional, with_state)
    _check(x, coefs, coefs64, mask, state, gy, gs, bidirectional, truncation, block_d=4, **tuning)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_carry_over_many_chunk_groups(bidirectional):
    """18 chunks (the last one partial): the carry scans them in groups of 16 (ema_fwd._carry_kernel), so the
    state crosses a group boundary in every scan, forward and backward, in both directions."""
    coefs, coefs64, x, mask, state, gy, gs = _case(2, 52, 3, 2, bidirectional, not bidirectional)
    _check(x, coefs, coefs64, mask, state, gy, gs, bidirectional, 0, block_d=4, chunk=3, lookback=False,
           param_group_steps=48, unroll=1)


def test_outputs_poisoned_with_nan(monkeypatch):
    """Every output and workspace starts as NaN: the kernels must write each element they later read."""
    monkeypatch.setattr(fwd_mod, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                                     dtype=dtype, device=device))
    for bidirectional, tuning in ((False, dict(chunk=4, lookback=True)), (True, dict(chunk=4, lookback=False))):
        with_state = not bidirectional
        coefs, coefs64, x, mask, state, gy, gs = _case(3, 11, 6, 3, bidirectional, with_state)
        _check(x, coefs, coefs64, mask, state, gy, gs, bidirectional, 0, block_d=4, **tuning)
    (a, q, c, omega), _ = _coefs(6, 3, False)
    y, s = ema_step_fwd(torch.randn(3, 6, device=DEVICE), a, q, c, omega, torch.randn(3, 6, 3, device=DEVICE),
                        None)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()


@pytest.mark.parametrize("bidirectional,truncation,tuning", [(False, 5, ODD_CHUNK), (True, 5, CARRY),
                                                            (False, 0, LOOKBACK), (True, 0, ODD_CHUNK)], ids=str)
def test_reads_stay_inside_the_inputs(bidirectional, truncation, tuning):
    """No load outside x, the coefficients, the state or the gradients reaches a result: each sits between NaNs
    (truncation reads x before each chunk; the look-back; both directions)."""
    with_state = not bidirectional and truncation == 0
    coefs, coefs64, x, mask, state, gy, gs = _case(2, 21, 5, 3, bidirectional, with_state)
    maybe = lambda t: None if t is None else guarded(t)  # noqa: E731
    _check(guarded(x), [guarded(t) for t in coefs], coefs64, mask, maybe(state), guarded(gy), maybe(gs),
           bidirectional, truncation, block_d=4, **tuning)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_backward_workspace_peak(monkeypatch, bidirectional):
    """The backward's live (B, L, D) buffers (kernel outputs and workspaces, counted from allocation to
    release; the small per-chunk ones are not counted) stay within 8 bytes per element for 16-bit x: g
    (float32) and one float32 sum or the 16-bit dx, never g, a float32 sum and dx together (the issue's
    peak-memory target is 1.5x the bytes of x, y and their gradients, 8 bytes per element in 16 bits)."""
    import weakref
    live, peak = [0], [0]
    coefs, _, x, mask, _, gy, _ = _case(1, 512, 8, 2, bidirectional, False, dtype=torch.float16)

    def tracked(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        if t.numel() == x.numel():
            live[0] += t.nbytes
            peak[0] = max(peak[0], live[0])
            weakref.finalize(t, lambda n=t.nbytes: live.__setitem__(0, live[0] - n))
        return t

    monkeypatch.setattr(fwd_mod, "_empty", tracked)
    grads = ema_bwd(gy, None, x, *coefs, mask, None, bidirectional, 0, chunk=128)
    assert grads[0].dtype == torch.float16
    assert peak[0] <= 8 * x.numel(), f"backward peak {peak[0] / x.numel():.2f} bytes per element"


@pytest.fixture
def chunk_state_launches(monkeypatch):
    """The grids of every `_chunk_state_kernel` launch from here on (a list that grows)."""
    launches = []
    real = fwd_mod._chunk_state_kernel

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(fwd_mod, "_chunk_state_kernel", Counted())
    return launches


def _chunk_local_states(u, a, q, chunk, reverse):
    """(nc, B, N, 2D) buf of the bidirectional chunk-state pass, computed directly: a H_loc of each chunk from a
    zero state, sum_t a q^(steps from t to the chunk's end in that direction) u_t, rows [:D] forward in time
    (backward when reverse), rows [D:] the other way."""
    dim = u.shape[2]
    chunks = []
    for seg in u.split(chunk, dim=1):
        t = torch.arange(seg.shape[1], dtype=u.dtype, device=u.device)
        rows = []
        for r, forward in ((slice(0, dim), not reverse), (slice(dim, 2 * dim), reverse)):
            lag = seg.shape[1] - 1 - t if forward else t
            w = a[r].t()[None] * q[r].t()[None] ** lag[:, None, None]  # (n, N, D)
            rows.append(torch.einsum("bld,lnd->bnd", seg, w))
        chunks.append(torch.cat(rows, -1))
    return torch.stack(chunks)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("length,chunk,unroll", [(37, 16, 4), (21, 8, 1), (19, 6, 4), (9, 64, 4)])
def test_bidirectional_chunk_states_in_one_read(reverse, length, chunk, unroll):
    """Without truncation one program writes both directions' chunk states from one walk forward in time (BOTH):
    against the float64 local states, over whole and partial 4-row tiles, partial chunks and a single chunk, in
    both orientations, with a mask; the per-direction programs give the same."""
    bsz, dim, ndim = 3, 5, 3
    coefs, coefs64, x, mask, *_ = _case(bsz, length, dim, ndim, True, False)
    u = x * mask[..., None]
    ref = _chunk_local_states(u.double(), coefs64[0], coefs64[1], chunk, reverse)
    low = _chunk_local_states(u, coefs[0], coefs[1], chunk, reverse)
    aT, qT = (t.t().contiguous() for t in coefs[:2])
    nc = -(-length // chunk)
    for both in (True, False):
        buf = torch.full((nc, bsz, ndim, 2 * dim), float("nan"), device=DEVICE)
        fwd_mod._chunk_state_kernel[(nc * bsz * (1 if both else 2),)](
            x, fwd_mod.keep_of(mask), aT, qT, buf, bsz, length, dim, ndim, 0, chunk, 1, NDIR=2, REVERSE=reverse,
            MASK_IN=True, TRUNC=False, BLOCK_N=4, BLOCK_D=8, UNROLL=unroll, BOTH=both)
        assert_close_to_reference(f"chunk states (both={both})", buf, ref, low)


@pytest.mark.parametrize("case,state_caps,out_caps", [
    # forward, then the backward's recomputation (its chunk states) and its two scans (dL/dz, adjoint)
    (dict(bidirectional=True), [None, None], [128, 128, 128]),
    (dict(), [80, 80], [None, 96, None]),
    (dict(mask=True), [None, None], [None, None, None]),       # masks: only both directions' output passes
    (dict(bidirectional=True, mask=True), [None, None], [128, 128, 128]),
    (dict(truncation=3), [None, None, None], [None, None, None]),  # (+ the adjoint's own chunk states)
    (dict(ndim=8), [None, None], [None, None, None]),           # BLOCK_N 8: ptxas would spend the cap
    (dict(block_d=8), [None, None], [None, None, None]),        # tiles other than the launcher's GPU ones
    (dict(register_cap=False), [None, None], [None, None, None]),
], ids=str)
def test_register_caps_of_the_sweeps(monkeypatch, case, state_caps, out_caps):
    """The sweeps launch with a register cap only where _register_cap checked it: the GPU tiles (32 channels,
    one warp, 4 rows per iteration, BLOCK_N 16), no truncation; one direction's unmasked chunk states, both
    directions' output passes, the backward's unmasked dL/dz scan. The results stay the reference's (under the
    interpreter a cap does nothing)."""
    states = record_launches(monkeypatch, fwd_mod, "_chunk_state_kernel")
    outs = record_launches(monkeypatch, fwd_mod, "_scan_out_kernel")
    bidirectional, truncation = case.get("bidirectional", False), case.get("truncation", 0)
    coefs, coefs64, x, mask, _, gy, _ = _case(2, 40, 5, case.get("ndim", 16), bidirectional, False)
    tuning = dict(chunk=16, block_d=case.get("block_d", 32), num_warps=1, unroll=4)
    if "register_cap" in case:
        tuning["register_cap"] = case["register_cap"]
    _check(x, coefs, coefs64, mask if case.get("mask") else None, None, gy, None, bidirectional, truncation,
           **tuning)
    assert [kw.get("maxnreg") for kw in states] == state_caps
    assert [kw.get("maxnreg") for kw in outs] == out_caps


@pytest.mark.parametrize("truncation", [0, 5])
def test_adjoint_takes_its_local_states_from_the_parameter_sweep(chunk_state_launches, truncation):
    """Without truncation the backward runs one chunk-state pass (the recomputed forward), not two: the adjoint
    scan's chunk-local states come from the parameter sweep. With truncation the adjoint computes its own."""
    coefs, coefs64, x, mask, _, gy, _ = _case(2, 19, 5, 3, True, False)
    _check(x, coefs, coefs64, mask, None, gy, None, True, truncation, block_d=4, chunk=4, param_group_steps=8)
    assert len(chunk_state_launches) == (2 if truncation == 0 else 3)  # forward + recomputed forward (+ adjoint)


@pytest.fixture
def short_chunks(monkeypatch):
    """The default chunk at 16 steps instead of 256, so that ops.ema splits short sequences into several chunks
    (the interpreter runs each step in Python)."""
    monkeypatch.setattr(fwd_mod, "DEFAULT_CHUNK", 16)
    return 16


def test_backward_reuses_the_forward_chunk_states(chunk_state_launches, short_chunks):
    """Through ops.ema (autograd), the backward's recomputation of the forward starts from the chunk states the
    forward saved: one chunk-state pass in all (the forward's), not two; gradients as without them."""
    launches = chunk_state_launches
    params = [p.float().to(DEVICE).requires_grad_() for p in ema_params(4, 2, False)]
    x = torch.randn(2, 2 * short_chunks + 8, 4, device=DEVICE, requires_grad=True)  # three chunks
    y = ops.ema(x, *params, backend="triton")
    grads = torch.autograd.grad(y.square().sum(), [x, *params])
    assert len(launches) == 1
    a, q, c = ema_coefficients(*params[:4])
    direct = ema_bwd((2 * y).detach(), None, x.detach(), a.detach(), q.detach(), c.detach(), params[4].detach(),
                     None, None, False, 0)
    torch.testing.assert_close(grads[0], direct[0])
    assert len(launches) == 2  # without saved states the backward computes its own


def test_backward_gets_none_for_an_unused_output(monkeypatch):
    """Autograd makes no zeros for an output the loss does not use (set_materialize_grads(False) in
    register_ema_autograd): with return_state=True and a loss on y, the backward gets grad_state None. (The
    saved chunk states' gradient, never used, is None the same way: B * D * N * L / chunk floats not allocated.)"""
    import mega_kernels.ops.ema_triton as backend_mod

    seen, real = [], backend_mod._ema_bwd

    def recording(grad_y, grad_state, *rest, **kw):
        seen.append(grad_state)
        return real(grad_y, grad_state, *rest, **kw)

    monkeypatch.setattr(backend_mod, "_ema_bwd", recording)
    params = [p.float().to(DEVICE).requires_grad_() for p in ema_params(4, 2, False)]
    x = torch.randn(2, 5, 4, device=DEVICE, requires_grad=True)
    y, _ = ops.ema(x, *params, state=torch.zeros(2, 4, 2, device=DEVICE), return_state=True, backend="triton")
    y.sum().backward()
    assert seen == [None]


def test_backward_is_deterministic():
    coefs, _, x, mask, _, gy, _ = _case(3, 37, 5, 3, True, False)
    first = ema_bwd(gy, None, x, *coefs, mask, None, True, 0, chunk=8)
    second = ema_bwd(gy, None, x, *coefs, mask, None, True, 0, chunk=8)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# -- torch.library registration ---------------------------------------------------------------------------
def test_opcheck(short_chunks):
    coefs, _, x, mask, state, gy, gs = _case(3, 5, 3, 2, False, True)
    torch.library.opcheck(ema_fwd_triton, (x, *coefs, mask, state, False, 0, True))
    torch.library.opcheck(ema_fwd_triton, (x, *_coefs(3, 2, True)[0], None, None, True, 2, False))
    torch.library.opcheck(ema_bwd_triton, (gy, gs, x, *coefs, mask, state, False, 0))
    x2, gy2 = (torch.randn(2, short_chunks + 4, 3, device=DEVICE) for _ in range(2))  # two chunks
    _, _, saved = ema_fwd_triton(x2, *coefs, None, None, False, 0, False)
    assert tuple(saved.shape) == (2, 2, 2, 3)  # (nc, B, N, kd)
    torch.library.opcheck(ema_bwd_triton, (gy2, None, x2, *coefs, None, None, False, 0, saved))
    torch.library.opcheck(ema_step_triton, (x[:, 0].contiguous(), *coefs, state, mask[:, 0].contiguous()))


@pytest.mark.parametrize("length", [9, 20])
def test_torch_compile_fullgraph(length, short_chunks):
    """torch.compile traces the op without graph breaks, forward and backward (aot_eager on the CPU, where
    inductor would compile C++; inductor on a GPU); L = 20 is two chunks, so the forward saves chunk states
    (the fake op must give their shape)."""
    torch._dynamo.reset()
    params = [p.float().to(DEVICE).requires_grad_() for p in ema_params(5, 3, True)]
    x = torch.randn(2, length, 5, device=DEVICE, requires_grad=True)
    fn = lambda x, *p: ops.ema(x, *p, bidirectional=True, backend="triton")  # noqa: E731
    # Eager first: the backend registry imports its module lazily, which dynamo cannot trace.
    ref = fn(x, *params)
    ref_grads = torch.autograd.grad(ref.sum(), [x, *params])
    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    out = compiled(x, *params)
    grads = torch.autograd.grad(out.sum(), [x, *params])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


# -- compiled for a GPU without one -------------------------------------------------------------------------
_SM90_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mega_kernels.triton import ema_bwd, ema_fwd, ema_step, ema_tc, ema_tc_bwd

F32, BF16, U8, I32 = "*fp32", "*bf16", "*u8", "*i32"
TYPES = dict(u_ptr=BF16, x_ptr=BF16, keep_ptr=U8, out_ptr=BF16, y_ptr=BF16, flag_ptr=I32, ticket_ptr=I32)
common = dict(BLOCK_N=16, BLOCK_D=32)
scan = dict(EPI=1, BIDIR=False, REVERSE=False, MASK_IN=True, MASK_OUT=False, TRUNC=False, HAS_S0=True,
            CARRY=False, LOOKBACK=True, WRITE_FINAL=True, UNROLL=4)
CASES = [
    (ema_fwd._scan_out_kernel, scan),
    (ema_fwd._scan_out_kernel, dict(scan, EPI=2, BIDIR=True, TRUNC=True, HAS_S0=False, CARRY=True, LOOKBACK=False,
                                    WRITE_FINAL=False, K=1, N=1)),
    (ema_fwd._scan_out_kernel, dict(scan, EPI=3, REVERSE=True, MASK_IN=False, MASK_OUT=True)),
    (ema_fwd._chunk_state_kernel, dict(NDIR=2, REVERSE=True, MASK_IN=True, TRUNC=True, UNROLL=4)),
    (ema_fwd._chunk_state_kernel, dict(NDIR=2, REVERSE=False, MASK_IN=False, TRUNC=False, UNROLL=4, BOTH=True)),
    (ema_fwd._carry_kernel, dict(REVERSE=True, HAS_S0=True, SCALE_LOC=True, BLOCK=128)),
    (ema_bwd._param_grad_kernel, dict(NDIR=2, MASK_IN=True, TRUNC=True, HAS_S=True, HAS_BUF=True, UNROLL=4)),
    (ema_bwd._param_carry_kernel, dict(HAS_S=True, HAS_GS=True, BLOCK=128, GROUP_P2=4)),
    (ema_step._ema_step_kernel, dict(HAS_MASK=True)),
    (ema_tc._operators_kernel, dict(SUB=16)),
    (ema_tc._tc_scan_kernel, dict(STATES=True, NDIR=2, MASK_IN=True, HAS_S0=False, CARRY=False, LOOKBACK=False,
                                  EVEN=False, PREC="split", EXACT_X=True, SUB=16, BD=16, NB=16)),
    (ema_tc._tc_scan_kernel, dict(STATES=False, NDIR=2, MASK_IN=True, HAS_S0=False, CARRY=True, LOOKBACK=False,
                                  EVEN=False, PREC="tf32", EXACT_X=True, SUB=16, BD=16, NB=16)),
    (ema_tc._tc_scan_kernel, dict(STATES=False, NDIR=1, MASK_IN=False, HAS_S0=True, CARRY=True, LOOKBACK=False,
                                  EVEN=True, PREC="split", EXACT_X=True, SUB=16, BD=16, NB=32, EPI=2)),
    (ema_tc._tc_scan_kernel, dict(STATES=False, NDIR=1, MASK_IN=True, HAS_S0=True, CARRY=False, LOOKBACK=True,
                                  EVEN=False, PREC="split", EXACT_X=True, SUB=16, BD=16, NB=16)),
    (ema_tc._tc_scan_kernel, dict(STATES=False, NDIR=2, MASK_IN=False, HAS_S0=True, CARRY=True, LOOKBACK=False,
                                  EVEN=False, PREC="split", EXACT_X=False, SUB=16, BD=16, NB=16, EPI=3, REVERSE=True,
                                  MASK_OUT=True)),
    (ema_tc_bwd._param_operators_kernel, dict(SUB=16)),
    (ema_tc_bwd._tc_param_kernel, dict(NDIR=2, MASK_IN=True, HAS_S=False, HAS_BUF=True, EVEN=False, EXACT_X=True,
                                       SUB=16, BD=8, NB=16)),
    (ema_tc_bwd._tc_param_kernel, dict(NDIR=1, MASK_IN=False, HAS_S=True, HAS_BUF=True, EVEN=True, EXACT_X=False,
                                       SUB=16, BD=8, NB=16)),
]
for fn, consts in CASES:
    if "BLOCK" not in consts:
        consts = dict({k: v for k, v in common.items() if k in fn.arg_names}, **consts)
    consts = dict({p.name: p.default for p in fn.params if p.has_default}, **consts)  # defaulted constexprs
    sig = {n: "constexpr" if n in consts else TYPES.get(n, "*fp32" if n.endswith("_ptr") else "i32")
           for n in fn.arg_names}
    for warps in (1, 2):
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps))
        assert "cubin" in k.asm, fn.__name__
print("compiled", len(CASES))
"""


def test_kernels_compile_for_sm90():
    """The interpreter never compiles: build every kernel family for sm_90 (PTX + cubin, no GPU needed) in a
    clean process (TRITON_INTERPRET unset), including Triton's specialization of integer arguments equal to 1."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# -- input errors -----------------------------------------------------------------------------------------
def test_clear_errors():
    (a, q, c, omega), _ = _coefs(4, 2, False)
    x = torch.randn(2, 5, 4, device=DEVICE)
    with pytest.raises(TypeError, match="float64.*backend='reference'"):
        ema_fwd(x.double(), a, q, c, omega, None, None, False, 0, False)
    with pytest.raises(ValueError, match="x must be contiguous"):
        ema_fwd(x.transpose(0, 1).contiguous().transpose(0, 1), a, q, c, omega, None, None, False, 0, False)
    with pytest.raises(ValueError, match="mask must be"):
        ema_fwd(x, a, q, c, omega, torch.ones(2, 5, dtype=torch.uint8, device=DEVICE), None, False, 0, False)
    with pytest.raises(ValueError, match="a must be \\(8, N\\)"):
        ema_fwd(x, a, q, c, omega, None, None, True, 0, False)
    with pytest.raises(ValueError, match="state must be"):
        ema_fwd(x, a, q, c, omega, None, torch.zeros(2, 4, 3, device=DEVICE), False, 0, True)
    with pytest.raises(ValueError, match="grad_y must be"):
        ema_bwd(x[:, :3].contiguous(), None, x, a, q, c, omega, None, None, False, 0)
    with pytest.raises(ValueError, match="grad_y must be .* on"):
        ema_bwd(x.to("meta"), None, x, a, q, c, omega, None, None, False, 0)
    for tensor_cores in (False, True):
        with pytest.raises(ValueError, match="chunk must be a positive number of steps"):
            ema_fwd(x, a, q, c, omega, None, None, False, 0, False, chunk=-16, tensor_cores=tensor_cores)
    for unroll in (0, 3, 2.0):  # a tile's rows: tl.arange needs a power of two
        with pytest.raises(ValueError, match="ema_scan: unroll must be a power of two"):
            ema_fwd(x, a, q, c, omega, None, None, False, 0, False, unroll=unroll)
    from mega_kernels.triton.ema_fwd import ema_scan
    for out, tensor_cores in ((torch.empty(2, 5, 3, device=DEVICE), False), (torch.empty_like(x).half(), False),
                              (torch.empty_like(x), True)):
        with pytest.raises(ValueError, match="ema_scan: out must be a contiguous"):
            ema_scan(x, a, q, c, omega, None, None, bidirectional=False, truncation=0, epilogue=0,
                     out_dtype=torch.float32, out=out, tensor_cores=tensor_cores)
    # the parameter sweep sums blocks of 64 steps, each a whole number of tiles: 128-step tiles would count twice
    with pytest.raises(ValueError, match="ema_param_grads: unroll must be a power of two up to 64"):
        ema_bwd(x, None, x, a, q, c, omega, None, None, False, 0, unroll=128, chunk=256)
    with pytest.raises(ValueError, match="ema_step: x must be"):
        ema_step_fwd(x, a, q, c, omega, torch.zeros(2, 4, 2, device=DEVICE), None)


@pytest.mark.parametrize("initial,final,dtype,saved", [(False, False, torch.float32, False),
                                                       (True, True, torch.float32, False),
                                                       (False, True, torch.float32, True),
                                                       (True, True, torch.bfloat16, True)],
                         ids=["plain", "state", "grad-state-saved", "state-bf16-saved"])
def test_long_backward_runs_in_segments(initial, final, dtype, saved, monkeypatch):
    """A unidirectional backward whose float32 g would exceed SEGMENT_BYTES runs in segments of whole chunks
    (here 16 steps: three over L = 37, the last partial), handing the state gradient from each segment to the one
    before, from the forward's saved chunk states (saved, as the op passes them) or a forward pre-pass: every
    gradient, the initial state's too, against the float64 reference under the tolerance rule."""
    from mega_kernels.triton import ema_bwd as bwd_mod

    coefs, coefs64, x, mask, state, gy, gs = _case(2, 37, 5, 3, False, True, dtype=dtype)
    state, gs = (state if initial else None), (gs if final else None)
    monkeypatch.setattr(bwd_mod, "SEGMENT_BYTES", 4 * 2 * 5 * 16)
    assert bwd_mod.segment_steps(x, False, 0, dict(chunk=8)) == 16
    assert bwd_mod.segment_steps(x, True, 0, dict(chunk=8)) == 37  # bidirectional: one piece
    segmented, real = [], bwd_mod._segmented_bwd
    monkeypatch.setattr(bwd_mod, "_segmented_bwd", lambda *a: segmented.append(a[9] is not None) or real(*a))
    monkeypatch.setattr(fwd_mod, "ema_fwd", lambda *a, **k: pytest.fail("pre-pass with saved states") if saved
                        else ema_fwd(*a, **k))
    *_, states = ema_fwd(x, *coefs, mask, state, False, 0, final, return_states=True, chunk=8)
    grads = ema_bwd(gy, gs, x, *coefs, mask, state, False, 0, states=states if saved else None, chunk=8,
                    param_group_steps=16)
    assert segmented == [saved]
    ref = _reference(x.double(), coefs64, mask, None if state is None else state.double(), gy, gs, False, 0)
    low = _reference(x, coefs, mask, state, gy, gs, False, 0)
    for name, g, r, lo in zip(["dx", "da", "dq", "dc", "domega", "dstate"], grads, ref[1], low[1]):
        assert_close_to_reference(name, g, r, lo)
    assert (state is None) == (grads[5].numel() == 0)


@pytest.mark.parametrize("bidirectional,truncation,with_state,dtype,saved,rows,tc",
                         [(False, 0, True, torch.float32, True, 2, False),
                          (True, 0, False, torch.bfloat16, True, 2, False),
                          (False, 9, False, torch.float32, False, 2, False),
                          (False, 0, True, torch.float32, True, 0, False),
                          (False, 0, False, torch.float32, True, 2, True)],
                         ids=["state-saved", "bi-bf16-saved", "trunc", "rows-in-segments", "tensor-cores"])
def test_backward_in_batch_groups(bidirectional, truncation, with_state, dtype, saved, rows, tc, monkeypatch):
    """A backward whose float32 workspace exceeds its budget runs over groups of batch rows (here 2, 2 and 1 of
    B = 5; or one row at a time, each in time segments when even one row's exceeds it): every gradient, the
    initial state's too, against the float64 reference under the tolerance rule, from the forward's saved chunk
    states or without them. Every allocation starts as NaN: each group writes its rows of dx (the scans write
    them in place)."""
    from mega_kernels.triton import ema_bwd as bwd_mod

    coefs, coefs64, x, mask, state, gy, gs = _case(5, 37, 5, 3, bidirectional, with_state, dtype=dtype)
    poison_empty(monkeypatch)
    monkeypatch.setattr(fwd_mod, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                                     dtype=dtype, device=device))
    per_row = 4 * (2 if bidirectional and dtype != torch.float32 else 1) * 37 * 5
    assert bwd_mod.batch_rows(x, bidirectional, 2 * per_row) == 2
    assert bwd_mod.batch_rows(x, bidirectional, 5 * per_row) == 5 and bwd_mod.batch_rows(x, bidirectional, 1) == 1
    groups, real = [], bwd_mod._batched_bwd
    monkeypatch.setattr(bwd_mod, "_batched_bwd", lambda n, *a: groups.append(n) or real(n, *a))
    segmented, real_seg = [], bwd_mod._segmented_bwd
    monkeypatch.setattr(bwd_mod, "_segmented_bwd", lambda *a: segmented.append(a[2].shape) or real_seg(*a))
    tuning = dict(chunk=16, tensor_cores=True) if tc else dict(chunk=8)
    *_, states = ema_fwd(x, *coefs, mask, state, bidirectional, truncation, gs is not None, return_states=True,
                         **tuning)
    grads = ema_bwd(gy, gs, x, *coefs, mask, state, bidirectional, truncation, states=states if saved else None,
                    param_group_steps=16, workspace_budget=rows * per_row or per_row // 2, **tuning)
    assert groups == [max(rows, 1)]
    assert segmented == ([] if rows else [(1, 37, 5)] * 5)   # (segments of 16 steps: half a row's workspace)
    ref = _reference(x.double(), coefs64, mask, None if state is None else state.double(), gy, gs, bidirectional,
                     truncation)
    low = _reference(x, coefs, mask, state, gy, gs, bidirectional, truncation)
    for name, g, r, lo in zip(["dx", "da", "dq", "dc", "domega", "dstate"], grads, ref[1], low[1]):
        assert_close_to_reference(name, g, r, lo)
    assert (state is None) == (grads[5].numel() == 0)
    if rows == 2 and not tc:  # without param_group_steps: a group's parameter sweep keeps the whole batch's
        # program count (steps per program scaled by 2 / 5, a whole number of chunks)
        steps, real_pg = [], bwd_mod.ema_param_grads
        monkeypatch.setattr(bwd_mod, "ema_param_grads", lambda *a, **k: steps.append(k["group_steps"])
                            or real_pg(*a, **k))
        again = ema_bwd(gy, gs, x, *coefs, mask, state, bidirectional, truncation, workspace_budget=2 * per_row,
                        **tuning)
        assert steps == [bwd_mod.PARAM_GROUP_STEPS * 2 // 5 // 8 * 8] * 3
        for name, g, r, lo in zip(["dx", "da", "dq", "dc", "domega", "dstate"], again, ref[1], low[1]):
            assert_close_to_reference(name, g, r, lo)


def test_backward_workspace_budget_at_the_issue_shapes():
    """Where issue 3's peak (1.5x the bytes of x, y, dx, dy) needs the backward split: 16-bit inputs at the target
    shape by batch rows (g is twice the bytes of x; a bidirectional dx sum as much again), one long row into time
    segments; float32 and small inputs in one piece."""
    from mega_kernels.triton import ema_bwd as bwd_mod

    def budget(x):  # as ema_bwd sizes it
        return max(bwd_mod.WORKSPACE_FLOOR_BYTES, x.numel() * x.element_size())

    for dtype, bi, rows in ((torch.bfloat16, False, 4), (torch.bfloat16, True, 2), (torch.float32, False, 8),
                            (torch.float32, True, 8)):
        x = torch.empty(8, 4096, 1024, dtype=dtype, device="meta")
        assert bwd_mod.batch_rows(x, bi, budget(x)) == rows, (dtype, bi)
    x = torch.empty(1, 65536, 1024, dtype=torch.bfloat16, device="meta")
    assert bwd_mod.batch_rows(x, False, budget(x)) == 1
    assert bwd_mod.segment_steps(x, False, 0, dict(chunk=256), budget(x)) == 32768
    x = torch.empty(1, 1 << 20, 1024, dtype=torch.bfloat16, device="meta")
    assert bwd_mod.segment_steps(x, False, 0, dict(chunk=256), budget(x)) == 1 << 18   # (SEGMENT_BYTES)
    x = torch.empty(4, 512, 256, dtype=torch.bfloat16, device="meta")
    assert bwd_mod.batch_rows(x, True, budget(x)) == 4
    x = torch.empty(16, 65536, 1024, dtype=torch.bfloat16, device="meta")  # groups stay within SEGMENT_BYTES too
    assert bwd_mod.batch_rows(x, False, budget(x)) == 4                  # (a group in segments would copy)


def test_launches_make_the_inputs_device_current(monkeypatch):
    """Triton launches on the current device: the forward, backward and step ops enter x's device first (on a CPU
    tensor a no-op), so inputs on cuda:1 while cuda:0 is current run where they live."""
    import mega_kernels.triton as kernels

    seen, real = [], kernels.on_device_of
    monkeypatch.setattr(kernels, "on_device_of", lambda t: seen.append(t.device) or real(t))
    (a, q, c, omega), _ = _coefs(4, 2, False)
    x = torch.randn(2, 5, 4, device=DEVICE)
    ema_fwd_triton(x, a, q, c, omega, None, None, False, 0, False)
    ema_bwd_triton(x, None, x, a, q, c, omega, None, None, False, 0)
    ema_step_triton(x[:, 0].contiguous(), a, q, c, omega, torch.zeros(2, 4, 2, device=DEVICE), None)
    assert seen == [x.device] * 3


# -- GPU only ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gpu_long_sequence(dtype, bidirectional):
    """L = 4096 in every variant (look-back, carry, sequential) against the float64 reference."""
    with_state = not bidirectional
    coefs, coefs64, x, mask, state, gy, gs = _case(2, 4096, 96, 16, bidirectional, with_state, dtype)
    for tuning in (dict(chunk=256, lookback=True), dict(chunk=256, lookback=False, param_group_steps=512),
                   dict(chunk=4096)):
        if not (bidirectional and tuning.get("lookback")):
            _check(x, coefs, coefs64, mask, state, gy, gs, bidirectional, 0, **tuning)


@pytest.mark.gpu
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_gpu_silu_extremes(bidirectional):
    """On a GPU the sweeps' sigmoid is the approximate exp2 and reciprocal with denormals flushed
    (ema_sweep._sigmoid): pre-activations from about -1000 to 1000 (both saturated ends and the flushed range
    below -87) keep y and every gradient at the float64 reference."""
    with_state = not bidirectional
    coefs, coefs64, x, mask, state, gy, gs = _case(2, 600, 40, 16, bidirectional, with_state)
    x = x * torch.logspace(-3, 3, x.shape[1], device="cuda")[None, :, None]
    _check(x, coefs, coefs64, mask, state, gy, gs, bidirectional, 0, chunk=64, lookback=False,
           param_group_steps=128)


@pytest.mark.gpu
def test_gpu_million_tokens_bf16():
    """B1 L1048576 D1024 bf16 runs forward and backward (the reference would not fit); the first 4096 steps
    match the reference."""
    coefs, coefs64, _, _, _, _, _ = _case(1, 1, 1024, 16, False, False)
    x = torch.randn(1, 1 << 20, 1024, device="cuda", dtype=torch.bfloat16)
    y, _ = ema_fwd(x, *coefs, None, None, False, 0, False)
    grads = ema_bwd(torch.ones_like(x), None, x, *coefs, None, None, False, 0)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    head = x[:, :4096].contiguous()
    ref = ema_fft(head.double(), *coefs64)
    low = ema_fft(head, *coefs)
    assert_close_to_reference("head", y[:, :4096], ref, low)


# -- models -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", [False, True], ids=["bidirectional-encoder", "causal-lm-with-state"])
def test_model_on_triton_equals_reference(decoder, monkeypatch):
    """A tiny MEGA model whose EMA runs on the triton backend matches the reference backend (outputs, input
    and parameter gradients; the decoder also decodes with the EMA state)."""
    from mega_kernels import MegaConfig, MegaForCausalLM, MegaModel
    from mega_kernels.ops import ema_triton

    calls = []
    for name in ("_ema_fwd", "_ema_bwd", "_ema_step"):  # count the kernel launches to prove they ran
        fn = getattr(ema_triton, name)
        monkeypatch.setattr(ema_triton, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))

    cfg = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, intermediate_size=24, ema_projection_size=3,
               shared_representation_size=8, nffn_hidden_size=20, max_positions=32, dropout_prob=0.0,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0)
    if decoder:
        cfg.update(is_decoder=True, bidirectional=False)
    cls = MegaForCausalLM if decoder else MegaModel
    ref = cls(MegaConfig(**cfg, kernel_backend="reference")).to(DEVICE)
    tri = cls(MegaConfig(**cfg, kernel_backend={"ema": "triton", "attention": "reference"})).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(2, 50, (3, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    outs = []
    for model in (ref, tri):
        out = model(input_ids=ids, attention_mask=mask)
        first = out[0]
        first.float().square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        outs.append((first.detach(), grads))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=2e-5, atol=2e-5)
    assert len(outs[1][1]) == len(outs[0][1])
    for g, r in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    if decoder:  # cached decoding through ema_step on the triton backend reproduces the full pass
        with torch.no_grad():
            full = tri(input_ids=ids[:1]).logits
            past, steps = None, []
            for t in range(ids.shape[1]):
                o = tri(input_ids=ids[:1, t:t + 1], past_key_values=past, use_cache=True)
                past = o.past_key_values
                steps.append(o.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=2e-5, atol=2e-5)
    expected = {"_ema_fwd", "_ema_bwd"} | ({"_ema_step"} if decoder else set())
    assert expected <= set(calls), f"triton kernels not used: {expected - set(calls)}"
