"""Cached decoding equals the full causal pass (spec 9.4: transformers' cached path is wrong for laplace/relu2,
with chunking, with padding and with truncation; its own test of this is vacuous, 9.7). Float64, every attention
type, chunking on/off (with L not a multiple of C), truncation, left padding, token-by-token and multi-token
steps, and selecting cache rows (`generate` is in test_generate.py). No transformers here (the cache's agreement
with transformers' is in test_parity_models), so the GPU decoding test also runs where transformers is not
installed."""
import pytest
import torch

from model_helpers import decoder, gpu_backends, left_padded_ids


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


def test_truncated_step_output_is_contiguous():
    """The truncated EMA's cached step returns a contiguous y: a strided one takes another matmul path in the next
    projection, so a 16-bit cached step would round differently from the full pass."""
    model = decoder(truncation=3)
    ema = model.mega.layers[0].mega_layer.ema_gate
    _, window = ema(torch.randn(2, 5, 16), use_cache=True)
    y, _ = ema(torch.randn(2, 1, 16), cache=window, use_cache=True)
    assert y.is_contiguous()


def test_reorder_cache_selects_rows():
    model = decoder(truncation=3)
    ids = torch.randint(3, 50, (3, 5))
    past = model(ids, use_cache=True).past_key_values
    picked = model.reorder_cache(past, torch.tensor([2, 0]))
    nxt = torch.randint(3, 50, (3, 1))
    full = model(nxt, past_key_values=past, use_cache=True).logits
    got = model(nxt[[2, 0]], past_key_values=picked, use_cache=True).logits
    assert (got - full[[2, 0]]).abs().max() < 1e-12


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["softmax", "laplace", "relu2"])
def test_decoding_on_gpu(activation):
    """Cached decoding (and beam search) equals the full pass on CUDA in float32 through each GPU kernel
    backend."""
    for backend in gpu_backends():
        model = decoder(attention_activation=activation, use_chunking=True, chunk_size=4, truncation=6,
                        kernel_backend=backend).float().cuda()
        ids, mask = left_padded_ids(2, 11, 50)
        check_steps(model, ids.cuda(), mask.cuda(), [5, 1, 1, 3, 1], rtol=2e-5)
        check_steps(model, ids.cuda(), mask.cuda(), [1] * 11, rtol=2e-5)
        model = decoder(attention_activation=activation, kernel_backend=backend).float().cuda()
        check_steps(model, ids.cuda(), mask.cuda(), [4, 1, 1, 5], rtol=2e-5)
        # beam search reorders the cache's rows on the GPU each step: the same beams as by full passes
        beams = [model.generate(ids.cuda(), attention_mask=mask.cuda(), num_beams=3, num_return_sequences=2,
                                max_new_tokens=5, use_cache=c) for c in (True, False)]
        assert torch.equal(beams[0], beams[1]), (backend, beams)


def test_autocast_caches_keys_in_the_autocast_dtype():
    """Under autocast the attention runs in bfloat16 (ops.attention casts q, k, v): the K cache is kept in that
    dtype, like the V cache, instead of float32 that every later step would cast again whole; the cached steps
    equal the uncached pass under the same autocast (to bfloat16 rounding: GEMMs of other row counts may round
    differently; on this machine they agree bit for bit)."""
    model = decoder().float()
    ids = torch.randint(3, 50, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :5], use_cache=True)
        last = model(ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
    for layer in last.past_key_values:
        assert layer[0].dtype == layer[1].dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat([first.logits, last.logits], 1), full)
