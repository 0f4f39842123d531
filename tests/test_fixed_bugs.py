"""The transformers bugs of MEGA_SPEC.md section 9: each test checks the correct behaviour on our model and shows
that transformers' model fails the same check (so the test would fail on transformers' behaviour).
9.7 (a vacuous cached-decoding test) is answered by tests/test_decoding.py, which compares real outputs."""
import pytest
import torch

from parity import build_pair, config_dict, hf

from mega_kernels.modules import MegaRMSNorm

DEC = dict(is_decoder=True, bidirectional=False)


def test_9_1_rmsnorm_normalizes():
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 4

    def is_rmsnorm(module):
        with torch.no_grad():
            module.weight.copy_(torch.linspace(0.5, 2.0, 16, dtype=torch.float64))
        want = module.weight * x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-5)
        return torch.allclose(module(x), want, atol=1e-12)

    assert is_rmsnorm(MegaRMSNorm(16).double())
    assert not is_rmsnorm(hf.MegaRMSNorm(16, eps=1e-5).double())
    # without affine weights (norm_affine=False): the bare normalisation, by the formula
    bare = MegaRMSNorm(16, affine=False).double()
    assert bare.weight is None
    assert torch.allclose(bare(x), x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-5), atol=1e-12)


def test_9_2_any_length_with_chunking():
    """L = 10 with chunk_size 4: outputs at the original length, equal to transformers run on the input padded to
    12 with a padding mask (the last block is then a 2-token block, as ours treats it)."""
    cfg = config_dict(use_chunking=True, chunk_size=4, attention_activation="laplace")
    hf_model, ours = build_pair("MegaModel", cfg)
    ids = torch.randint(2, 50, (2, 10))
    out = ours(ids).last_hidden_state
    assert out.shape == (2, 10, 16)
    padded = torch.cat([ids, torch.ones(2, 2, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 2)], 1).long()
    ref = hf_model(padded, attention_mask=mask).last_hidden_state[:, :10]
    assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(Exception):
        hf_model(ids)


@pytest.mark.parametrize("activation", ["softmax", "relu2"])
def test_9_3_decoder_with_chunking_and_short_input(activation):
    """A decoder with chunk_size 8 on L = 5 is one causal block: it equals the unchunked decoder."""
    cfg = config_dict(**DEC, attention_activation=activation)
    hf_plain, plain = build_pair("MegaModel", cfg)
    _, chunked = build_pair("MegaModel", dict(cfg, use_chunking=True, chunk_size=8))
    chunked.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 50, (2, 5))
    assert torch.allclose(chunked(ids).last_hidden_state, plain(ids).last_hidden_state, atol=1e-6)
    hf_chunked = hf.MegaModel(hf_plain.config.__class__(**dict(cfg, use_chunking=True, chunk_size=8))).eval()
    hf_chunked.load_state_dict(hf_plain.state_dict())
    with pytest.raises(Exception):
        hf_chunked(ids, use_cache=False)


def _step_error(model, ids):
    """Max difference between the last token's logits from a cached step and from the full pass."""
    full = model(ids, use_cache=False).logits[:, -1]
    prefix = model(ids[:, :-1], use_cache=True)
    step = model(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    return (step - full).abs().max().item()


@pytest.mark.parametrize("overrides", [dict(attention_activation="laplace"), dict(truncation=2)],
                         ids=["laplace-n", "truncation"])
def test_9_4_cached_step_equals_full_pass(overrides):
    hf_model, ours = build_pair("MegaForCausalLM", config_dict(**DEC, **overrides))
    with torch.no_grad():  # large q.k, so that the score's divisor n matters
        for model in (hf_model, ours):
            for layer in model.mega.layers:
                layer.mega_layer.qk_weight.mul_(30.0)
                layer.mega_layer.h_proj.weight.mul_(30.0)
    ids = torch.randint(0, 50, (2, 6))
    assert _step_error(ours, ids) < 1e-5
    assert _step_error(hf_model, ids) > 1e-3


def test_9_5_left_padding_with_causal_softmax_gives_no_nan():
    """Left-padded rows are finite, and their tokens' outputs equal those of the unpadded sequence."""
    hf_model, ours = build_pair("MegaModel", config_dict(**DEC))
    ids = torch.randint(2, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    out = ours(ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert torch.isfinite(out).all()
    alone = ours(ids[1:, 3:], use_cache=False).last_hidden_state
    assert torch.allclose(out[1, 3:], alone[0], atol=1e-5)
    assert not torch.isfinite(hf_model(ids, attention_mask=mask, use_cache=False).last_hidden_state).all()


def test_9_6_no_stale_ema_kernel_after_a_weight_change():
    hf_model, ours = build_pair("MegaModel", config_dict())
    ids = torch.randint(0, 50, (2, 7))

    def sees_weight_change(model):
        before = model(ids).last_hidden_state
        with torch.no_grad():
            model.layers[0].mega_layer.ema_gate.damping_factor.add_(1.0)
        return not torch.allclose(model(ids).last_hidden_state, before)

    assert sees_weight_change(ours)
    assert not sees_weight_change(hf_model)
