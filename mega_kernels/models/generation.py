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

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from .beam_search import beam_search
from .outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

Tensor = torch.Tensor

# forward inputs that generate passes on to every call (token_type_ids grow with the tokens: Stepper.append)
_MODEL_KWARGS = ("encoder_hidden_states", "encoder_attention_mask", "token_type_ids")


def _int_at_least(name: str, value, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _finite_number(value) -> bool:
    """A finite real number: a Python or numpy number or a one-element tensor, not a bool."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, RuntimeError):  # (a tensor of several elements)
        return False


def _check_settings(do_sample, temperature, top_k, top_p, repetition_penalty, num_return_sequences, num_beams,
                    min_new_tokens, early_stopping, length_penalty):
    _int_at_least("min_new_tokens", min_new_tokens, 0)
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"top_k must be an int >= 0 (0 or None: no top-k filter, as transformers), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 or None, got {repetition_penalty}")
    _int_at_least("num_return_sequences", num_return_sequences, 1)
    if _int_at_least("num_beams", num_beams, 1) > 1:
        if not _finite_number(length_penalty):
            raise ValueError(f"length_penalty must be a finite number (1.0: the mean log-probability per token, "
                             f"as transformers), got {length_penalty!r}")
        if num_return_sequences > num_beams:
            raise ValueError(f"num_return_sequences={num_return_sequences} is more than num_beams={num_beams}: "
                             "beam search returns at most num_beams sequences per prompt")
    elif num_return_sequences > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True or num_beams >= num_return_sequences "
                         "(greedy decoding would repeat one sequence)")


def _top_p(logits: Tensor, top_p: float, min_keep: int = 1) -> Tensor:
    """logits (B, vocab) with -inf where the more probable tokens before a token already hold >= top_p (the
    min_keep most probable are always kept)."""
    probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
    drop = (probs.cumsum(-1) - probs) >= top_p  # never the first: 0 < top_p
    drop[:, :min_keep] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _warp(scores: Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
          min_keep: int = 1) -> Tensor:
    """Rule 3's sampling filters on scores (B, vocab): temperature, top-k, top-p, each keeping at least min_keep
    tokens (beam sampling keeps one more than there are eos ids, as transformers)."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k is not None and top_k > 0:
        k = min(max(top_k, min_keep), scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        scores = _top_p(scores, top_p, min_keep)
    return scores


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
                top_p: Optional[float], generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """logits (B, vocab) float32 of the last position, tokens (B, T) so far, `new` of them generated ->
    ((B,) ids, (B, vocab) the scores they were chosen from)."""
    logits = _penalise(logits, tokens, new=new, min_new_tokens=min_new_tokens, eos=eos,
                       repetition_penalty=repetition_penalty)
    if not do_sample:
        return logits.argmax(-1), logits
    logits = _warp(logits, temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1), logits


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
        """(N, vocab) logits of the next token of every row, float32 (as transformers chooses from)."""
        if self.use_cache:
            out = self.model(self.step_ids, attention_mask=self.mask, token_type_ids=self.step_types,
                             past_key_values=self.past, use_cache=True, return_dict=True, **self.kwargs)
            self.past = out.past_key_values
        else:  # (return_dict whatever config.return_dict says, as transformers' generate)
            out = self.model(self.tokens, attention_mask=self.mask, token_type_ids=self.types, use_cache=False,
                             return_dict=True, **self.kwargs)
        return out.logits[:, -1].to(torch.float32)

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


def _prompt_mask(ids: Tensor, pad_token_id: Optional[int], eos: Optional[Tensor]) -> Tensor:
    """The attention mask of a prompt given without one, by transformers' rule: the positions holding the pad id
    are padding when there are any and the pad id is no eos id; otherwise every position is a token."""
    if pad_token_id is None or not bool((ids == pad_token_id).any()):
        return torch.ones_like(ids)
    if eos is not None and bool((eos == pad_token_id).any()):
        return torch.ones_like(ids)
    return (ids != pad_token_id).to(ids.dtype)


def _repeat_rows(n: int, ids: Tensor, mask: Tensor, model_kwargs: dict):
    """Each prompt (and its model inputs) n times, next to itself."""
    return (ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0),
            {k: v.repeat_interleave(n, 0) for k, v in model_kwargs.items()})


def _keep(record: dict, scores: Tensor, logits: Tensor) -> None:
    """Add one step's scores and raw logits to what return_dict_in_generate returns, where asked for."""
    if record["scores"] is not None:
        record["scores"].append(scores.clone())
    if record["logits"] is not None:
        record["logits"].append(logits.clone())


class GenerationMixin:
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                 max_new_tokens: Optional[int] = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = 50, eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                 pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 use_cache: bool = True, *, max_length: Optional[int] = None, min_new_tokens: int = 0,
                 top_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
                 num_return_sequences: int = 1, num_beams: int = 1, length_penalty: float = 1.0,
                 early_stopping: Union[bool, str] = False, return_dict_in_generate: bool = False,
                 output_scores: bool = False, output_logits: bool = False, **model_kwargs):
        """input_ids (B, L) prompt (left-pad it, with attention_mask (B, L), for prompts of unequal length; without
        attention_mask, the positions holding pad_token_id are padding unless it is an eos id, as transformers)
        -> (B * num_return_sequences, L + n) tokens, each prompt's sequences next to each other, with
        n <= max_new_tokens (default 20; or max_length - L) new tokens. The next token is chosen as the module
        docstring says (repetition_penalty, min_new_tokens, temperature, top_k (default 50, as transformers'
        GenerationConfig; None: no top-k), top_p). A sequence that emits `eos_token_id` (an id or a list of
        ids) is filled with `pad_token_id` afterwards; generation stops early when every sequence has finished,
        and never stops at eos when no eos_token_id is given.
        num_beams > 1: beam search (`beam_search.py`; length_penalty, early_stopping True / False / "never" as
        transformers; with do_sample, beam sampling), returning each prompt's num_return_sequences best
        hypotheses.
        return_dict_in_generate: a GenerateDecoderOnlyOutput (GenerateBeamDecoderOnlyOutput with beams) holding
        the sequences and, with output_scores / output_logits, each step's scores / raw logits, as transformers.
        `model_kwargs`: encoder_hidden_states (B, S, D) and encoder_attention_mask (B, S) go to every forward
        call; token_type_ids (B, L) give the prompt's types, and each new token takes its row's last type."""
        if not self.config.is_decoder:
            raise ValueError("generate needs a decoder: build the model with is_decoder=True, bidirectional=False")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"generate: input_ids must be a (B, L) tensor of token ids, got "
                             f"{tuple(getattr(input_ids, 'shape', ())) or type(input_ids).__name__}; for one "
                             "prompt pass ids[None]")
        model_kwargs = _model_kwargs(model_kwargs)
        _check_settings(do_sample, temperature, top_k, top_p, repetition_penalty, num_return_sequences, num_beams,
                        min_new_tokens, early_stopping, length_penalty)
        steps = _new_token_count(max_new_tokens, max_length, input_ids.shape[1])
        if eos_token_id is not None and pad_token_id is None and self.config.pad_token_id is None:
            raise ValueError("eos_token_id needs a pad_token_id to fill finished sequences with; pass pad_token_id")
        pad_token_id = self.config.pad_token_id if pad_token_id is None else pad_token_id
        eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=input_ids.device).reshape(-1)
        mask = _prompt_mask(input_ids, pad_token_id, eos) if attention_mask is None else attention_mask.to(
            input_ids.dtype)
        record = dict(scores=[] if output_scores else None, logits=[] if output_logits else None)
        if input_ids.shape[0] == 0:  # no sequence to extend (and a cache of no rows could not hold its position)
            tokens = input_ids.new_zeros(0, input_ids.shape[1] + steps)
        elif num_beams > 1:
            warp = None
            if do_sample:  # keeping one more token than there are eos ids, as transformers' beam sampling
                warp = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                            min_keep=2 if eos is None else len(eos) + 1)
            tokens = self._beam_search(input_ids, mask, model_kwargs, use_cache, steps, record, num_beams=num_beams,
                                       num_return_sequences=num_return_sequences, eos=eos, pad_token_id=pad_token_id,
                                       length_penalty=length_penalty, early_stopping=early_stopping,
                                       generator=generator if do_sample else None, warp=warp,
                                       rules=dict(min_new_tokens=min_new_tokens, eos=eos,
                                                  repetition_penalty=repetition_penalty))
        else:
            tokens = self._sample(input_ids, mask, model_kwargs, use_cache, steps, record,
                                  num_return_sequences=num_return_sequences, eos=eos, pad_token_id=pad_token_id,
                                  choose=dict(min_new_tokens=min_new_tokens, eos=eos,
                                              repetition_penalty=repetition_penalty, do_sample=do_sample,
                                              temperature=temperature, top_k=top_k, top_p=top_p,
                                              generator=generator))
        if not return_dict_in_generate:
            return tokens
        kind = GenerateBeamDecoderOnlyOutput if num_beams > 1 else GenerateDecoderOnlyOutput
        found = {k: (None if v is None else tuple(v)) for k, v in record.items() if k != "sequences_scores"}
        if num_beams > 1:
            found["sequences_scores"] = record.get("sequences_scores") if output_scores else None
        return kind(sequences=tokens, **found)

    def _sample(self, input_ids, mask, model_kwargs, use_cache, steps, record, *, num_return_sequences, eos,
                pad_token_id, choose) -> Tensor:
        """Greedy decoding or sampling: one token per row and step, pad_token_id after a row's eos."""
        if num_return_sequences > 1:
            input_ids, mask, model_kwargs = _repeat_rows(num_return_sequences, input_ids, mask, model_kwargs)
        run = Stepper(self, input_ids, mask, model_kwargs, use_cache)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for new in range(steps):
            logits = run.last_logits()
            nxt, scores = _next_token(logits, run.tokens, new=new, **choose)
            _keep(record, scores, logits)
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            run.append(nxt)
            if eos is not None:
                finished |= torch.isin(nxt, eos)
                if bool(finished.all()):
                    break
        return run.tokens

    def _beam_search(self, input_ids, mask, model_kwargs, use_cache, steps, record, *, num_beams,
                     num_return_sequences, rules, warp, **settings) -> Tensor:
        """Beam search (beam sampling with `warp`, the sampling filters' settings)."""
        if steps == 0:
            return input_ids.repeat_interleave(num_return_sequences, 0)
        input_ids, mask, model_kwargs = _repeat_rows(num_beams, input_ids, mask, model_kwargs)

        def score(scores, tokens, new):
            scores = _penalise(scores, tokens, new=new, **rules)
            return scores if warp is None else _warp(scores, **warp)

        run = Stepper(self, input_ids, mask, model_kwargs, use_cache)
        tokens, record["sequences_scores"] = beam_search(
            run, score, lambda scores, logits: _keep(record, scores, logits), num_beams=num_beams, steps=steps,
            num_return_sequences=num_return_sequences, sample=warp is not None, **settings)
        return tokens

    @staticmethod
    def reorder_cache(past_key_values, beam_idx: Tensor):
        """Select batch rows of a cache (e.g. for beam search): every cache entry is batch-first."""
        return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past_key_values)
