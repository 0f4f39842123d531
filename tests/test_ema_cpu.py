"""The `cpu` EMA backend (C++ extension, csrc/ema/ema_cpu.cpp) against the float64 reference.

Forward, backward (every gradient), state in/out, truncation, masks with full and empty rows, all four dtypes,
over the shared EMA_CASES; gradcheck in float64; decoding steps; determinism across thread counts; models on
the cpu backend equal to the reference backend. (tests/test_ema_backends.py did not exist when this was
written; when it does, "cpu" belongs in its backend list and the case loops here can shrink to what is
extension-specific.)
"""
import os

import pytest
import torch

from helpers import EMA_CASES, assert_close_to_reference, ema_params, random_mask
from mega_kernels import _ext, ops
from mega_kernels.reference.ema import ema_coefficients, ema_fft
from mega_kernels.reference.ema import ema_step as ref_step

_REASON = _ext.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None and os.environ.get("CI") != "true",
                                reason=f"C++ extension unavailable: {_REASON}")

LOWP = (torch.float32, torch.float16, torch.bfloat16)


def _run(backend, x, params, gy, gs=None, **kw):
    """Output(s) and gradients of sum(y * gy) [+ sum(final_state * gs)] w.r.t. x, the parameters, state."""
    leaves = [x] + list(params) + ([kw["state"]] if kw.get("state") is not None else [])
    out = ops.ema(x, *params, backend=backend, **kw)
    y, final = (out if kw.get("return_state") else (out, None))
    loss = (y.double() * gy).sum() + (0 if final is None else (final.double() * gs).sum())
    grads = torch.autograd.grad(loss, leaves)
    return [y] + ([final] if final is not None else []) + list(grads)


def _compare(dtype, bsz, length, dim, ndim, bidirectional, truncation, masked, with_state):
    params64 = ema_params(dim, ndim, bidirectional, requires_grad=True)
    x64 = torch.randn(bsz, length, dim, dtype=torch.float64, requires_grad=True)
    kw = dict(bidirectional=bidirectional, truncation=truncation, mask=random_mask(bsz, length) if masked else None)
    state64 = None
    if with_state:
        state64 = torch.randn(bsz, dim, ndim, dtype=torch.float64, requires_grad=True)
        kw.update(state=state64, return_state=True)
    gy = torch.randn(bsz, length, dim, dtype=torch.float64)
    gs = torch.randn(bsz, dim, ndim, dtype=torch.float64) if with_state else None

    def cast(t, dt):
        return t.detach().to(dt).requires_grad_()

    ref64 = _run("reference", x64, params64, gy, gs, **kw)
    if dtype == torch.float64:
        ref_lowp, x, params, state = None, x64, params64, state64
    else:  # the reference's own error in this dtype: the same inputs rounded, run in dtype
        x, params = cast(x64, dtype), [cast(p, torch.float32) for p in params64]
        state = cast(state64, torch.float32) if with_state else None
        ref_lowp = _run("reference", x, params, gy, gs, **dict(kw, state=state))
    got = _run("cpu", x, params, gy, gs, **dict(kw, state=state))
    names = ["y"] + (["final_state"] if with_state else []) + ["dx", "ddelta", "dalpha", "dbeta", "dgamma",
                                                               "domega"] + (["dstate"] if with_state else [])
    for i, name in enumerate(names):
        assert got[i].dtype == (ref_lowp or ref64)[i].dtype, f"{name}: dtype {got[i].dtype}"
        assert_close_to_reference(name, got[i], ref64[i], None if ref_lowp is None else ref_lowp[i])


@pytest.mark.parametrize("case", EMA_CASES, ids=lambda c: "B{}L{}D{}N{}".format(*c))
@pytest.mark.parametrize("bidirectional,truncation", [(False, None), (True, None), (False, 5), (True, 64)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_backward(case, bidirectional, truncation, dtype):
    _compare(dtype, *case, bidirectional, truncation, masked=True, with_state=False)


@pytest.mark.parametrize("case", EMA_CASES[:4], ids=lambda c: "B{}L{}D{}N{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_state_in_out(case, dtype):
    _compare(dtype, *case, False, None, masked=True, with_state=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_half_inputs_compute_in_float32(dtype, bidirectional):
    _compare(dtype, 3, 129, 24, 3, bidirectional, None, masked=True, with_state=False)


def test_no_mask_and_long_sequence():
    _compare(torch.float32, 1, 3000, 20, 16, True, None, masked=False, with_state=False)


@pytest.mark.parametrize("kw", [dict(bidirectional=False, state=True), dict(bidirectional=True, mask=True),
                                dict(bidirectional=False, truncation=3, mask=True)], ids=["state", "bi", "trunc"])
def test_gradcheck(kw):
    bsz, length, dim, ndim = 2, 6, 3, 2
    params = ema_params(dim, ndim, kw.get("bidirectional", False), requires_grad=True)
    x = torch.randn(bsz, length, dim, dtype=torch.float64, requires_grad=True)
    mask = random_mask(bsz, length) if kw.get("mask") else None
    inputs = [x] + params
    if kw.get("state"):
        inputs.append(torch.randn(bsz, dim, ndim, dtype=torch.float64, requires_grad=True))

    def fn(x, *rest):
        state = rest[5] if len(rest) > 5 else None
        out = ops.ema(x, *rest[:5], mask=mask, bidirectional=kw.get("bidirectional", False),
                      truncation=kw.get("truncation"), state=state, return_state=state is not None, backend="cpu")
        return out

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_step_matches_reference_and_full_pass(dtype):
    bsz, length, dim, ndim = 3, 9, 17, 5
    delta, alpha, beta, gamma, omega = ema_params(dim, ndim, dtype=dtype)
    a, q, c = ema_coefficients(delta, alpha, beta, gamma)
    x = torch.randn(bsz, length, dim, dtype=dtype)
    mask = random_mask(bsz, length)
    state = torch.randn(bsz, dim, ndim, dtype=dtype)
    full, final = ops.ema(x, delta, alpha, beta, gamma, omega, mask=mask, state=state, return_state=True,
                          backend="reference")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    h = state.to(acc)
    for t in range(length):
        y, h_new = ops.ema_step(x[:, t], delta, alpha, beta, gamma, omega, h, mask=mask[:, t], backend="cpu")
        ry, rh = ref_step(x[:, t], a, q, c, omega, h, mask[:, t])
        assert y.dtype == dtype and h_new.dtype == acc
        torch.testing.assert_close(y, ry)
        torch.testing.assert_close(h_new, rh)
        torch.testing.assert_close(y, full[:, t])
        h = h_new
    torch.testing.assert_close(h, final.to(acc))


def test_backward_is_deterministic_across_thread_counts():
    params = ema_params(40, 16, True, dtype=torch.float32, requires_grad=True)
    x = torch.randn(4, 300, 40, requires_grad=True)
    mask = random_mask(4, 300)

    def grads():
        y = ops.ema(x, *params, mask=mask, bidirectional=True, backend="cpu")
        return torch.autograd.grad(y.square().sum(), [x] + params)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads()
        torch.set_num_threads(max(2, threads))
        many = grads()
    finally:
        torch.set_num_threads(threads)
    for g1, g2 in zip(one, many):
        assert torch.equal(g1, g2)


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    from mega_kernels.ops import backends

    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("ema", "auto", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("bidirectional", [False, True])
def test_model_on_cpu_backend_equals_reference(bidirectional):
    from mega_kernels.config import MegaConfig
    from mega_kernels.models import MegaForCausalLM, MegaForMaskedLM

    torch.manual_seed(0)
    cfg = MegaConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, intermediate_size=32,
                     ema_projection_size=4, shared_representation_size=16, nffn_hidden_size=32,
                     bidirectional=bidirectional, is_decoder=not bidirectional, kernel_backend="reference")
    model = (MegaForMaskedLM if bidirectional else MegaForCausalLM)(cfg).double().eval()
    ids = torch.randint(3, 50, (2, 13))
    attn = torch.ones(2, 13, dtype=torch.long)
    attn[1, 10:] = 0

    def run(backend):
        for m in model.modules():
            if hasattr(m, "ema_expansion_matrix"):
                m.backend = backend
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=attn).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref_logits, ref_grads = run("reference")
    got_logits, got_grads = run("cpu")
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-9, atol=1e-9)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-9)
