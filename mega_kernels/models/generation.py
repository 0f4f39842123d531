"""`generate` for MegaForCausalLM: greedy decoding or sampling (temperature, top-k), using the cache.

The prompt goes through one full pass with use_cache=True; each new token is then one cached step
(`past_key_values` + the attention mask extended with ones). Token-by-token cached steps give the same outputs
as the full causal pass (spec 9.4), so `use_cache=False` (recomputing everything each step) returns the same
tokens; it exists for checking.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def _next_token(logits: Tensor, do_sample: bool, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> Tensor:
    """logits (B, vocab) float -> (B,) token ids."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class GenerationMixin:
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True, **model_kwargs) -> Tensor:
        """input_ids (B, L) prompt (left-pad it, with attention_mask (B, L), for prompts of unequal length)
        -> (B, L + n) with n <= max_new_tokens new tokens. A sequence that emits `eos_token_id` is filled with
        `pad_token_id` afterwards; generation stops early when every sequence has finished.
        `model_kwargs` (e.g. encoder_hidden_states) go to every forward call."""
        if not self.config.is_decoder:
            raise ValueError("generate needs a decoder: build the model with is_decoder=True, bidirectional=False")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if eos_token_id is not None and pad_token_id is None and self.config.pad_token_id is None:
            raise ValueError("eos_token_id needs a pad_token_id to fill finished sequences with; pass pad_token_id")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {top_k}")
        pad_token_id = self.config.pad_token_id if pad_token_id is None else pad_token_id
        bsz = input_ids.shape[0]
        if bsz == 0:  # no sequence to extend (and a cache of no rows could not hold its position)
            return input_ids.new_zeros(0, input_ids.shape[1] + max_new_tokens)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
        tokens = input_ids
        finished = torch.zeros(bsz, dtype=torch.bool, device=input_ids.device)
        past, step_ids = None, input_ids
        for _ in range(max_new_tokens):
            if use_cache:
                out = self(step_ids, attention_mask=mask, past_key_values=past, use_cache=True, **model_kwargs)
                past = out.past_key_values
            else:
                out = self(tokens, attention_mask=mask, use_cache=False, **model_kwargs)
            nxt = _next_token(out.logits[:, -1], do_sample, temperature, top_k, generator)
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(bsz, 1)], dim=1)
            step_ids = nxt[:, None]
            if eos_token_id is not None:
                finished |= nxt == eos_token_id
                if bool(finished.all()):
                    break
        return tokens

    @staticmethod
    def reorder_cache(past_key_values, beam_idx: Tensor):
        """Select batch rows of a cache (e.g. for beam search): every cache entry is batch-first."""
        return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past_key_values)
