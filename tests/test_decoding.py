"""Cached decoding equals the full causal pass (spec 9.4: transformers' cached path is wrong for laplace/relu2,
with chunking, with padding and with truncation; its own test of this is vacuous, 9.7). Float64, every attention
type, chunking on/off (with L not a multiple of C), truncation, left padding, token-by-token and multi-token
steps; plus `generate`. No transformers here (the cache's agreement with transformers' is in
test_parity_models), so the GPU decoding test also runs where transformers is not installed."""
import pytest
import torch

from model_helpers import config_dict, gpu_backends

import mega_kernels
from mega_kernels import MegaConfig, MegaForCausalLM

DEC = dict(is_decoder=True, bidirectional=False, dropout_prob=0.0, hidden_dropout_prob=0.0,
           attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0)


def decoder(**overrides):
    torch.manual_seed(0)
    model = MegaForCausalLM(MegaConfig(**config_dict(**DEC, **overrides)))
    with torch.no_grad():  # move everything off the trivial init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.double().eval()


def left_padded_ids(bsz, length, vocab):
    ids = torch.randint(3, vocab, (bsz, length))
    mask = torch.ones(bsz, length, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    ids[mask == 0] = 1
    return ids, mask


def check_steps(model, ids, mask, steps, rtol=1e-10):
    """Feed ids in pieces of the given sizes through the cache; each piece's logits must equal the full pass
    (to rtol times the logits' magnitude)."""
    full = model(ids, attention_mask=mask, use_cache=False).logits
    tol = rtol * (1.0 + full.abs().max().item())
    past, start = None, 0
    keep = mask.bool()
    for size in steps:
        end = start + size
        out = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=past, use_cache=True)
        past = out.past_key_values
        chunk = model.config.chunk_size if model.config.use_chunking else None
        for layer in past:  # the K/V cache restarts at chunk boundaries: it never outgrows one chunk
            assert layer[0].shape[1] == (end % chunk if chunk else end) and layer[3].tolist() == [end] * len(ids)
        got, want = out.logits, full[:, start:end]
        k = keep[:, start:end]
        err = (got - want).abs()[k].max().item() if k.any() else 0.0
        assert err <= tol, f"tokens [{start}, {end}): cached logits differ from the full pass by {err:.3e}"
        start = end
    assert start == ids.shape[1]


@pytest.mark.parametrize("activation", ["softmax", "laplace", "relu2"])
@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("truncation", [None, 3])
def test_token_by_token_equals_full_pass(activation, chunk, truncation):
    extra = dict(use_chunking=True, chunk_size=chunk) if chunk else {}
    model = decoder(attention_activation=activation, truncation=truncation, **extra)
    ids, mask = left_padded_ids(2, 11, 50)
    check_steps(model, ids, mask, [1] * 11)       # every step one token, from an empty cache
    check_steps(model, ids, mask, [5, 1, 1, 3, 1])  # a prompt, single steps, a multi-token continuation


@pytest.mark.parametrize("overrides", [
    dict(add_cross_attention=True, relative_positional_bias="simple", attention_activation="laplace"),
    dict(add_cross_attention=True, use_chunking=True, chunk_size=3, normalization_type="layernorm"),
], ids=["cross-simple-laplace", "cross-chunk"])
def test_cross_attention_decoding_equals_full_pass(overrides):
    model = decoder(**overrides)
    ids, mask = left_padded_ids(2, 9, 50)
    enc = torch.randn(2, 6, 16, dtype=torch.float64)
    enc_mask = torch.ones(2, 6, dtype=torch.long)
    enc_mask[0, 4:] = 0
    full = model(ids, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
                 use_cache=False).logits
    out = model(ids[:, :4], attention_mask=mask[:, :4], encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
                use_cache=True)
    past, logits = out.past_key_values, [out.logits]
    for t in range(4, 9):  # the cached cross K/V stand in for the encoder states
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], encoder_attention_mask=enc_mask,
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits)
    got = torch.cat(logits, 1)
    assert (got - full).abs()[mask.bool()].max() < 1e-10


def test_generate_greedy_and_sampling_use_the_cache_correctly():
    model = decoder(attention_activation="relu2", use_chunking=True, chunk_size=4, truncation=5)
    ids, mask = left_padded_ids(2, 5, 50)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=9)
    assert greedy.shape == (2, 14) and torch.equal(greedy[:, :5], ids)
    assert torch.equal(greedy, model.generate(ids, attention_mask=mask, max_new_tokens=9, use_cache=False))
    top1 = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)
    runs = [model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=True, temperature=0.7, top_k=10,
                           use_cache=cache, generator=torch.Generator().manual_seed(3)) for cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_reorder_cache_selects_rows():
    model = decoder(truncation=3)
    ids = torch.randint(3, 50, (3, 5))
    past = model(ids, use_cache=True).past_key_values
    picked = model.reorder_cache(past, torch.tensor([2, 0]))
    nxt = torch.randint(3, 50, (3, 1))
    full = model(nxt, past_key_values=past, use_cache=True).logits
    got = model(nxt[[2, 0]], past_key_values=picked, use_cache=True).logits
    assert (got - full[[2, 0]]).abs().max() < 1e-12


def test_generate_stops_at_eos_and_pads():
    model = decoder()
    ids = torch.randint(3, 50, (2, 4))
    first = model.generate(ids, max_new_tokens=1)[:, -1]
    eos = int(first[0])
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out[0, 4] == eos and (out[0, 5:] == 0).all()


def test_generate_needs_a_decoder():
    model = mega_kernels.MegaForCausalLM(MegaConfig(**config_dict()))
    with pytest.raises(ValueError, match="is_decoder=True"):
        model.generate(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an int >= 0"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(top_k=0), "top_k must be a positive int"),
])
def test_generate_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decoder().generate(torch.randint(3, 50, (1, 3)), **kwargs)


def test_generate_with_eos_needs_a_pad_token():
    with pytest.raises(ValueError, match="pass pad_token_id"):
        decoder(pad_token_id=None).generate(torch.randint(3, 50, (1, 3)), eos_token_id=5)


def test_generate_zero_new_tokens_returns_the_prompt():
    ids = torch.randint(3, 50, (2, 3))
    assert torch.equal(decoder().generate(ids, max_new_tokens=0), ids)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["softmax", "laplace", "relu2"])
def test_decoding_on_gpu(activation):
    """Cached decoding equals the full pass on CUDA in float32 through each GPU kernel backend."""
    for backend in gpu_backends():
        model = decoder(attention_activation=activation, use_chunking=True, chunk_size=4, truncation=6,
                        kernel_backend=backend).float().cuda()
        ids, mask = left_padded_ids(2, 11, 50)
        check_steps(model, ids.cuda(), mask.cuda(), [5, 1, 1, 3, 1], rtol=2e-5)
        check_steps(model, ids.cuda(), mask.cuda(), [1] * 11, rtol=2e-5)
        model = decoder(attention_activation=activation, kernel_backend=backend).float().cuda()
        check_steps(model, ids.cuda(), mask.cuda(), [4, 1, 1, 5], rtol=2e-5)
