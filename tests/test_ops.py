"""The functional op layer: backend resolution and the errors for bad input (no kernel needed)."""
import pytest
import torch

from helpers import attention_inputs, ema_params, poison_empty
from mega_kernels import ops
from mega_kernels.ops import backends
from mega_kernels.reference.ema import ema_coefficients, ema_fft


def test_reference_backend_matches_reference_function():
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    params = ema_params(4, 3)
    a, q, c = ema_coefficients(*params[:4])
    got = ops.ema(x, *params, backend="reference")
    torch.testing.assert_close(got, ema_fft(x, a, q, c, params[4]))


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve("ema", "auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "no-such-backend")
    with pytest.raises(ValueError, match="is not a backend"):
        backends.resolve("ema", "auto", torch.device("cpu"))


def test_unavailable_backend_raises_not_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(backends._REGISTRY["attention"], "triton",
                        backends._Entry("x", "y", lambda d: "pretend it is missing"))
    q, k, v, bias = attention_inputs(1, 3, 3, 4, 5, None)
    with pytest.raises(backends.BackendUnavailable, match="pretend it is missing"):
        ops.attention(q, k, v, bias, backend="triton")


def test_auto_falls_back_to_reference(monkeypatch, caplog):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_LOGGED", set())
    monkeypatch.setitem(backends.AUTO_ORDER, ("attention", "cpu"), ("triton",))
    monkeypatch.setitem(backends._REGISTRY["attention"], "triton",
                        backends._Entry("x", "y", lambda d: "pretend it is missing"))
    with caplog.at_level("WARNING", logger="mega_kernels"):
        assert backends.resolve("attention", "auto", torch.device("cpu")) == "reference"
        assert backends.resolve("attention", "auto", torch.device("cpu")) == "reference"
    assert [r.getMessage() for r in caplog.records] == [
        "mega_kernels attention on cpu falls back to the reference (triton: pretend it is missing)"]  # once


def test_auto_logs_a_fallback_for_what_the_kernel_cannot_take(monkeypatch, caplog):
    """Z above the Triton attention's limit: auto takes the reference and says so (once); a block too short to gain
    from the kernel is a measured speed choice, not logged."""
    import sys

    attention_mod = sys.modules["mega_kernels.ops.attention"]
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_LOGGED", set())
    monkeypatch.setitem(backends.AUTO_ORDER, ("attention", "cpu"), ("triton",))  # (triton runs interpreted here)
    long_block = attention_mod.TRITON_ATTENTION_MIN_BLOCK + 1
    with caplog.at_level("WARNING", logger="mega_kernels"):
        assert attention_mod.resolve("auto", torch.zeros(1, 1, 64), long_block) == "triton"
        assert attention_mod.resolve("auto", torch.zeros(1, 1, 64), 16) == "reference"
        assert caplog.text == ""
        for _ in range(2):
            assert attention_mod.resolve("auto", torch.zeros(1, 1, 257), long_block) == "reference"
    assert [r.getMessage() for r in caplog.records] == [
        "mega_kernels attention on cpu falls back to the reference (triton: Z = 257 > 256)"]


def test_auto_keeps_truncated_ema_off_the_gpu_kernels(monkeypatch, caplog):
    """The GPU kernels' truncated EMA loses precision for slow decays (test_ema_backends,
    test_truncation_with_slow_decay): auto runs truncated calls on the reference there, logged once, and an
    explicit request runs the kernel with a warning, once."""
    import sys

    ema_mod = sys.modules["mega_kernels.ops.ema"]
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_LOGGED", set())
    monkeypatch.setitem(backends.AUTO_ORDER, ("ema", "cpu"), ("triton",))  # (triton runs interpreted here)
    x, gamma = torch.zeros(1, 8, 4), torch.zeros(4, 3)
    with caplog.at_level("WARNING", logger="mega_kernels"):
        assert ema_mod._resolve("auto", x, gamma) == "triton"
        assert caplog.text == ""
        for _ in range(2):
            assert ema_mod._resolve("auto", x, gamma, truncation=5) == "reference"
            assert ema_mod._resolve("triton", x, gamma, truncation=5) == "triton"
    assert [r.getMessage()[:58] for r in caplog.records] == [
        "mega_kernels ema on cpu falls back to the reference (a tru",
        "mega_kernels: ema: backend='triton': a truncated EMA loses"]


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(2, 3)), "must be a \\(B, L, D\\)"),
    (dict(x=torch.randint(0, 3, (1, 3, 4))), "float16, bfloat16"),
    (dict(omega=torch.randn(5)), "omega must be"),
    (dict(mask=torch.ones(1, 4, dtype=torch.bool)), "mask must be"),
    (dict(truncation=0), "truncation must be"),
    (dict(bidirectional=True), "gamma must be"),
    (dict(return_state=True, truncation=2), "truncated EMA"),
    (dict(return_state=True, truncation=3), "truncated EMA"),  # K = L: still no state to continue from
    (dict(state=torch.zeros(1, 4, 3), truncation=9), "truncated EMA"),  # K > L + 1: the state's inputs not dropped
    (dict(state=torch.zeros(1, 4, 2)), "state must be"),
    (dict(omega=[0.0] * 4), "omega must be a tensor"),
    (dict(omega=None), "omega must be a tensor, got NoneType"),
    (dict(n=0), "expansion size N >= 1"),
    (dict(state=torch.zeros(1, 4, 3, device="meta")), "state is on meta but x is on cpu"),
    (dict(state=torch.zeros(1, 4, 3, dtype=torch.long)), "state must be a floating tensor"),
    (dict(bidirectional="no"), "bidirectional must be True or False, got 'no'"),
    (dict(return_state="yes"), "return_state must be True or False"),
])
def test_ema_bad_input(bad, match):
    bad = dict(bad)  # (the parametrized dict is shared: leave it unchanged)
    delta, alpha, beta, gamma, omega = ema_params(4, bad.pop("n", 3), dtype=torch.float32)
    kw = dict(x=torch.randn(1, 3, 4), omega=omega)
    kw.update(bad)
    x, omega = kw.pop("x"), kw.pop("omega")
    with pytest.raises((ValueError, TypeError), match=match):
        ops.ema(x, delta, alpha, beta, gamma, omega, **kw)


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(1, 3, 4)), "x must be a \\(B, D\\) tensor"),
    (dict(state=None), "state must be the \\(B, D, N\\) state of the previous step"),
    (dict(mask=torch.ones(1, 1, dtype=torch.bool)), "mask must be \\(B,\\) = \\(1,\\)"),
    (dict(state=torch.zeros(1, 4, 3, device="meta")), "ema_step: state is on meta"),
    (dict(state=torch.zeros(1, 4, 2)), r"ema_step: state must be \(B, D, N\) = \(1, 4, 3\)"),
])
def test_ema_step_bad_input(bad, match):
    params = ema_params(4, 3, dtype=torch.float32)
    kw = dict(x=torch.randn(1, 4), state=torch.zeros(1, 4, 3))
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.ema_step(kw.pop("x"), *params, kw.pop("state"), **kw)


@pytest.mark.parametrize("change,match", [
    (lambda t: dict(t, k=t["k"][..., :2]), "share Z"),
    (lambda t: dict(t, v=t["v"][:, :2]), "share Lk"),
    (lambda t: dict(t, q=t["q"].float()), "share a dtype"),
    (lambda t: dict(t, rel_bias=t["rel_bias"][:4]), "rel_bias"),
    (lambda t: dict(t, rel_bias=t["rel_bias"][:3]), "covers blocks of 2"),
    (lambda t: dict(t, activation="gelu"), "activation must be"),
    (lambda t: dict(t, key_padding_mask=torch.ones(2, 3, dtype=torch.bool)), "key_padding_mask must be"),
    (lambda t: dict(t, chunk_size=0), "chunk_size must be"),
    (lambda t: dict(t, chunk_size=True), "chunk_size must be"),
    (lambda t: dict(t, rel_bias=[0.0] * 9), "rel_bias must be a float tensor"),
    (lambda t: dict(t, rel_bias=None), "rel_bias must be a float tensor, got None"),
    (lambda t: dict(t, rel_bias=torch.arange(9)), "rel_bias must be a float tensor, got torch.int64"),
    (lambda t: dict(t, key_padding_mask=[True] * 5), "key_padding_mask must be a tensor"),
    (lambda t: dict(t, q=t["q"][..., :0], k=t["k"][..., :0]), "Z >= 1"),
    (lambda t: dict(t, causal="no"), "causal must be True or False, got 'no'"),
])
def test_attention_bad_input(change, match):
    q, k, v, bias = attention_inputs(2, 5, 5, 4, 3, None)
    kw = change(dict(q=q, k=k, v=v, rel_bias=bias))
    with pytest.raises((ValueError, TypeError), match=match):
        ops.attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("rel_bias"), **kw)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("sizes", [(0, 5, 5, 3), (2, 0, 5, 3), (2, 0, 0, 3), (2, 5, 5, 0)],
                         ids=["B0", "Lq0", "Lq0-Lk0", "E0"])
def test_attention_with_an_empty_output(backend, sizes, monkeypatch):
    """No element to compute (B, Lq or E is 0): an empty output and zero gradients for q, k, v and rel_bias on
    every backend, even where a kernel would not launch (the kernels take Lq >= 1; the Triton softmax backward
    read an unwritten row statistic at E = 0). torch.empty fills with NaN meanwhile."""
    poison_empty(monkeypatch)
    bsz, lq, lk, edim = sizes
    inputs = attention_inputs(bsz, lq, lk, 4, edim, None, dtype=torch.float32, requires_grad=True)
    for activation in ("softmax", "laplace"):
        out = ops.attention(*inputs, activation=activation, causal=True, backend=backend)
        assert out.shape == (bsz, lq, edim)
        for t, g in zip(inputs, torch.autograd.grad(out.sum(), inputs)):
            assert torch.equal(g, torch.zeros_like(t))


def test_reference_ops_trace_with_torch_compile():
    """The functional ops compile with fullgraph (no graph break in dispatch or the reference maths)."""
    backends.preload("cpu")
    q, k, v, bias = attention_inputs(2, 9, 9, 4, 3, 4, dtype=torch.float32)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[0, :3] = False

    def f(q, k, v, bias, x, *params):
        h = ops.attention(q, k, v, bias, chunk_size=4, causal=True, key_padding_mask=kpm, backend="reference")
        return h, ops.ema(x, *params, backend="reference")

    x = torch.randn(2, 9, 4)
    params = ema_params(4, 3, dtype=torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for got, want in zip(compiled(q, k, v, bias, x, *params), f(q, k, v, bias, x, *params)):
        torch.testing.assert_close(got, want)


def test_auto_skips_backends_without_float64(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setitem(backends.AUTO_ORDER, ("attention", "cpu"), ("triton",))
    monkeypatch.setitem(backends._REGISTRY["attention"], "triton", backends._Entry("x", "y", lambda d: None))
    assert backends.resolve("attention", "auto", torch.device("cpu"), torch.float32) == "triton"
    assert backends.resolve("attention", "auto", torch.device("cpu"), torch.float64) == "reference"


def _fake_auto_backend(monkeypatch, op, name):
    """Make `name` auto's only choice for `op` on the CPU, as a stand-in that records its calls: returns the list of
    calls (the backend's name once per call)."""
    calls = []
    entry = backends._Entry("x", "y", lambda d: None)
    entry._impl = lambda *a, **k: calls.append(name) or torch.zeros(1)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setitem(backends.AUTO_ORDER, (op, "cpu"), (name,))
    monkeypatch.setitem(backends._REGISTRY[op], name, entry)
    return calls


def test_auto_attention_keeps_short_blocks_on_the_reference(monkeypatch):
    """auto sends blocks <= TRITON_ATTENTION_MIN_BLOCK to the (measured faster) reference, and q / k wider than
    the kernels take; an explicit request still gets the kernel."""
    import importlib

    attention_mod = importlib.import_module("mega_kernels.ops.attention")
    calls = _fake_auto_backend(monkeypatch, "attention", "triton")
    monkeypatch.setattr(attention_mod, "TRITON_ATTENTION_MIN_BLOCK", 8)
    q, k, v, bias = attention_inputs(1, 6, 6, 4, 3, None, dtype=torch.float32)
    ops.attention(q, k, v, bias)
    assert calls == []
    ops.attention(q, k, v, bias, backend="triton")
    assert calls == ["triton"]
    q, k, v, bias = attention_inputs(1, 9, 9, 4, 3, None, dtype=torch.float32)
    ops.attention(q, k, v, bias)
    assert calls == ["triton", "triton"]
    monkeypatch.setattr(attention_mod, "TRITON_ATTENTION_MAX_Z", 3)  # wider q / k than the kernels take
    ops.attention(q, k, v, bias)
    assert calls == ["triton", "triton"]
    monkeypatch.setenv(backends.ENV_VAR, "cpu")  # names no attention backend: auto still decides, with its rules
    ops.attention(q, k, v, bias)
    assert calls == ["triton", "triton"]


def test_auto_ema_takes_the_reference_for_n_over_the_cuda_limit(monkeypatch):
    """auto picks cuda only where triton is unavailable; for N > 32 (which the CUDA kernels refuse) it then takes
    the reference instead of failing, while an explicit backend='cuda' still reaches the backend's own check."""
    calls = _fake_auto_backend(monkeypatch, "ema", "cuda")
    x = torch.randn(1, 5, 3)
    ops.ema(x, *ema_params(3, 32, dtype=torch.float32))
    assert calls == ["cuda"]
    y = ops.ema(x, *ema_params(3, 33, dtype=torch.float32))
    assert calls == ["cuda"] and y.shape == x.shape
    ops.ema(x, *ema_params(3, 33, dtype=torch.float32), backend="cuda")
    assert calls == ["cuda", "cuda"]


def test_auto_attention_z_limit_is_the_kernels():
    from mega_kernels.ops.attention import TRITON_ATTENTION_MAX_Z
    from mega_kernels.triton.attention_common import MAX_Z

    assert TRITON_ATTENTION_MAX_Z == MAX_Z


def test_env_var_naming_a_backend_an_op_lacks_leaves_that_op_to_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cpu")  # attention has no cpu kernel
    assert backends.resolve("attention", "auto", torch.device("cpu")) == "reference"
    assert backends.is_auto("attention", "auto") and not backends.is_auto("ema", "auto")
    assert not backends.is_auto("attention", "triton")
    monkeypatch.setitem(backends._REGISTRY["ema"], "cpu", backends._Entry("x", "y", lambda d: "not built"))
    with pytest.raises(backends.BackendUnavailable, match="MEGA_KERNELS_BACKEND"):
        backends.resolve("ema", "auto", torch.device("cpu"))


def test_preload_loads_what_ema_step_dispatches_to(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    chosen = backends.preload("cpu")
    assert chosen["ema_step"] == chosen["ema"]


def test_float_mask_means_nonzero_is_a_token():
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    params = ema_params(3, 2)
    mask = torch.tensor([[1.0, 0.5, 0, 1, 1, 0, 2]] * 2, dtype=torch.float64)
    got = ops.ema(x, *params, mask=mask, backend="reference")
    torch.testing.assert_close(got, ops.ema(x, *params, mask=mask != 0, backend="reference"))


def test_truncation_rejects_bool():
    x = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="truncation must be"):
        ops.ema(x, *ema_params(2, 2, dtype=torch.float32), truncation=True)


# -- torch.autocast ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_under_autocast_runs_in_the_autocast_dtype(backend):
    """As torch's matmuls: float32 q, k, v are cast to the autocast dtype and the output is in it, equal to the
    op called on those casts outside autocast (so the reference's own matmuls are not cast again); gradients
    reach the float32 inputs in float32. float64 inputs are left alone, as autocast leaves them."""
    q, k, v, bias = (t.float().requires_grad_() for t in attention_inputs(2, 11, 11, 8, 6, 4))
    kw = dict(chunk_size=4, causal=True, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.attention(q, k, v, bias, **kw)
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    want = ops.attention(*low, bias.detach(), **kw)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    for t, t_low in zip((q, k, v), low):
        assert t.grad.dtype == torch.float32 and torch.equal(t.grad, t_low.grad.float())
    x64 = attention_inputs(1, 5, 5, 4, 3, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out64 = ops.attention(*x64, backend="reference")
    assert out64.dtype == torch.float64 and torch.equal(out64, ops.attention(*x64, backend="reference"))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_ema_is_unchanged_by_autocast(backend):
    """The EMA keeps x's dtype and float32 sums under autocast, on every backend: the same output, final state,
    gradients and decoding step as outside autocast, bit for bit (the reference's FFT convolution would
    otherwise run its products in bfloat16). The backward runs after the autocast region, as torch advises."""
    x = torch.randn(2, 13, 6, requires_grad=True)
    params = [p.requires_grad_() for p in ema_params(6, 3, dtype=torch.float32)]
    state = torch.randn(2, 6, 3)

    def forward():
        y, final = ops.ema(x, *params, state=state, return_state=True, backend=backend)
        step = ops.ema_step(x[:, 0].detach(), *[p.detach() for p in params], state, backend=backend)
        return y, final, *step

    def grads(y, final):
        return torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + final.sum(),
                                   [x, *params])

    want = forward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = forward()
    for i, (a, b) in enumerate(zip(got + grads(*got[:2]), want + grads(*want[:2]))):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {i}"


def test_ops_trace_with_torch_compile_under_autocast():
    q, k, v, bias = attention_inputs(2, 9, 9, 4, 3, 4, dtype=torch.float32)
    x = torch.randn(2, 9, 4)
    params = ema_params(4, 3, dtype=torch.float32)

    def f(q, k, v, bias, x, *params):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (ops.attention(q, k, v, bias, chunk_size=4, causal=True, backend="reference"),
                    ops.ema(x, *params, backend="reference"))

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for got, want in zip(compiled(q, k, v, bias, x, *params), f(q, k, v, bias, x, *params)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)
