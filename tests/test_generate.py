"""`generate`: the cache gives the tokens of full passes; each rule for choosing the next token (repetition
penalty, min_new_tokens, temperature, top-k, top-p) on known logits and, for greedy decoding, against a plain
loop of full passes written here; lengths, several sequences per prompt, token types, cross-attention inputs and
the refusals of settings it does not take."""
import math

import numpy as np
import pytest
import torch

from model_helpers import config_dict, decoder, left_padded_ids

import mega_kernels
from mega_kernels import MegaConfig
from mega_kernels.models.generation import _next_token, _top_p

def pick(logits, tokens, **rules):
    return _next_token(logits, tokens, **rules)[0]


RULES = dict(new=0, min_new_tokens=0, eos=None, repetition_penalty=None, do_sample=False, temperature=1.0,
             top_k=None, top_p=None, generator=None)


def plain_greedy(model, ids, mask, steps, *, penalty=None, min_new=0, eos=(), pad=1, types=None):
    """Greedy decoding by full passes, one row and one token at a time (independent of generation.py)."""
    tokens, done = ids.clone(), [False] * len(ids)
    for new in range(steps):
        logits = model(tokens, attention_mask=mask, token_type_ids=types, use_cache=False).logits[:, -1].clone()
        nxt = []
        for b in range(len(tokens)):
            row = logits[b]
            if penalty is not None:
                for t in set(tokens[b].tolist()):
                    row[t] = row[t] / penalty if row[t] > 0 else row[t] * penalty
            if new < min_new:
                for e in eos:
                    row[e] = -math.inf
            nxt.append(pad if done[b] else int(row.argmax()))
            done[b] = done[b] or nxt[-1] in eos
        tokens = torch.cat([tokens, torch.tensor(nxt)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        types = None if types is None else torch.cat([types, types[:, -1:]], 1)
    return tokens


def test_generate_greedy_and_sampling_use_the_cache_correctly():
    model = decoder(attention_activation="relu2", use_chunking=True, chunk_size=4, truncation=5)
    ids, mask = left_padded_ids(2, 5, 50)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=9)
    assert greedy.shape == (2, 14) and torch.equal(greedy[:, :5], ids)
    assert torch.equal(greedy, model.generate(ids, attention_mask=mask, max_new_tokens=9, use_cache=False))
    assert torch.equal(greedy, plain_greedy(model, ids, mask, 9))
    top1 = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=True, top_k=1)
    assert torch.equal(top1, greedy)
    runs = [model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=True, temperature=0.7, top_k=10,
                           top_p=0.8, repetition_penalty=1.3, use_cache=cache,
                           generator=torch.Generator().manual_seed(3)) for cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_top_k_zero_and_return_dict_false_as_transformers():
    """top_k=0 means no top-k filter (transformers' idiom do_sample=True, top_p=..., top_k=0); a model whose
    config says return_dict=False still generates (generate asks for dict outputs itself)."""
    model = decoder()
    ids = torch.randint(3, 50, (2, 4), generator=torch.Generator().manual_seed(1))
    runs = [model.generate(ids, max_new_tokens=6, do_sample=True, top_p=0.9, top_k=k,
                           generator=torch.Generator().manual_seed(5)) for k in (0, None, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    greedy = model.generate(ids, max_new_tokens=6)
    model.config.return_dict = False
    for cache in (True, False):
        assert torch.equal(model.generate(ids, max_new_tokens=6, use_cache=cache), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=6, num_beams=2), decoder().generate(
        ids, max_new_tokens=6, num_beams=2))


def test_top_p_keeps_the_smallest_set_reaching_p():
    """Probabilities 0.5, 0.3, 0.15, 0.05 in a shuffled vocabulary: the kept set for each top_p, at the tokens'
    own positions."""
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3], dtype=torch.float64)
    logits = probs.log()[None].repeat(2, 1) + torch.tensor([[0.0], [3.0]], dtype=torch.float64)  # shift-invariant
    for top_p, kept in [(0.45, [1]), (0.7, [1, 3]), (0.9, [0, 1, 3]), (0.97, [0, 1, 2, 3])]:
        out = _top_p(logits, top_p)
        want = torch.zeros(4, dtype=torch.bool)
        want[kept] = True
        assert torch.equal(torch.isfinite(out), want.expand(2, 4)), top_p
        assert torch.equal(out[:, want], logits[:, want])


def test_sampling_draws_from_the_filtered_distribution():
    """8000 draws under temperature 0.5, top_k 3 and top_p 0.9: only the kept tokens, at their renormalised
    probabilities (within 5 standard errors)."""
    logits = torch.tensor([1.0, 0.2, -0.3, 0.9, -2.0], dtype=torch.float64)
    rules = dict(RULES, do_sample=True, temperature=0.5, top_k=3, top_p=0.9, generator=torch.Generator().manual_seed(0))
    draws = pick(logits[None].repeat(8000, 1), torch.zeros(8000, 1, dtype=torch.long), **rules)
    p = torch.softmax(logits / 0.5, 0)  # 0.547, 0.110, 0.040, 0.448 (top 3), 0.002: top_p 0.9 keeps tokens 0 and 3
    want = torch.zeros(5, dtype=torch.float64)
    want[[0, 3]] = p[[0, 3]] / p[[0, 3]].sum()
    freq = torch.bincount(draws, minlength=5).double() / 8000
    assert set(draws.unique().tolist()) == {0, 3}
    assert ((freq - want).abs() <= 5 * (want * (1 - want) / 8000).sqrt() + 1e-12).all(), (freq, want)


def test_repetition_penalty_and_min_new_tokens_on_known_logits():
    positive = torch.tensor([[4.0, -1.0, 0.5, 3.0]])
    assert pick(positive, torch.tensor([[2]]), **RULES) == 0
    assert pick(positive, torch.tensor([[0, 2]]), **dict(RULES, repetition_penalty=2.0)) == 3  # 4 / 2 < 3
    negative = torch.tensor([[-0.5, -1.0, -0.6]])
    assert pick(negative, torch.tensor([[0]]), **dict(RULES, repetition_penalty=1.5)) == 2  # -0.75 < -0.6
    rules = dict(RULES, eos=torch.tensor([0, 3]), min_new_tokens=2)
    assert pick(positive, torch.tensor([[1]]), **dict(rules, new=1)) == 2  # eos 0 and 3 still banned
    assert pick(positive, torch.tensor([[1]]), **dict(rules, new=2)) == 0


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_with_penalty_min_new_tokens_and_eos_equals_plain_loop(use_cache):
    """eos = row 0's 4th new token under the penalty: row 0 stops there and pads, and the ban of the first 3
    steps changes another row's path (it would emit that token among its first 3)."""
    model = decoder(weight_noise=1.0, use_chunking=True, chunk_size=3)
    ids, mask = left_padded_ids(3, 4, 50)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=8, repetition_penalty=1.7)
    eos = int(free[0, 7])
    assert eos in free[1:, 4:7].flatten().tolist()
    kw = dict(attention_mask=mask, max_new_tokens=8, repetition_penalty=1.7, min_new_tokens=3,
              eos_token_id=[7, eos], pad_token_id=2, use_cache=use_cache)
    got = model.generate(ids, **kw)
    want = plain_greedy(model, ids, mask, 8, penalty=1.7, min_new=3, eos=(7, eos), pad=2)
    assert torch.equal(got, want[:, :got.shape[1]]) and (want[:, got.shape[1]:] == 2).all()
    assert got[0, 7] == eos and (got[0, 8:] == 2).all() and not torch.equal(got[1:], free[1:])
    assert not any(t in (eos, 7) for t in got[:, 4:7].flatten().tolist())


def test_generate_stops_at_eos_and_pads():
    model = decoder()
    ids = torch.randint(3, 50, (2, 4))
    first = model.generate(ids, max_new_tokens=1)[:, -1]
    eos = int(first[0])
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out[0, 4] == eos and (out[0, 5:] == 0).all()


def test_a_prompt_without_mask_is_padded_where_it_holds_the_pad_id():
    """As transformers: without attention_mask, pad ids in the prompt are padding, unless the pad id is an eos
    id (then every position is a token)."""
    model = decoder(weight_noise=1.0, use_chunking=True, chunk_size=3)
    ids, mask = left_padded_ids(2, 6, 50)  # row 1 starts with three pad ids (1)
    kw = dict(max_new_tokens=5, eos_token_id=[40, 41])
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, attention_mask=mask, **kw))
    ones = torch.ones_like(mask)
    kw = dict(max_new_tokens=5, eos_token_id=[40, 1])
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, attention_mask=ones, **kw))
    assert not torch.equal(model.generate(ids, attention_mask=mask, **kw), model.generate(ids, **kw))


def test_max_length_counts_the_prompt():
    model, ids = decoder(), torch.randint(3, 50, (2, 4))
    out = model.generate(ids, max_length=9)
    assert torch.equal(out, model.generate(ids, max_new_tokens=5))
    assert torch.equal(model.generate(ids, max_length=4), ids)


def test_several_sequences_per_prompt_with_encoder_inputs():
    """num_return_sequences repeats each prompt (and the encoder inputs) next to itself: the same tokens as
    generating from the repeated inputs, with the same generator."""
    model = decoder(weight_noise=1.0, add_cross_attention=True, use_chunking=True, chunk_size=3)
    ids, mask = left_padded_ids(2, 5, 50)
    enc, enc_mask = torch.randn(2, 6, 16, dtype=torch.float64), torch.ones(2, 6, dtype=torch.long)
    enc_mask[0, 4:] = 0
    kw = dict(max_new_tokens=6, do_sample=True, top_p=0.95)
    got = model.generate(ids, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
                         num_return_sequences=3, generator=torch.Generator().manual_seed(5), **kw)
    rep = [t.repeat_interleave(3, 0) for t in (ids, mask, enc, enc_mask)]
    want = model.generate(rep[0], attention_mask=rep[1], encoder_hidden_states=rep[2], encoder_attention_mask=rep[3],
                          generator=torch.Generator().manual_seed(5), **kw)
    assert got.shape == (6, 11) and torch.equal(got, want)
    assert len({tuple(r) for r in got[:3].tolist()}) > 1  # the sequences of one prompt are drawn separately


def test_token_types_extend_with_the_last_type():
    model = decoder(weight_noise=1.0, add_token_type_embeddings=True)
    ids, mask = left_padded_ids(2, 5, 50)
    types = torch.tensor([[0, 1, 2, 0, 1], [0, 0, 0, 2, 2]])  # last types not 0 (a new token's default)
    got = [model.generate(ids, attention_mask=mask, token_type_ids=types, max_new_tokens=4, use_cache=c)
           for c in (True, False)]
    assert torch.equal(got[0], got[1])
    assert torch.equal(got[0], plain_greedy(model, ids, mask, 4, types=types))
    assert not torch.equal(got[0], model.generate(ids, attention_mask=mask, max_new_tokens=4))  # types count


def test_generate_needs_a_decoder():
    model = mega_kernels.MegaForCausalLM(MegaConfig(**config_dict()))
    with pytest.raises(ValueError, match="is_decoder=True"):
        model.generate(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an int >= 0"),
    (dict(max_new_tokens=2, max_length=5), "not both"),
    (dict(max_length=2), "shorter than the prompt"),
    (dict(min_new_tokens=-1), "min_new_tokens must be an int >= 0"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(do_sample=True, top_k=2.5), "top_k must be an int >= 0"),
    (dict(do_sample=True, top_k=True), "top_k must be an int >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(num_return_sequences=0), "num_return_sequences must be an int >= 1"),
    (dict(num_return_sequences=2), "needs do_sample=True or num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "more than num_beams=2"),
    (dict(num_beams=2, num_return_sequences=0), "num_return_sequences must be an int >= 1"),
    (dict(num_beams=3, num_return_sequences=1.5), "num_return_sequences must be an int >= 1"),
    (dict(num_beams=2, length_penalty=None), "length_penalty must be a finite number"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(num_beams=0), "num_beams must be an int >= 1"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(typical_p=0.5), "unsupported argument.*typical_p"),
    (dict(labels=torch.zeros(1, 3, dtype=torch.long)), "unsupported argument.*labels"),
])
def test_generate_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decoder().generate(torch.randint(3, 50, (1, 3)), **kwargs)


@pytest.mark.parametrize("penalty", [np.float32(0.5), torch.tensor(0.5), 0.5, 1])
def test_beam_search_takes_any_real_length_penalty(penalty):
    """transformers' beam scorer only raises the length to it: numpy scalars and 0-d tensors are numbers too."""
    ids = torch.randint(3, 50, (2, 4))
    got = decoder().generate(ids, num_beams=2, max_new_tokens=3, length_penalty=penalty)
    assert torch.equal(got, decoder().generate(ids, num_beams=2, max_new_tokens=3, length_penalty=float(penalty)))


def test_generate_needs_a_batch_of_prompts():
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, L\) tensor of token ids, got \(3,\).*ids\[None\]"):
        decoder().generate(torch.randint(3, 50, (3,)), max_new_tokens=2)


def test_generate_with_eos_needs_a_pad_token():
    with pytest.raises(ValueError, match="pass pad_token_id"):
        decoder(pad_token_id=None).generate(torch.randint(3, 50, (1, 3)), eos_token_id=5)


def test_generate_zero_new_tokens_returns_the_prompt():
    ids = torch.randint(3, 50, (2, 3))
    assert torch.equal(decoder().generate(ids, max_new_tokens=0), ids)
