"""Gated cross-attention through `ops.attention` (groups of at most S queries, shifted bias vectors) against
its materialized formula (`MegaGatedCrossAttention._weights`, the path output_attentions=True takes), forward
and the gradients of every parameter and input, on the reference op in float64 and on the triton op (under
TRITON_INTERPRET=1 on the CPU) in float32 with the tolerance rule. Tiny sizes: the triton cases run in the
interpreter."""
import copy

import pytest
import torch

from helpers import ATOL, assert_close_to_reference
from mega_kernels import MegaConfig, ops
from mega_kernels.ops import backends
from mega_kernels.modules import MegaGatedCrossAttention
from mega_kernels.reference.attention import ACTIVATIONS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (T, S, offset): T < S, T == S, T > S (groups of S, S and a partial one), cached decoding (T = 1, offset > 0,
# also past S so that W = T + offset), T < S with an offset.
CASES = [(3, 5, 0), (5, 5, 0), (7, 3, 0), (1, 5, 4), (1, 4, 9), (2, 5, 2)]
CASE_IDS = ["T<S", "T=S", "T>S", "decode", "decode-past-S", "T<S-offset"]
BIASES = ("simple", "rotary")


def module(activation, bias, dtype=torch.float64):
    cfg = MegaConfig(vocab_size=20, hidden_size=8, shared_representation_size=8, intermediate_size=8,
                     nffn_hidden_size=8, num_hidden_layers=1, max_positions=16, is_decoder=True,
                     bidirectional=False, add_cross_attention=True, attention_activation=activation,
                     relative_positional_bias=bias)
    mod = MegaGatedCrossAttention(cfg)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return mod.to(dtype).eval()


def inputs(tgt, src, masked, dtype=torch.float64):
    """query (3, T, 8), encoder states (3, S, 8), and a key mask (or None): row 0 full, row 1 right-padded,
    row 2 fully padded."""
    query = torch.randn(3, tgt, 8, dtype=dtype)
    enc = torch.randn(3, src, 8, dtype=dtype)
    mask = None
    if masked:
        mask = torch.ones(3, src, dtype=torch.bool)
        mask[1, src // 2 + 1:] = False
        mask[2] = False
    return query, enc, mask


def run(mod, query, enc, mask, offset, backend, grad_out):
    """(out, grads of query, encoder states and every parameter); backend None = the materialized path."""
    mod.zero_grad()
    x = [query.detach().clone().requires_grad_(), enc.detach().clone().requires_grad_()]
    if backend is None:
        out, weights, _ = mod(x[0], x[1], mask, offset=offset, output_attentions=True)
        assert weights is not None
    else:
        mod._op_backend = lambda q, src_len: backend  # force the op path on this backend
        out, weights, _ = mod(x[0], x[1], mask, offset=offset)
        del mod._op_backend
        assert weights is None
    out.backward(grad_out)
    grads = {"query": x[0].grad, "encoder_states": x[1].grad}
    grads.update({n: p.grad.clone() for n, p in mod.named_parameters()})
    return out, grads


def spy_attention(monkeypatch):
    calls = []
    real = ops.attention

    def spy(*a, **k):
        calls.append((a[0].shape[1], a[1].shape[1], k["backend"]))
        return real(*a, **k)

    monkeypatch.setattr(ops, "attention", spy)
    return calls


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shifted_bias_reads_the_cross_attention_bias(case):
    """Every (query, key) pair the op reads lands on bias.matrix's entry, never on a zero-filled one: a bias
    vector holding 1 + its own index tells the source of every entry."""
    tgt, src, offset = case
    mod = module("softmax", "simple")
    width = max(tgt + offset, src)
    with torch.no_grad():
        mod.rel_pos_bias.rel_pos_bias.zero_()
        m = mod.rel_pos_bias.max_positions
        mod.rel_pos_bias.rel_pos_bias[m - width: m + width - 1] = torch.arange(1.0, 2 * width, dtype=torch.float64)
    expected = mod.rel_pos_bias.matrix(tgt, src, offset)
    vec = mod.rel_pos_bias.vector(width)
    r = torch.arange(src)[:, None]
    j = torch.arange(src)[None, :]
    for g0 in range(0, tgt, src):
        rows = min(src, tgt - g0)
        shifted = mod._shifted_bias(vec, width, src, rows, offset + g0)
        assert shifted.shape == (2 * src - 1,)
        got = shifted[src - 1 + j - (src - rows + r[:rows])]  # the op's rel'[W' - 1 + j - P], P = S - rows + r
        assert (got > 0).all(), "a real pair reads a zero-filled entry"
        assert torch.equal(got, expected[g0: g0 + rows])


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_op_path_equals_materialized(case, masked, activation, bias):
    tgt, src, offset = case
    mod = module(activation, bias)
    query, enc, mask = inputs(tgt, src, masked)
    g = torch.randn(3, tgt, 8, dtype=torch.float64)
    out, grads = run(mod, query, enc, mask, offset, "reference", g)
    ref, ref_grads = run(mod, query, enc, mask, offset, None, g)
    name = f"{case} {activation} {bias} mask={masked}"
    assert_close_to_reference(f"{name} out", out, ref)
    for k, v in ref_grads.items():
        assert_close_to_reference(f"{name} d{k}", grads[k], v)
    if masked and activation == "softmax":  # the fully padded row gives the residual path only
        assert torch.equal(grads["encoder_states"][2], torch.zeros_like(grads["encoder_states"][2]))


TRITON_CASES = [(case, masked, activation, bias)
                for i, (case, masked) in enumerate([(c, m) for c in CASES for m in (False, True)])
                for activation in ACTIVATIONS
                for bias in (BIASES[i % 2],)]


@pytest.mark.parametrize("case, masked, activation, bias", TRITON_CASES,
                         ids=[f"{CASE_IDS[CASES.index(c)]}-{'mask' if m else 'nomask'}-{a}-{b}"
                              for c, m, a, b in TRITON_CASES])
def test_triton_op_path_equals_materialized(case, masked, activation, bias):
    """float32 on the triton op vs the float64 materialized formula, the float32 one giving the error budget."""
    tgt, src, offset = case
    mod64 = module(activation, bias)
    mod32 = copy.deepcopy(mod64).float().to(DEVICE)
    query, enc, mask = inputs(tgt, src, masked)
    g = torch.randn(3, tgt, 8, dtype=torch.float64)
    ref64, grads64 = run(mod64, query, enc, mask, offset, None, g)
    dev = (lambda t: None if t is None else t.to(DEVICE))
    ref32, grads32 = run(mod32, query.float().to(DEVICE), enc.float().to(DEVICE), dev(mask), offset, None,
                         g.float().to(DEVICE))
    out, grads = run(mod32, query.float().to(DEVICE), enc.float().to(DEVICE), dev(mask), offset, "triton",
                     g.float().to(DEVICE))
    name = f"{case} {activation} {bias} mask={masked}"
    assert out.dtype == torch.float32
    assert_close_to_reference(f"{name} out", out.cpu(), ref64, ref32.cpu())
    for k, v in grads64.items():
        assert_close_to_reference(f"{name} d{k}", grads[k].cpu(), v, grads32[k].cpu())


def test_module_routes_through_the_op_when_the_backend_resolves_to_a_kernel(monkeypatch):
    """kernel_backend 'triton' (whole config or the attention entry) sends every group of at most S queries to
    ops.attention; output_attentions, attention dropout in training, and a backend resolving to the reference
    ('reference', or 'auto' with a short source) take the materialized path."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    calls = spy_attention(monkeypatch)
    mod = module("softmax", "rotary", torch.float32).to(DEVICE)
    query, enc, mask = (t.float().to(DEVICE) if t.is_floating_point() else t.to(DEVICE)
                        for t in inputs(7, 3, True, torch.float32))
    mod.backend = "triton"
    out, weights, _ = mod(query, enc, mask)
    assert weights is None and calls == [(3, 3, "triton"), (3, 3, "triton"), (1, 3, "triton")]
    calls.clear()
    ref, weights, _ = mod(query, enc, mask, output_attentions=True)
    assert weights.shape == (3, 7, 3) and calls == []
    # two float32 paths (the op's kernel and the materialized weights): equal to float32's bare tolerance
    torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=0, atol=ATOL[torch.float32] * (1 + ref.abs().max().item()))
    for backend in ("reference", "auto"):
        mod.backend = backend
        mod(query, enc, mask)
        assert calls == []
    mod.backend = "triton"
    mod.attention_dropout.p = 0.5
    mod.train()
    mod(query, enc, mask)
    assert calls == []
    mod.attention_dropout.p = 0.0
    mod(query, enc, mask)
    assert len(calls) == 3
    for kb in ("triton", {"attention": "triton"}):
        cfg = MegaConfig(hidden_size=8, shared_representation_size=8, is_decoder=True, bidirectional=False,
                         add_cross_attention=True, kernel_backend=kb)
        assert MegaGatedCrossAttention(cfg).backend == "triton"


def test_auto_follows_the_op_rules(monkeypatch):
    """The module asks the op's own `auto` rules which backend a call runs on: short source blocks and a Z wider
    than the kernels take stay on the materialized path (it once named triton for Z > 256 and the kernel
    refused the call)."""
    import importlib

    from test_ops import _fake_auto_backend

    attention_mod = importlib.import_module("mega_kernels.ops.attention")
    _fake_auto_backend(monkeypatch, "attention", "triton")
    monkeypatch.setattr(attention_mod, "TRITON_ATTENTION_MIN_BLOCK", 4)
    mod = module("softmax", "simple", dtype=torch.float32)
    q = torch.randn(2, 3, 8)
    assert mod._op_backend(q, 4) is None and mod._op_backend(q, 5) == "triton"
    monkeypatch.setattr(attention_mod, "TRITON_ATTENTION_MAX_Z", 7)
    assert mod._op_backend(q, 5) is None
    mod.backend = "triton"  # an explicit request keeps the kernel (which then says what it refuses)
    assert mod._op_backend(q, 4) == "triton"
