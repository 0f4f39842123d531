"""Module-level checks: the relative biases, the EMA module and the norms against transformers' modules
(transformers works sequence-first (L, B, D), ours batch-first), training-mode behaviour (dropout paths,
batchnorm statistics), and gradcheck of the modules in float64 on tiny shapes."""
import pytest
import torch

from parity import assert_close, config_dict, fixed_hf_rmsnorm, hf, hf_config_mod, perturb_

from mega_kernels import MegaConfig
from mega_kernels.modules import (MegaDropout, MegaMovingAverageGatedAttention, MegaMultiDimensionDampedEma,
                                  MegaRotaryRelativePositionalBias, MegaSequenceNorm,
                                  MegaSimpleRelativePositionalBias)


def pair(hf_cls, our_cls, **overrides):
    cfg = config_dict(**overrides)
    theirs = hf_cls(hf_config_mod.MegaConfig(**cfg))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.5)
    ours = our_cls(MegaConfig(**cfg))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("length", [1, 7, 13, 40])  # 40 > max_positions (32): the tables are extended
def test_rotary_bias_matches_transformers(length):
    theirs, ours = pair(hf.MegaRotaryRelativePositionalBias, MegaRotaryRelativePositionalBias)
    assert set(ours.state_dict()) == {"alpha", "b_param", "_float_tensor"}
    ref = theirs(length)
    assert_close("rotary", ours(length), ref, rtol=1e-6)
    vec = ours.vector(length)  # the Toeplitz vector the attention op receives
    i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    assert_close("rotary vector", vec[length - 1 + j - i], ref, rtol=1e-6)


def test_rotary_bias_is_exact_in_float64():
    """Our vector against the rotation formula itself, in float64 (transformers' float32 angles lose digits)."""
    _, ours = pair(hf.MegaRotaryRelativePositionalBias, MegaRotaryRelativePositionalBias)
    ours = ours.double()
    length, half = 50, 4
    freqs = torch.exp(torch.arange(half).float() * -(torch.log(torch.tensor(10000.0)) / half)).double()
    t = torch.arange(length, dtype=torch.float64)[:, None] * freqs

    def rot(x):
        x1, x2 = x.view(-1)[:half], x.view(-1)[half:]
        return torch.cat([x1 * t.cos() - x2 * t.sin(), x2 * t.cos() + x1 * t.sin()], dim=1)

    expected = rot(ours.alpha) @ rot(ours.b_param).T
    assert (ours(length) - expected).abs().max() < 1e-12


def test_rotary_tables_are_kept_and_sliced(monkeypatch):
    """The cos / sin tables are kept per (Z, device) and grown by doubling; every width, smaller or larger than
    the table, gives the vector of the formula; a table made under inference_mode serves a training step; a
    table over the size limit is computed for its call only."""
    from mega_kernels.modules import embeddings

    monkeypatch.setattr(embeddings, "_TABLES", {})
    _, ours = pair(hf.MegaRotaryRelativePositionalBias, MegaRotaryRelativePositionalBias)
    ours = ours.double()
    half = ours.embed_dim // 2
    a, b = ours.alpha.detach().view(-1), ours.b_param.detach().view(-1)
    freqs = torch.exp(torch.arange(half).float() * -(torch.log(torch.tensor(10000.0)) / half)).double()

    def expected(width):
        t = torch.arange(-(width - 1), width, dtype=torch.float64)[:, None] * freqs
        return t.cos() @ (a[:half] * b[:half] + a[half:] * b[half:]) + t.sin() @ (a[half:] * b[:half] -
                                                                                  a[:half] * b[half:])

    with torch.inference_mode():
        ours.vector(5)
    rows = []
    for width in (5, 3, 9, 2, 20, 1):
        vec = ours.vector(width)
        assert vec.shape == (2 * width - 1,)
        torch.testing.assert_close(vec, expected(width), rtol=1e-12, atol=1e-12)
        rows.append(embeddings._TABLES[(half, torch.device("cpu"))].shape[0])
    assert rows == [9, 9, 19, 19, 39, 39]  # n = 5, then doubled to 10 and 20 (2 n - 1 rows)
    ours.vector(7).sum().backward()  # the table from inference_mode is a plain tensor
    assert ours.alpha.grad is not None and ours.alpha.grad.abs().sum() > 0
    monkeypatch.setattr(embeddings, "_TABLE_LIMIT", 2 * half * 50)
    torch.testing.assert_close(ours.vector(30), expected(30), rtol=1e-12, atol=1e-12)
    assert embeddings._TABLES[(half, torch.device("cpu"))].shape[0] == 39


@pytest.mark.parametrize("chunk_size, length", [(-1, 7), (-1, 32), (8, 8), (8, 3)])
def test_simple_bias_matches_transformers(chunk_size, length):
    theirs, ours = pair(hf.MegaSimpleRelativePositionalBias, MegaSimpleRelativePositionalBias, chunk_size=chunk_size)
    assert torch.equal(ours(length), theirs(length))
    limit = 32 if chunk_size < 0 else chunk_size
    with pytest.raises(ValueError, match="exceeds the simple relative bias"):
        ours(limit + 1)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("truncation", [None, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_ema_module_matches_transformers(bidirectional, truncation, masked):
    theirs, ours = pair(hf.MegaMultiDimensionDampedEma, MegaMultiDimensionDampedEma, bidirectional=bidirectional,
                        truncation=truncation)
    x = torch.randn(3, 13, 16, requires_grad=True)
    mask = None
    if masked:
        mask = torch.ones(3, 13, dtype=torch.long)
        mask[0, :4] = 0
        mask[2] = 0
    for mode in ("train", "eval"):
        theirs.train(mode == "train")
        ours.train(mode == "train")
        ref, _ = theirs(x.transpose(0, 1), attention_mask=mask)
        out, _ = ours(x, None if mask is None else mask.bool())
        assert_close(f"ema {mode}", out, ref.transpose(0, 1))
    w = torch.randn_like(out)
    g_ref = torch.autograd.grad((ref.transpose(0, 1) * w).sum(), [x] + list(theirs.parameters()))
    g_out = torch.autograd.grad((out * w).sum(), [x] + list(ours.parameters()))
    assert_close("ema grads", g_out, g_ref, rtol=1e-4)


# (transformers cannot initialise a LayerNorm without affine parameters, so that pair is left out)
@pytest.mark.parametrize("norm_type, affine", [(n, a) for n in ("scalenorm", "layernorm", "rmsnorm", "batchnorm")
                                               for a in (True, False) if (n, a) != ("layernorm", False)])
def test_norms_match_transformers_in_training(norm_type, affine):
    theirs = hf.MegaSequenceNorm(norm_type, 16, affine=affine)
    with torch.no_grad():  # transformers' scale/RMS norms start from uninitialised memory
        for p in theirs.parameters():
            p.fill_(1.0)
    perturb_(theirs)
    ours = MegaSequenceNorm(norm_type, 16, affine=affine)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 7, 16) * 3 + 1
    with fixed_hf_rmsnorm():
        ref = theirs.train()(x.transpose(0, 1)).transpose(0, 1)
    assert_close(norm_type, ours.train()(x), ref)
    if norm_type == "batchnorm":  # running statistics updated the same way
        assert_close("running_mean", ours.norm.running_mean, theirs.norm.running_mean)


def test_feature_dropout_drops_whole_channels():
    drop = MegaDropout(0.5, is_featurewise=True).train()
    y = drop(torch.ones(4, 9, 32))
    zero = y == 0
    assert zero.any() and not zero.all()
    assert (zero == zero[:, :1]).all(), "a dropped channel must be dropped at every position"
    assert torch.allclose(y[~zero], torch.full_like(y[~zero], 2.0))
    assert torch.equal(drop.eval()(torch.ones(2, 3, 4)), torch.ones(2, 3, 4))


def _layer(**overrides):
    cfg = MegaConfig(**config_dict(dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   **overrides))
    layer = MegaMovingAverageGatedAttention(cfg)
    perturb_(layer, scale=0.3)
    return layer


def test_training_attention_dropout_path_equals_the_op():
    """With attention dropout on, training runs the materialized attention; with p -> 0 it equals the op path."""
    layer = _layer(use_chunking=True, chunk_size=4, attention_activation="laplace", bidirectional=False)
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    expected, _, _ = layer.eval()(x, mask, causal=True)
    layer.train()
    layer.attention_dropout.p = 1e-12
    got, _, _ = layer(x, mask, causal=True)
    assert_close("materialized training path", got, expected, rtol=1e-6)
    layer.attention_dropout.p = 0.5
    dropped, _, _ = layer(x, mask, causal=True)
    assert not torch.allclose(dropped, expected)
    dropped.sum().backward()
    assert layer.v_proj.weight.grad is not None


def test_training_attention_dropout_acts_on_blocks():
    """Attention dropout in training multiplies the per-block probabilities (B * blocks, C, C): no (B, L, L)
    matrix is built (it was, and a dense product with v ran, whatever the chunk size)."""
    layer = _layer(use_chunking=True, chunk_size=4, bidirectional=False).train()
    seen = []

    class Recorder(torch.nn.Dropout):
        def forward(self, t):
            seen.append(tuple(t.shape))
            return super().forward(t)

    layer.attention_dropout = Recorder(0.5)
    y, weights, _ = layer(torch.randn(2, 10, 16), torch.ones(2, 10, dtype=torch.bool), causal=True)
    assert seen == [(2 * 3, 4, 4)] and weights is None and torch.isfinite(y).all()


@pytest.mark.parametrize("overrides", [
    dict(use_chunking=True, chunk_size=3, attention_activation="softmax", bidirectional=False, truncation=4),
    dict(attention_activation="relu2", relative_positional_bias="simple", normalization_type="layernorm"),
    dict(attention_activation="laplace", normalize_before_mega=False, normalization_type="rmsnorm"),
], ids=["softmax-chunk-causal-trunc", "relu2-simple", "laplace-postnorm"])
def test_gated_attention_gradcheck(overrides):
    layer = _layer(**overrides).double()
    causal = not layer.config.bidirectional
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 5:] = False
    keep = mask[..., None].double()  # compare tokens only: a padded row's output is a convention

    def f(inp):
        return layer(inp, mask, causal=causal)[0] * keep

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_every_activation_is_transformers():
    """Each activation name MegaConfig takes is transformers' ACT2FN function of that name, bit for bit in float32
    and float64 (clipping and saturation ranges included); laplace uses the spec's exact mu = sqrt(1/2) and
    sigma = sqrt(1/(4 pi)) where transformers rounds them to 6 digits (0.707107, 0.282095): ~4e-7 apart."""
    from transformers.activations import ACT2FN

    from mega_kernels.config import ACTIVATIONS
    from mega_kernels.modules.common import get_activation

    x = torch.cat([torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 3, torch.linspace(-30, 30, 601)])
    for name in ACTIVATIONS:
        MegaConfig(activation=name)  # accepted
        for dtype in (torch.float32, torch.float64):
            ours, theirs = get_activation(name)(x.to(dtype)), ACT2FN[name](x.to(dtype))
            if name == "laplace":
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
            else:
                assert torch.equal(ours, theirs), (name, dtype, (ours - theirs).abs().max())
