"""Backend-generic tests of the EMA kernels (`mega_kernels.ops.ema` / `ema_step` with backend=<name>):
forward, backward and state against the float64 reference with the tolerance rule of DESIGN.md.

To test another kernel backend add one line to BACKEND_DTYPES (the input dtypes it takes; float64 there makes
gradcheck run in float64). A backend is skipped only when `unavailable_reason` says it cannot run here, and in
CI (env var CI set) an unavailable "triton" or "cpu" backend fails instead. Triton runs on the CPU under
TRITON_INTERPRET=1 (tests/conftest.py), where every time step costs ~1 ms: shapes here are chosen for that.
"""
from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

import mega_kernels.ops as ops
from mega_kernels.ops.backends import unavailable_reason
from helpers import (EMA_CASES, assert_close_to_reference, ema_params, in_ci, nan_filled_allocations, poison_empty,
                     random_mask)

BACKEND_DTYPES = {
    "triton": (torch.float32, torch.float16, torch.bfloat16),  # bfloat16 under the interpreter: mega_kernels/triton
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16),  # + bfloat16 on a GPU (see _dtypes); tests marked gpu
}
GPU_BACKENDS = ("triton", "cuda")  # run on CUDA tensors when a GPU is present


@pytest.fixture(autouse=True)
def _nan_filled_outputs():
    """The C++ kernels allocate their outputs with at::empty: filled with NaN here, so an element no kernel
    writes fails the comparison (torch.empty is poisoned where a test asks, see poison_empty)."""
    with nan_filled_allocations():
        yield


def _device(name):
    return "cuda" if name in GPU_BACKENDS and torch.cuda.is_available() else "cpu"


@pytest.fixture(params=[pytest.param(n, marks=pytest.mark.gpu) if n == "cuda" else n for n in BACKEND_DTYPES])
def backend(request):
    """(name, device) of a kernel backend that can run here."""
    name = request.param
    device = _device(name)
    reason = unavailable_reason("ema", name, torch.device(device))
    if reason is not None:
        if in_ci() and name in ("triton", "cpu"):
            pytest.fail(f"backend {name!r} must run in CI: {reason}")
        pytest.skip(reason)
    return name, device


def _dtypes(name, device):
    extra = (torch.bfloat16,) if device == "cuda" and torch.bfloat16 not in BACKEND_DTYPES[name] else ()
    return BACKEND_DTYPES[name] + extra


def _inputs(bsz, length, dim, ndim, bidirectional, dtype, device, masked, with_state):
    """x in `dtype`, float32 module parameters, mask, state, and output cotangents exact in the low dtypes."""
    params = [p.float().to(device) for p in ema_params(dim, ndim, bidirectional)]
    x = torch.randn(bsz, length, dim).to(dtype).to(device)
    mask = random_mask(bsz, length).to(device) if masked else None
    state = torch.randn(bsz, dim, ndim, device=device) if with_state else None
    gy = torch.randn(bsz, length, dim).to(dtype).to(device)
    gs = torch.randn(bsz, dim, ndim, device=device) if with_state else None
    return x, params, mask, state, gy, gs


def _run(backend, x, params, mask, state, gy, gs, return_state=None, **kw):
    """(outputs, gradients) of ops.ema: outputs = (y, final state or None); gradients of x, the 5 parameters
    and the state (when given) for the loss <y, gy> + <final, gs> (a term whose cotangent is None left out).
    return_state: default whether gs is given."""
    return_state = gs is not None if return_state is None else return_state
    leaves = [x.detach().requires_grad_()] + [p.detach().requires_grad_() for p in params]
    st = None if state is None else state.detach().requires_grad_()
    out = ops.ema(leaves[0], *leaves[1:], mask=mask, state=st, return_state=return_state, backend=backend, **kw)
    y, final = out if return_state else (out, None)
    loss = (y.double() * gy.double()).sum() if gy is not None else 0
    if gs is not None:
        loss = loss + (final.double() * gs.double()).sum()
    grads = torch.autograd.grad(loss, leaves + ([st] if st is not None else []), allow_unused=True,
                                materialize_grads=True)  # (gamma and omega: unused by a loss on the state alone)
    return (y.detach(), None if final is None else final.detach()), grads


def _check_against_reference(name, x, params, mask, state, gy, gs, **kw):
    """The kernel's outputs and gradients vs the float64 reference, bounded by the reference's own error in
    the input dtype."""
    got = _run(name, x, params, mask, state, gy, gs, **kw)
    low = _run("reference", x, params, mask, state, gy, gs, **kw)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = _run("reference", d64(x), [d64(p) for p in params], mask, d64(state), d64(gy), d64(gs), **kw)
    labels = ["y", "final_state"]
    for label, o, r, lo in zip(labels, got[0], ref[0], low[0]):
        if r is not None:
            assert_close_to_reference(f"{name} {label}", o, r, lo)
    labels = ["dx", "ddelta", "dalpha", "dbeta", "dgamma", "domega", "dstate"]
    for label, o, r, lo in zip(labels, got[1], ref[1], low[1]):
        assert_close_to_reference(f"{name} {label}", o, r, lo)


def _interpreted(name, device):
    return name == "triton" and device == "cpu"


@pytest.mark.parametrize("case", EMA_CASES, ids=str)
@pytest.mark.parametrize("bidirectional,masked", [(False, False), (False, True), (True, False), (True, True)])
def test_forward_backward(backend, case, bidirectional, masked):
    """Unidirectional runs carry an initial state and return the final state (with its own cotangent)."""
    name, device = backend
    bsz, length, dim, ndim = case
    if length >= 1000 and (bidirectional or not masked) and _interpreted(name, device):
        pytest.skip("L=1000 runs one combination under the Triton interpreter (~1 ms per step); all on a GPU")
    x, params, mask, state, gy, gs = _inputs(bsz, length, dim, ndim, bidirectional, torch.float32, device, masked,
                                             with_state=not bidirectional)
    _check_against_reference(name, x, params, mask, state, gy, gs, bidirectional=bidirectional)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_low_precision_dtypes(backend, bidirectional):
    name, device = backend
    for dtype in _dtypes(name, device):
        if dtype in (torch.float32, torch.float64):
            continue
        x, params, mask, state, gy, gs = _inputs(3, 33, 40, 16, bidirectional, dtype, device, True,
                                                 with_state=not bidirectional)
        _check_against_reference(name, x, params, mask, state, gy, gs, bidirectional=bidirectional)


@pytest.mark.parametrize("truncation,bidirectional", [(1, False), (7, False), (7, True), (32, True), (100, False)])
def test_truncation(backend, truncation, bidirectional):
    """K < L (exact window, including K = 1 and K = L - 1) and K > L (the plain EMA)."""
    name, device = backend
    x, params, mask, _, gy, _ = _inputs(3, 33, 24, 3, bidirectional, torch.float32, device, True, False)
    _check_against_reference(name, x, params, mask, None, gy, None, bidirectional=bidirectional,
                             truncation=truncation)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_truncation_with_slow_decay(backend, bidirectional, request):
    """1 - q far below 1 / K (1e-4 and 1e-6 with K = 7 over L = 512, padding, D = 5): a kernel that subtracts the
    tap leaving the window from a running state keeps each subtraction's rounding for ~1 / (1 - q) steps, and its
    d alpha drifts to several times the reference's error (the cpu kernels before anchoring fail here, both
    directions; d alpha was 1e-2 relative at L 8192). The cpu kernels anchor their state every K steps (ema_kernels.cuh); the GPU kernels do
    not yet, so auto keeps truncated calls there on the reference (ops/ema.py)."""
    name, device = backend
    if name in ("triton", "cuda"):
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason="the GPU kernels do "
                                              "not anchor the truncated state yet (README, known limits)"))
        if bidirectional and _interpreted(name, device):
            pytest.skip("one case of the known failure under the interpreter (~25 s)")
    dim = 5
    kd = 2 * dim if bidirectional else dim
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 512, dim, generator=gen) + 0.5).to(device)
    gy = torch.randn(2, 512, dim, generator=gen).to(device)
    mask = torch.rand(2, 512, generator=gen) > 0.1
    mask[0, :9], mask[1, -20:] = False, False  # (padding at both ends, and scattered)
    for one_minus_q in (1e-4, 1e-6)[: 1 if _interpreted(name, device) else 2]:
        alpha = math.log(one_minus_q / (1 - one_minus_q)) + 0.01 * torch.randn(kd, 3, 1, generator=gen)
        params = [torch.full((kd, 3, 1), 10.0), alpha, torch.randn(kd, 3, 1, generator=gen),
                  torch.randn(kd, 3, generator=gen), torch.randn(dim, generator=gen)]  # sigmoid(delta = 10) ~ 1
        _check_against_reference(name, x, [p.to(device) for p in params], mask.to(device), None, gy, None,
                                 bidirectional=bidirectional, truncation=7)


@pytest.mark.parametrize("bidirectional,truncation", [(False, None), (True, None), (False, 5)])
def test_zero_and_tiny_input_coefficients(backend, bidirectional, truncation):
    """States whose input coefficient a = sigmoid(delta) * beta is exactly 0 or denormal-small still carry the
    incoming state and decay exactly (kernels that scale the state by 1 / a must guard it)."""
    name, device = backend
    with_state = not bidirectional and truncation is None
    x, params, mask, state, gy, gs = _inputs(2, 21, 24, 5, bidirectional, torch.float32, device, True, with_state)
    beta = params[2].clone()
    beta[::3] = 0.0
    beta[1::4, 1] = 1e-30
    params[2] = beta
    _check_against_reference(name, x, params, mask, state, gy, gs, bidirectional=bidirectional,
                             truncation=truncation)


def test_silu_of_huge_negative_inputs(backend):
    """beta = 0, omega = 1: y = silu(x). For x down to -1e37 silu(x) and silu'(x) are -0 / 0 as in the
    reference (the C++ host exp once saturated at e^88, leaving sigmoid ~6e-39 and silu(-1e37) = -0.06)."""
    name, device = backend
    params = [torch.zeros(3, 2, 1), torch.zeros(3, 2, 1), torch.zeros(3, 2, 1), torch.zeros(3, 2), torch.ones(3)]
    x = torch.tensor([-1e37, -1e30, -1e3, -90.0, 0.5]).reshape(1, 5, 1).expand(1, 5, 3).contiguous()
    outs = []
    for be, dev in (("reference", "cpu"), (name, device)):
        xx = x.to(dev).requires_grad_()
        y = ops.ema(xx, *(p.to(dev) for p in params), backend=be)
        outs.append([t.cpu() for t in (y, torch.autograd.grad(y.sum(), xx)[0])])
    for got, want in zip(*outs[::-1]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (the interpreter's numpy)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padded_inputs_never_enter_the_sums(backend, bidirectional):
    """NaN and inf at padded positions: every other output (and the final state, and a decoding step's new state)
    is what zeros there give, on the backend and on the reference (which zeroes them, not multiplies by 0)."""
    name, device = backend
    x, params, mask, _, _, _ = _inputs(2, 9, 5, 3, bidirectional, torch.float32, device, False, False)
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[0, 3], mask[1, 8], mask[1, 0] = False, False, False
    poisoned = x.clone()
    poisoned[0, 3], poisoned[1, 8], poisoned[1, 0, :2] = float("nan"), float("inf"), float("-inf")
    clean = torch.where(mask[..., None], x, 0)
    kw = dict(mask=mask, bidirectional=bidirectional, return_state=not bidirectional)
    for which in (name, "reference"):
        got = ops.ema(poisoned, *params, backend=which, **kw)
        want = ops.ema(clean, *params, backend=which, **kw)
        got, want = (got, want) if not bidirectional else ((got, None), (want, None))
        torch.testing.assert_close(got[0][mask], want[0][mask], msg=which)
        if not bidirectional:
            torch.testing.assert_close(got[1], want[1], msg=which)
            state = torch.randn(2, 5, 3, device=device)
            _, s = ops.ema_step(poisoned[:, 3], *params, state, mask=mask[:, 3], backend=which)
            _, s_clean = ops.ema_step(clean[:, 3], *params, state, mask=mask[:, 3], backend=which)
            torch.testing.assert_close(s, s_clean, msg=which)


def test_split_sequence_equals_one_call(backend):
    """Two calls chained through the state give the output and final state of one call over the whole sequence."""
    name, device = backend
    x, params, mask, state, _, _ = _inputs(3, 40, 24, 16, False, torch.float32, device, True, True)
    y, final = ops.ema(x, *params, mask=mask, state=state, return_state=True, backend=name)
    y1, s1 = ops.ema(x[:, :17], *params, mask=mask[:, :17], state=state, return_state=True, backend=name)
    y2, s2 = ops.ema(x[:, 17:], *params, mask=mask[:, 17:], state=s1, return_state=True, backend=name)
    ref = ops.ema(x.double(), *[p.double() for p in params], mask=mask, state=state.double(), return_state=True,
                  backend="reference")
    low = ops.ema(x, *params, mask=mask, state=state, return_state=True, backend="reference")
    assert_close_to_reference("split y", torch.cat([y1, y2], 1), ref[0], low[0])
    assert_close_to_reference("split state", s2, ref[1], low[1])
    assert_close_to_reference("one-call y", y, ref[0], low[0])
    assert_close_to_reference("one-call state", final, ref[1], low[1])


@pytest.mark.parametrize("loss_on", ["state", "y"])
def test_loss_on_one_of_y_and_state(backend, loss_on):
    """return_state=True with a loss on one output only: the other output's gradient reaches the backward as
    None (autograd allocates no zeros for it, nor for the Triton forward's saved chunk states), which the
    backward takes as zero; the gradients equal the reference's."""
    name, device = backend
    x, params, mask, state, gy, gs = _inputs(2, 9, 24, 3, False, torch.float32, device, True, True)
    gy, gs = (None, gs) if loss_on == "state" else (gy, None)
    _check_against_reference(name, x, params, mask, state, gy, gs, return_state=True)


def test_decode_steps_equal_full_pass(backend):
    """ema_step token by token (with padded tokens) reproduces the full pass and its final state, in each input
    dtype the backend takes but float64 (the state stays float32)."""
    name, device = backend
    for dtype in _dtypes(name, device):
        if dtype == torch.float64:
            continue
        x, params, mask, state, _, _ = _inputs(3, 9, 24, 16, False, dtype, device, True, True)
        ref = ops.ema(x.double(), *[p.double() for p in params], mask=mask, state=state.double(),
                      return_state=True, backend="reference")
        low = ops.ema(x, *params, mask=mask, state=state, return_state=True, backend="reference")
        s, ys = state, []
        for t in range(x.shape[1]):
            y_t, s = ops.ema_step(x[:, t], *params, s, mask=mask[:, t], backend=name)
            assert s.dtype == torch.float32 and y_t.dtype == x.dtype
            ys.append(y_t)
        assert_close_to_reference(f"decode y {dtype}", torch.stack(ys, 1), ref[0], low[0])
        assert_close_to_reference(f"decode state {dtype}", s, ref[1], low[1])


@pytest.mark.parametrize("with_state_grad", [True, False], ids=["y-and-state", "y-only"])
def test_decode_step_gradients(backend, with_state_grad):
    """ema_step is differentiable on every backend: the gradients of x, the parameters and the state (a padded
    row among them) against the float64 reference, in each input dtype the backend takes; gradcheck in float64."""
    name, device = backend
    x, params, _, state, _, _ = _inputs(3, 1, 24, 5, False, torch.float32, device, False, True)
    x, mask = x[:, 0], torch.tensor([True, False, True], device=device)
    gy, gs = torch.randn_like(x), torch.randn_like(state)

    def grads(which, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, *params, state)]
        y, s = ops.ema_step(leaves[0], *leaves[1:6], leaves[6], mask=mask, backend=which)
        outs, cots = ([y, s], [gy.to(y.dtype), gs.to(s.dtype)]) if with_state_grad else ([y], [gy.to(y.dtype)])
        torch.autograd.backward(outs, cots)
        return [t.grad for t in leaves]

    ref = grads("reference", torch.float64)
    for dtype in _dtypes(name, device):
        low, got = grads("reference", dtype), grads(name, dtype)
        for what, g, r, lo in zip(("x", "delta", "alpha", "beta", "gamma", "omega", "state"), got, ref, low):
            assert g is not None, f"{name} {dtype}: no gradient for {what}"
            assert_close_to_reference(f"step d{what} {dtype}", g, r, lo)
    if torch.float64 in BACKEND_DTYPES[name]:
        leaves = [t.detach().double().requires_grad_() for t in (x, *params, state)]
        assert torch.autograd.gradcheck(
            lambda *t: ops.ema_step(t[0], *t[1:6], t[6], mask=mask, backend=name), leaves)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck(backend, bidirectional):
    """Analytic gradients (x, parameters, state) vs finite differences of the same kernel on a tiny shape."""
    name, device = backend
    dtype = torch.float64 if torch.float64 in BACKEND_DTYPES[name] else torch.float32
    tol = dict(fast_mode=_interpreted(name, device))
    if dtype != torch.float64:  # float32 central differences at eps 1e-3 carry ~eps^2 of truncation and ~6e-8 / eps
        tol.update(eps=1e-3, atol=2e-3, rtol=1e-2)  # of rounding per entry (~1e-4 each, times |y| and the fan-in)
    x, params, mask, state, _, _ = _inputs(3, 6, 3, 2, bidirectional, dtype, device, True, not bidirectional)
    params = [p.to(dtype).requires_grad_() for p in params]
    x = x.requires_grad_()
    st = None if state is None else state.to(dtype).requires_grad_()

    def fn(x, *rest):
        *ps, s = rest if st is not None else (*rest, None)
        out = ops.ema(x, *ps, mask=mask, state=s, return_state=s is not None, bidirectional=bidirectional,
                      backend=name)
        return out if s is not None else (out,)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*double precision.*")
        assert torch.autograd.gradcheck(fn, (x, *params) + ((st,) if st is not None else ()), **tol)


@pytest.mark.parametrize("bidirectional,truncation,step", [(False, None, False), (True, 4, False), (False, None, True)],
                         ids=["uni-state", "bi-trunc", "step"])
def test_double_backward(backend, bidirectional, truncation, step):
    """create_graph=True (a gradient penalty): the second derivatives in x, the parameters and the state equal the
    reference backend's, in the backend's widest dtype; gradgradcheck where the backend takes float64. (A kernel's
    backward op has no derivative: under create_graph the backends differentiate the reference, ops/autograd.py.)"""
    name, device = backend
    dtype = torch.float64 if torch.float64 in BACKEND_DTYPES[name] else torch.float32
    with_state = not bidirectional and truncation is None
    x, params, mask, state, gy, gs = _inputs(2, 1 if step else 6, 5, 3, bidirectional, dtype, device, True,
                                             with_state)
    params = [p.to(dtype) for p in params]
    state = None if state is None else state.to(dtype)

    def fn(which, x, *rest):
        *ps, s = rest if state is not None else (*rest, None)
        if step:
            return ops.ema_step(x[:, 0], *ps, s, mask=mask[:, 0], backend=which)
        out = ops.ema(x, *ps, mask=mask, state=s, return_state=s is not None, bidirectional=bidirectional,
                      truncation=truncation, backend=which)
        return out if s is not None else (out,)

    leaves = [t.detach().requires_grad_() for t in [x, *params] + ([state] if state is not None else [])]
    second = {}
    for which in ("reference", name):
        outs = fn(which, *leaves)
        loss = sum((o.double() * torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                    .to(o.device)).sum() for i, o in enumerate(outs))
        first = torch.autograd.grad(loss, leaves, create_graph=True)
        second[which] = torch.autograd.grad(sum((g.double() ** 2).sum() for g in first), leaves)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for i, (got, want) in enumerate(zip(second[name], second["reference"])):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item(), msg=f"input {i}")
    if dtype == torch.float64:
        assert torch.autograd.gradgradcheck(functools.partial(fn, name), leaves)


def test_first_order_backward_runs_the_kernel(backend, monkeypatch):
    """Only create_graph=True takes the reference's backward: a plain backward runs the backend's own kernel
    (nothing silently slower)."""
    import sys

    name, device = backend
    monkeypatch.setattr(sys.modules["mega_kernels.ops.ema"], "reference_grads",
                        lambda *a, **k: pytest.fail("the reference backward ran"))
    x, params, mask, state, gy, _ = _inputs(2, 6, 5, 3, False, torch.float32, device, True, False)
    leaves = [t.detach().requires_grad_() for t in [x, *params]]
    (ops.ema(leaves[0], *leaves[1:], mask=mask, backend=name) * gy).sum().backward()
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("shape", [(0, 7, 24), (3, 0, 24), (3, 7, 0)], ids=["B0", "L0", "D0"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_empty_inputs(backend, shape, bidirectional, monkeypatch):
    """An empty batch, sequence or channel set, on the backend and on the reference: y is empty, the parameters'
    gradients are zeros and, with L = 0, the state passes through (the final state is the initial one, the
    state's gradient the final state's). torch.empty fills with NaN, so an output nothing writes fails."""
    poison_empty(monkeypatch)
    name, device = backend
    bsz, length, dim = shape
    with_state = not bidirectional
    x, params, mask, state, gy, gs = _inputs(bsz, length, dim, 3, bidirectional, torch.float32, device, True,
                                             with_state)
    for which in (name, "reference"):
        (y, final), grads = _run(which, x, params, mask, state, gy, gs, bidirectional=bidirectional)
        assert y.shape == x.shape, which
        for g, p in zip(grads[1:6], params):
            assert torch.equal(g, torch.zeros_like(p)), which
        if with_state:  # (B = 0 or D = 0: all of these are empty)
            assert torch.equal(final, state if length == 0 else torch.zeros_like(state)), which
            assert torch.equal(grads[6], gs if length == 0 else torch.zeros_like(state)), which
        if length > 0 and with_state:  # B = 0 or D = 0: one decoding step of nothing
            y_t, s_t = ops.ema_step(x[:, 0], *params, state, backend=which)
            assert y_t.shape == (bsz, dim) and s_t.shape == state.shape, which
