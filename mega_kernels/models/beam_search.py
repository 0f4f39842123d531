"""Beam search for `generate(num_beams=K)`, with the scoring and stopping rules of transformers' beam search, so
that the same settings give the same sequences.

Each prompt keeps K running hypotheses with their summed log-probabilities (float32; at the start only the first
beam is live, the others at -1e9). A step scores every (beam, token) continuation by log_softmax(logits) after
rules 1 and 2 of generation.py (repetition penalty, min_new_tokens), plus the beam's sum, and keeps the best
M = max(2, 1 + number of eos ids) * K of the K * vocab (beam sampling: draws M of them, the sampling filters
keeping at least 1 + number of eos ids tokens, or 2). A continuation "hits" when its token is an eos id or the
length limit is reached.
- The K best continuations that do not hit (a hit costs -1e9) run on.
- Among the first K of the M, those that hit are offered to the finished set with the score
  sum / new_length ** length_penalty; the set keeps the K best of the old and the offered (an offer costs
  -1e9 once the set is full under early_stopping=True, or once the prompt is closed).
- A prompt closes when every slot of its finished set is taken and the best running sum, divided by
  new_length ** length_penalty (by max_new_tokens ** length_penalty with early_stopping="never" and a
  positive length_penalty), cannot beat the worst finished score.
The search ends when every prompt is closed, or (early_stopping=True) every finished set is full, or every
kept continuation hits. It returns each prompt's num_return_sequences best finished hypotheses, padded with
pad_token_id (eos_token_id[0] when the pad id is 0 or None) to the longest of them.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Tensor = torch.Tensor
NEG = -1.0e9  # the score of what cannot be chosen


def _pick(t: Tensor, idx: Tensor) -> Tensor:
    """t (B, M, ...) -> (B, K, ...): entries idx (B, K) along dim 1."""
    return t.gather(1, idx.view(idx.shape + (1,) * (t.dim() - 2)).expand(idx.shape + t.shape[2:]))


def beam_search(run, penalise, keep, *, num_beams: int, steps: int, num_return_sequences: int,
                eos: Optional[Tensor], pad_token_id: Optional[int], length_penalty: float,
                early_stopping: Union[bool, str], sample: bool = False,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """run: a generation.Stepper over the B * K rows (each prompt repeated K times, next to each other);
    penalise(scores, tokens, new): the rules (with sampling, its filters too); keep(scores, logits): called with
    each step's (B * K, vocab) log-probabilities after the rules and raw logits. sample: the M continuations are
    drawn without replacement from softmax of their summed scores (in the order drawn) instead of the M best.
    -> ((B * num_return_sequences, prompt + n) tokens, (B * num_return_sequences,) their scores)."""
    rows, prompt = run.tokens.shape
    k, bsz = num_beams, rows // num_beams
    device = run.tokens.device
    m = max(2, 1 + (0 if eos is None else len(eos))) * k
    fill = -1 if eos is None else (pad_token_id if pad_token_id else int(eos[0]))
    top_k_slots = torch.arange(m, device=device) < k
    running = torch.zeros(bsz, k, dtype=torch.float32, device=device)
    running[:, 1:] = NEG
    done_seqs = torch.full((bsz, k, prompt + steps), fill, dtype=run.tokens.dtype, device=device)
    done_scores = torch.full((bsz, k), NEG, dtype=torch.float32, device=device)
    done_len = torch.zeros(bsz, k, dtype=torch.long, device=device)
    done = torch.zeros(bsz, k, dtype=torch.bool, device=device)
    open_ = torch.ones(bsz, 1, dtype=torch.bool, device=device)
    for new in range(steps):
        logits = run.last_logits()
        logp = penalise(torch.log_softmax(logits, dim=-1), run.tokens, new)
        keep(logp, logits)
        vocab = logp.shape[-1]
        total = (logp.view(bsz, k, vocab) + running[:, :, None]).view(bsz, k * vocab)
        if sample:
            flat = torch.multinomial(torch.softmax(total, dim=-1), m, generator=generator)
            cand = total.gather(1, flat)
        else:
            cand, flat = torch.topk(total, m, dim=1)
        beam, token = flat // vocab, flat % vocab
        hits = torch.full_like(token, new == steps - 1, dtype=torch.bool)
        if eos is not None:
            hits |= torch.isin(token, eos)
        seqs = torch.full((bsz, m, prompt + steps), fill, dtype=run.tokens.dtype, device=device)
        seqs[:, :, :prompt + new] = _pick(run.tokens.view(bsz, k, -1), beam)
        seqs[:, :, prompt + new] = token
        # the finished sets
        offer = cand / ((new + 1) ** length_penalty)
        offer += (done.all(dim=1, keepdim=True) & (early_stopping is True)).to(torch.float32) * NEG
        offer += (~open_).to(torch.float32) * NEG
        just = hits & top_k_slots[None, :]
        offer += (~just) * NEG
        best = torch.topk(torch.cat([done_scores, offer], 1), k, dim=1)[1]
        done_seqs = _pick(torch.cat([done_seqs, seqs], 1), best)
        done_scores = _pick(torch.cat([done_scores, offer], 1), best)
        done_len = _pick(torch.cat([done_len, torch.full_like(token, new + 1)], 1), best)
        done = _pick(torch.cat([done, just], 1), best)
        # the running beams
        live = cand + hits.to(torch.float32) * NEG
        chosen = torch.topk(live, k, dim=1)[1]
        running = _pick(live, chosen)
        origin = _pick(beam, chosen) + torch.arange(bsz, device=device)[:, None] * k
        run.append(_pick(token, chosen).view(-1), origin.view(-1))
        # closing
        reach = (steps if early_stopping == "never" and length_penalty > 0.0 else new + 1) ** length_penalty
        worst = torch.where(done, done_scores.min(dim=1, keepdim=True)[0], NEG)
        open_ = open_ & (running[:, :1] / reach > worst).any(dim=-1, keepdim=True)
        if not (open_.any() and not (done.all() and early_stopping is True) and not hits.all()):
            break
    r = num_return_sequences
    out = done_seqs[:, :r].reshape(bsz * r, -1)
    return out[:, :prompt + int(done_len[:, :r].max())], done_scores[:, :r].reshape(-1)
