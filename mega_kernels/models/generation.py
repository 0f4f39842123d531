"""`generate`: greedy decoding or sampling (below), or beam search (beam_search.py), using the cache.

The prompt goes through one full pass with use_cache=True; each new token is then one cached step
(`past_key_values` + the attention mask extended with ones). Token-by-token cached steps give the same outputs
as the full causal pass (spec 9.4), so `use_cache=False` (recomputing everything each step) returns the same
tokens; it exists for checking.

The next token comes from the last position's logits s (B, vocab), changed in this order, which is the order of
transformers' generation processors, so the same settings draw from the same distribution:
1. repetition penalty r (CTRL): for every token already in the row, prompt and padding included,
   s <- s / r where s > 0, else s * r;
2. while fewer than `min_new_tokens` tokens are new, the end-of-sequence tokens get s = -inf;
3. greedy: argmax. Sampling: s / temperature; top-k keeps the k largest; top-p keeps, from the most probable
   down, the tokens whose more probable predecessors hold less than top_p of the probability (the smallest
   set reaching top_p, and always the most probable token); one draw from softmax(s).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch

from .beam_search import beam_search

Tensor = torch.Tensor

# forward inputs that generate passes on to every call (token_type_ids grow with the tokens: Stepper.append)
_MODEL_KWARGS = ("encoder_hidden_states", "encoder_attention_mask", "token_type_ids")


def _int_at_least(name: str, value, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_settings(do_sample, temperature, top_k, top_p, repetition_penalty, num_return_sequences, num_beams):
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive int or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 or None, got {repetition_penalty}")
    if _int_at_least("num_beams", num_beams, 1) > 1:
        if do_sample:
            raise ValueError("beam search with sampling (num_beams > 1, do_sample=True) is not implemented; use "
                             "num_beams=1 to sample, or do_sample=False for beam search")
        if num_return_sequences > num_beams:
            raise ValueError(f"num_return_sequences={num_return_sequences} is more than num_beams={num_beams}: "
                             "beam search returns at most num_beams sequences per prompt")
    elif _int_at_least("num_return_sequences", num_return_sequences, 1) > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True or num_beams >= num_return_sequences "
                         "(greedy decoding would repeat one sequence)")


def _top_p(logits: Tensor, top_p: float) -> Tensor:
    """logits (B, vocab) with -inf where the more probable tokens before a token already hold >= top_p."""
    probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
    drop = (probs.cumsum(-1) - probs) >= top_p  # never the first: 0 < top_p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _penalise(scores: Tensor, tokens: Tensor, *, new: int, min_new_tokens: int, eos: Optional[Tensor],
              repetition_penalty: Optional[float]) -> Tensor:
    """Rules 1 and 2 on scores (B, vocab) (logits, or log-probabilities in beam search), tokens (B, T)."""
    if repetition_penalty is not None and repetition_penalty != 1.0:
        seen = scores.gather(1, tokens)
        scores = scores.scatter(1, tokens, torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty))
    if eos is not None and new < min_new_tokens:
        scores = scores.index_fill(1, eos, float("-inf"))
    return scores


def _next_token(logits: Tensor, tokens: Tensor, *, new: int, min_new_tokens: int, eos: Optional[Tensor],
                repetition_penalty: Optional[float], do_sample: bool, temperature: float, top_k: Optional[int],
                top_p: Optional[float], generator: Optional[torch.Generator]) -> Tensor:
    """logits (B, vocab) of the last position, tokens (B, T) so far, `new` of them generated -> (B,) ids."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = _penalise(logits, tokens, new=new, min_new_tokens=min_new_tokens, eos=eos,
                       repetition_penalty=repetition_penalty)
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = _top_p(logits, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def _new_token_count(max_new_tokens: Optional[int], max_length: Optional[int], prompt: int) -> int:
    if max_new_tokens is not None and max_length is not None:
        raise ValueError("pass max_new_tokens or max_length (the total length, prompt included), not both")
    if max_length is None:
        return 20 if max_new_tokens is None else _int_at_least("max_new_tokens", max_new_tokens, 0)
    if _int_at_least("max_length", max_length, 0) < prompt:
        raise ValueError(f"max_length={max_length} is shorter than the prompt ({prompt} tokens)")
    return max_length - prompt


def _model_kwargs(kwargs: dict) -> dict:
    """The extra keyword arguments, checked: only the forward inputs of _MODEL_KWARGS are accepted."""
    unknown = sorted(k for k in kwargs if k not in _MODEL_KWARGS)
    if unknown:
        raise ValueError(f"generate got unsupported argument(s) {', '.join(unknown)}; besides the settings in its "
                         f"signature it takes the model inputs {', '.join(_MODEL_KWARGS)}")
    return {k: v for k, v in kwargs.items() if v is not None}


class Stepper:
    """Runs a decoder one token at a time for a batch of rows: through the cache, or by full passes
    (use_cache=False). `tokens` (N, T) holds every row's tokens so far; the attention mask grows with ones and
    token_type_ids with each row's last type."""

    def __init__(self, model, ids: Tensor, mask: Tensor, model_kwargs: dict, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.types = model_kwargs.pop("token_type_ids", None)
        self.tokens, self.mask, self.kwargs = ids, mask, model_kwargs
        self.past, self.step_ids, self.step_types = None, ids, self.types

    def last_logits(self) -> Tensor:
        """(N, vocab) logits of the next token of every row."""
        if self.use_cache:
            out = self.model(self.step_ids, attention_mask=self.mask, token_type_ids=self.step_types,
                             past_key_values=self.past, use_cache=True, **self.kwargs)
            self.past = out.past_key_values
        else:
            out = self.model(self.tokens, attention_mask=self.mask, token_type_ids=self.types, use_cache=False,
                             **self.kwargs)
        return out.logits[:, -1]

    def append(self, nxt: Tensor, rows: Optional[Tensor] = None) -> None:
        """Extend the rows by nxt (N,); rows (N,), for beam search: the present row each new row continues."""
        if rows is not None:
            self.tokens, self.mask = self.tokens[rows], self.mask[rows]
            self.kwargs = {k: v[rows] for k, v in self.kwargs.items()}
            self.types = None if self.types is None else self.types[rows]
            if self.past is not None:
                self.past = self.model.reorder_cache(self.past, rows)
        self.tokens = torch.cat([self.tokens, nxt[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(nxt), 1)], dim=1)
        self.step_ids = nxt[:, None]
        if self.types is not None:  # a new token takes the type of the last one
            self.types = torch.cat([self.types, self.types[:, -1:]], dim=1)
            self.step_types = self.types[:, -1:]


class GenerationMixin:
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                 max_new_tokens: Optional[int] = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = 50, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                 pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 use_cache: bool = True, *, max_length: Optional[int] = None, min_new_tokens: int = 0,
                 top_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
                 num_return_sequences: int = 1, num_beams: int = 1, length_penalty: float = 1.0,
                 early_stopping: Union[bool, str] = False, **model_kwargs) -> Tensor:
        """input_ids (B, L) prompt (left-pad it, with attention_mask (B, L), for prompts of unequal length)
        -> (B * num_return_sequences, L + n) tokens, each prompt's sequences next to each other, with
        n <= max_new_tokens (default 20; or max_length - L) new tokens. The next token is chosen as the module
        docstring says (repetition_penalty, min_new_tokens, temperature, top_k (default 50, as transformers'
        GenerationConfig; None: no top-k), top_p). A sequence that emits `eos_token_id` (an id or a list of
        ids) is filled with `pad_token_id` afterwards; generation stops early when every sequence has finished,
        and never stops at eos when no eos_token_id is given.
        num_beams > 1: beam search (`beam_search.py`; length_penalty, early_stopping True / False / "never" as
        transformers), returning each prompt's num_return_sequences best hypotheses.
        `model_kwargs`: encoder_hidden_states (B, S, D) and encoder_attention_mask (B, S) go to every forward
        call; token_type_ids (B, L) give the prompt's types, and each new token takes its row's last type."""
        if not self.config.is_decoder:
            raise ValueError("generate needs a decoder: build the model with is_decoder=True, bidirectional=False")
        model_kwargs = _model_kwargs(model_kwargs)
        _check_settings(do_sample, temperature, top_k, top_p, repetition_penalty, num_return_sequences, num_beams)
        _int_at_least("min_new_tokens", min_new_tokens, 0)
        steps = _new_token_count(max_new_tokens, max_length, input_ids.shape[1])
        if eos_token_id is not None and pad_token_id is None and self.config.pad_token_id is None:
            raise ValueError("eos_token_id needs a pad_token_id to fill finished sequences with; pass pad_token_id")
        pad_token_id = self.config.pad_token_id if pad_token_id is None else pad_token_id
        eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=input_ids.device).reshape(-1)
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
        if input_ids.shape[0] == 0:  # no sequence to extend (and a cache of no rows could not hold its position)
            return input_ids.new_zeros(0, input_ids.shape[1] + steps)
        copies = num_beams if num_beams > 1 else num_return_sequences
        if copies > 1:
            input_ids, mask = input_ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
            model_kwargs = {k: v.repeat_interleave(copies, 0) for k, v in model_kwargs.items()}
        bsz = input_ids.shape[0]
        if num_beams > 1:
            if steps == 0:
                return input_ids[::num_beams].repeat_interleave(num_return_sequences, 0)
            rules = functools.partial(_penalise, min_new_tokens=min_new_tokens, eos=eos,
                                      repetition_penalty=repetition_penalty)
            return beam_search(Stepper(self, input_ids, mask, model_kwargs, use_cache),
                               lambda scores, tokens, new: rules(scores, tokens, new=new), num_beams=num_beams,
                               steps=steps, num_return_sequences=num_return_sequences, eos=eos,
                               pad_token_id=pad_token_id, length_penalty=length_penalty,
                               early_stopping=early_stopping)
        choose = dict(min_new_tokens=min_new_tokens, eos=eos, repetition_penalty=repetition_penalty,
                      do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        run = Stepper(self, input_ids, mask, model_kwargs, use_cache)
        finished = torch.zeros(bsz, dtype=torch.bool, device=input_ids.device)
        for new in range(steps):
            nxt = _next_token(run.last_logits(), run.tokens, new=new, **choose)
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            run.append(nxt)
            if eos is not None:
                finished |= torch.isin(nxt, eos)
                if bool(finished.all()):
                    break
        return run.tokens

    @staticmethod
    def reorder_cache(past_key_values, beam_idx: Tensor):
        """Select batch rows of a cache (e.g. for beam search): every cache entry is batch-first."""
        return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past_key_values)
