"""`generate` against transformers' GenerationMixin on the same weights. transformers 4.57's MegaForCausalLM has
no generate of its own (README, difference 14), so the test mixes GenerationMixin into it and has it recompute
full passes (config.use_cache=False: its cached MEGA path is wrong for laplace, chunking and padding, spec 9.4).
Greedy decoding, sampling under the same global seed, beam search and beam sampling with every rule ours takes
give the same tokens, scores and logits: the rules, their order and their defaults are transformers'."""
import pytest
import torch
from transformers import GenerationConfig, GenerationMixin

from model_helpers import assert_close, config_dict
from parity import build_pair

DEC = dict(is_decoder=True, bidirectional=False, dropout_prob=0.0, hidden_dropout_prob=0.0,
           attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0)


def pair(**overrides):
    """(transformers model with GenerationMixin, ours), float64, weights moved well off the init so that the
    tokens vary."""
    torch.manual_seed(0)
    theirs, ours = build_pair("MegaForCausalLM", config_dict(**DEC, **overrides), dtype=torch.float64)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict())
    theirs.config.use_cache = False  # (else its forward returns, and generate feeds back, its own cache)
    theirs.__class__ = type("MegaWithGenerate", (type(theirs), GenerationMixin), {})
    theirs.generation_config = GenerationConfig.from_model_config(theirs.config)
    return theirs, ours


SETTINGS = [
    dict(),
    dict(repetition_penalty=1.5, min_new_tokens=4, eos_token_id=[32, 19], pad_token_id=1),
    dict(do_sample=True),
    dict(do_sample=True, temperature=4.0),  # flat: transformers' default top_k 50 shows
    dict(do_sample=True, temperature=0.6, top_k=12, top_p=0.85),
    dict(do_sample=True, top_p=0.7, repetition_penalty=1.3, min_new_tokens=3, eos_token_id=19, pad_token_id=1,
         num_return_sequences=3),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "greedy-penalty-eos", "sample", "sample-hot",
                                                   "sample-top-k-p", "sample-all"])
def test_generate_equals_transformers(settings):
    theirs, ours = pair(vocab_size=80)  # over transformers' default top_k of 50, which ours takes too
    ids = torch.randint(3, 80, (2, 5))
    mask = torch.ones_like(ids)
    eos = dict(eos_token_id=settings.get("eos_token_id"), pad_token_id=settings.get("pad_token_id", 1))
    torch.manual_seed(11)
    want = theirs.generate(ids, attention_mask=mask, max_new_tokens=10, use_cache=False, **{**settings, **eos})
    torch.manual_seed(11)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, **settings)
    assert torch.equal(got, want), (got, want)
    if settings.get("do_sample"):  # the draws vary: a broken seed or rule would not pass by chance
        torch.manual_seed(12)
        assert not torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=10, **settings), got)


BEAMS = [  # (seed of the prompts, prompt length, max_new_tokens, settings)
    (0, 5, 9, dict(num_beams=3)),
    (0, 5, 9, dict(num_beams=4, num_return_sequences=2, length_penalty=0.6, eos_token_id=[32, 19], pad_token_id=1)),
    (0, 5, 9, dict(num_beams=3, early_stopping=True, eos_token_id=19, pad_token_id=1, repetition_penalty=1.4,
                   min_new_tokens=2)),
    (0, 5, 9, dict(num_beams=2, early_stopping="never", length_penalty=1.5, eos_token_id=[71, 19], pad_token_id=0)),
    (0, 5, 9, dict(num_beams=5, num_return_sequences=5, length_penalty=-0.5, eos_token_id=32, pad_token_id=1)),
    # found by searching for settings where one rule of beam_search.py changes the result:
    (1, 6, 15, dict(num_beams=3, length_penalty=2.0, eos_token_id=[19, 71], num_return_sequences=3)),  # closing
    (3, 2, 10, dict(num_beams=4, early_stopping=True, eos_token_id=[20, 19, 55], num_return_sequences=4)),  # full
    (28, 6, 8, dict(num_beams=5, length_penalty=2.0, early_stopping="never", eos_token_id=71,
                    num_return_sequences=4)),  # the "never" bound
    (293, 5, 10, dict(num_beams=4, early_stopping="never", eos_token_id=[71, 20, 19], num_return_sequences=3)),  # M
    # beam sampling: the filters keep at least 1 + the number of eos ids tokens
    (5, 5, 9, dict(num_beams=3, do_sample=True, temperature=0.8, top_k=5, num_return_sequences=2)),
    (6, 4, 9, dict(num_beams=4, do_sample=True, top_k=2, top_p=0.3, eos_token_id=[32, 19], pad_token_id=1,
                   repetition_penalty=1.3, min_new_tokens=1)),
]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "full-passes"])
@pytest.mark.parametrize("seed,length,steps,settings", BEAMS,
                         ids=["beams", "beams-eos-lp", "early-stop", "never", "all-returned", "closing", "full-sets",
                              "never-bound", "three-eos", "beam-sample", "beam-sample-min-keep"])
def test_beam_search_equals_transformers(seed, length, steps, settings, use_cache):
    theirs, ours = pair(vocab_size=80)
    torch.manual_seed(seed)
    ids = torch.randint(3, 80, (3, length))
    mask = torch.ones_like(ids)  # (no left padding: transformers gives NaN for its first rows, spec 9.5)
    eos = dict(eos_token_id=settings.get("eos_token_id"), pad_token_id=settings.get("pad_token_id", 1))
    torch.manual_seed(seed + 100)  # (beam sampling draws from the global generator on both sides)
    want = theirs.generate(ids, attention_mask=mask, max_new_tokens=steps, use_cache=False, **{**settings, **eos})
    torch.manual_seed(seed + 100)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=steps, use_cache=use_cache, **settings)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("settings", [
    dict(repetition_penalty=1.5, min_new_tokens=3, eos_token_id=[32, 19], pad_token_id=1),
    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, num_return_sequences=2),
    dict(num_beams=3, num_return_sequences=2, length_penalty=0.7, eos_token_id=19, pad_token_id=1,
         repetition_penalty=1.2, min_new_tokens=2),
], ids=["greedy", "sample", "beams"])
def test_scores_and_logits_equal_transformers(settings):
    """return_dict_in_generate with output_scores and output_logits: the same sequences, per-step scores (after
    every rule, -inf where a rule removed a token), raw logits and, for beams, the hypotheses' scores."""
    theirs, ours = pair(vocab_size=80)
    torch.manual_seed(4)
    ids = torch.randint(3, 80, (2, 4))
    kw = dict(max_new_tokens=7, return_dict_in_generate=True, output_scores=True, output_logits=True)
    eos = dict(eos_token_id=settings.get("eos_token_id"), pad_token_id=settings.get("pad_token_id", 1))
    torch.manual_seed(9)
    want = theirs.generate(ids, use_cache=False, **kw, **{**settings, **eos})
    torch.manual_seed(9)
    got = ours.generate(ids, **kw, **settings)
    assert type(got).__name__ == type(want).__name__ and torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores) == len(got.logits) > 1
    for name in ("scores", "logits"):  # to transformers' float32 rounding (its EMA is a float32 FFT)
        for i, (a, b) in enumerate(zip(getattr(got, name), getattr(want, name))):
            removed = torch.isinf(b)
            assert torch.equal(torch.isinf(a), removed), f"{name}[{i}]: other tokens removed"
            assert_close(f"{name}[{i}]", a[~removed], b[~removed])
    assert any(torch.isinf(s).any() for s in got.scores)
    if "num_beams" in settings:
        assert_close("sequences_scores", got.sequences_scores, want.sequences_scores)


def test_a_padded_prompt_without_mask_equals_transformers():
    """transformers infers the mask from the pad ids when none is given; so does ours (laplace: transformers'
    softmax gives NaN for left-padded causal rows, spec 9.5)."""
    theirs, ours = pair(vocab_size=80, attention_activation="laplace")
    torch.manual_seed(2)
    ids = torch.randint(3, 80, (3, 6))
    ids[1, :2] = 1  # the pad id
    ids[2, :4] = 1
    for settings in (dict(), dict(num_beams=3)):
        want = theirs.generate(ids, max_new_tokens=6, use_cache=False, eos_token_id=None, pad_token_id=1, **settings)
        assert torch.equal(ours.generate(ids, max_new_tokens=6, **settings), want)
