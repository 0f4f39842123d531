"""What is specific to the `cpu` EMA backend (C++ extension, csrc/ema/ema_cpu.cpp); the backend-generic tests
(float32 / float16 / bfloat16 forward, backward, state, truncation, decoding, float64 gradcheck) run it from
tests/test_ema_backends.py. Here: float64 end to end against the float64 reference over the shared cases, a
truncated gradcheck, float64 decoding, a long sequence, the kernels' use of every thread, determinism across
thread counts, auto's choice, and models on the cpu backend equal to the reference backend.
"""

import pytest
import torch

from helpers import EMA_CASES, assert_close_to_reference, ema_params, in_ci, random_mask
from mega_kernels import _build, _ext, ops
from mega_kernels.reference.ema import ema_coefficients
from mega_kernels.reference.ema import ema_step as ref_step
from test_ema_backends import _check_against_reference, _inputs

_REASON = _ext.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None and not in_ci(),
                                reason=f"C++ extension unavailable: {_REASON}")


@pytest.mark.parametrize("case", EMA_CASES, ids=lambda c: "B{}L{}D{}N{}".format(*c))
@pytest.mark.parametrize("bidirectional,truncation", [(False, None), (True, None), (False, 5), (True, 64)])
def test_float64_forward_backward(case, bidirectional, truncation):
    """float64 in, float64 computed: errors at float64 rounding (masked; unidirectional carries a state)."""
    with_state = not bidirectional and truncation is None
    x, params, mask, state, gy, gs = _inputs(*case, bidirectional, torch.float64, "cpu", True, with_state)
    params, state = [p.double() for p in params], None if state is None else state.double()
    gs = None if gs is None else gs.double()
    _check_against_reference("cpu", x, params, mask, state, gy, gs, bidirectional=bidirectional,
                             truncation=truncation)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_ops_take_any_truncation_up_to_int32(bidirectional):
    """The registered ops take truncation up to 2^31 - 1 (ops.ema turns K >= L into none before them): a window
    that long is the plain EMA, forward and backward. (The backward's i + K < L overflowed for K near 2^31 and
    read far outside its buffer.)"""
    x, params, mask, _, gy, _ = _inputs(2, 40, 5, 3, bidirectional, torch.float64, "cpu", True, False)
    a, q, c = [t.contiguous() for t in ema_coefficients(*[p.double() for p in params[:4]])]
    omega = params[4].double()
    for k in (0, 45, 2**31 - 1):
        y, _ = torch.ops.mega_kernels.ema_fwd(x, a, q, c, omega, mask, None, bidirectional, k, False)
        grads = torch.ops.mega_kernels.ema_bwd(gy, None, x, a, q, c, omega, mask, None, bidirectional, k)
        if k == 0:
            want = (y, *grads[:5])
        for got, ref in zip((y, *grads[:5]), want):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_long_sequence_without_mask():
    x, params, _, _, gy, _ = _inputs(1, 3000, 20, 16, True, torch.float32, "cpu", False, False)
    _check_against_reference("cpu", x, params, None, None, gy, None, bidirectional=True)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_truncated(bidirectional):
    bsz, length, dim, ndim = 2, 7, 3, 2
    params = ema_params(dim, ndim, bidirectional, requires_grad=True)
    x = torch.randn(bsz, length, dim, dtype=torch.float64, requires_grad=True)
    mask = random_mask(bsz, length)

    def fn(x, *params):
        return ops.ema(x, *params, mask=mask, bidirectional=bidirectional, truncation=3, backend="cpu")

    assert torch.autograd.gradcheck(fn, [x] + params)


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
    full64, final64 = ops.ema(*[t.double() for t in (x, delta, alpha, beta, gamma, omega)], mask=mask,
                              state=state.double(), return_state=True, backend="reference")
    a64, q64, c64, omega64 = (t.double() for t in (a, q, c, omega))
    h = state.to(acc)
    for t in range(length):  # each step from the kernel's own previous state, against the float64 reference
        y, h_new = ops.ema_step(x[:, t], delta, alpha, beta, gamma, omega, h, mask=mask[:, t], backend="cpu")
        ry, rh = ref_step(x[:, t], a, q, c, omega, h, mask[:, t])
        ry64, rh64 = ref_step(x[:, t].double(), a64, q64, c64, omega64, h.double(), mask[:, t])
        assert y.dtype == dtype and h_new.dtype == acc
        assert_close_to_reference(f"step {t} y", y, ry64, ry)
        assert_close_to_reference(f"step {t} state", h_new, rh64, rh)
        assert_close_to_reference(f"step {t} y vs the full pass", y, full64[:, t], full[:, t])
        h = h_new
    assert_close_to_reference("final state", h, final64, final.to(acc))


@pytest.mark.skipif(not _build.openmp_flags(), reason="this build has no OpenMP (not GCC on Linux): one thread")
def test_kernels_run_on_every_thread():
    """at::parallel_for splits work only in files compiled with OpenMP: without -fopenmp every task runs on the
    calling thread, whatever torch.set_num_threads says."""
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.ops.mega_kernels.cpu_parallel_threads() == n
    finally:
        torch.set_num_threads(threads)


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
        if _build.openmp_flags():  # else this compares one thread with itself
            assert torch.ops.mega_kernels.cpu_parallel_threads() > 1
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
