"""Reference chunked single-head attention with a Toeplitz bias (MEGA spec sections 3, 5.7-5.9).

Queries q (B, Lq, Z) sit at the end of the keys k (B, Lk, Z): query i is at position P_i = Lk - Lq + i.
With chunk_size C the positions are cut into blocks [0, C), [C, 2C), ... and a query sees only keys of its
own block (block-diagonal attention); without chunking there is one block of Lk. Within a block, with
i, j the positions of query and key:

    bias[i, j] = rel_bias[W - 1 + j - i]            rel_bias (2W - 1,), W >= the block length
    softmax:  s = (q . k) * Z^-0.5 + bias;  causal (j > i) and padded keys -> -inf, except that in a block
              whose keys are all padding the padding is ignored (transformers' rule); rows with no visible
              key give zeros (transformers gives NaN there, spec 9.5).
    laplace / relu2:  s = (q . k) / n + bias, n = i + 1 (position in the block) when causal, else the number
              of non-padded keys in the block (at least 1); p = act(s) * keep, keep = key not padded and
              (not causal or j <= i). No normalisation.
    out = p @ v   (B, Lq, E)

laplace(x) = 0.5 * (1 + erf((x - mu) / (sigma sqrt 2))), mu = sqrt(1/2), sigma = sqrt(1/(4 pi));
relu2(x) = relu(x)^2. Scores and probabilities are computed in float32 (float64 for float64 inputs).
`attention` gives the output, `attention_weights` the (B, Lq, Lk) matrix for output_attentions, and
`attention_and_weights` both from one pass, with training's attention dropout where asked.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

ACTIVATIONS = ("softmax", "laplace", "relu2")
LAPLACE_MU = math.sqrt(0.5)
LAPLACE_SIGMA = math.sqrt(0.25 / math.pi)


def laplace(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf((x - LAPLACE_MU) / (LAPLACE_SIGMA * math.sqrt(2.0))))


def relu2(x: Tensor) -> Tensor:
    return torch.relu(x).square()


def _blocks(lk: int, chunk_size: Optional[int]) -> int:
    """Block length S: the chunk size when it cuts the keys, else the whole key length."""
    return chunk_size if chunk_size and chunk_size < lk else lk


def _to_blocks(t: Tensor, size: int, offset: int, total: int) -> Tensor:
    """Place t (B, T, X) at positions [offset, offset + T) of a zero buffer of `total` positions, cut in blocks."""
    bsz, length, width = t.shape
    if offset or total != length:
        t = F.pad(t, (0, 0, offset, total - offset - length))
    return t.reshape(bsz * (total // size), size, width)


def _scores(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask):
    """Blocked probabilities: returns (p (G, S, S), v blocks (G, S, E), shapes) with G = B * blocks."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    bsz, lq, zdim = q.shape
    lk = k.shape[1]
    size = max(1, _blocks(lk, chunk_size))  # (no key: zero blocks of one position)
    nblocks = -(-lk // size)
    total = nblocks * size
    width = (rel_bias.shape[0] + 1) // 2
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device

    if activation == "softmax":
        q = q * zdim ** -0.5
    qb = _to_blocks(q, size, lk - lq, total)
    kb = _to_blocks(k, size, 0, total)
    vb = _to_blocks(v, size, 0, total)
    pos = torch.arange(size, device=dev)
    if width < size:
        raise ValueError(f"attention: rel_bias covers blocks of {width} positions but the block length is {size}")
    # Toeplitz (S, S): bias[i, j] = rel_bias[width - 1 + j - i]. The windows of the middle 2S - 1 taps hold it
    # upside down; an unfold view and a flip back it (its backward costs 2.5 ms at S = 1024, a gather's 6.6).
    bias = rel_bias.to(cd)[width - size: width + size - 1].unfold(0, size, 1).flip(0)
    fuse_bias = activation == "softmax" and qb.dtype == cd
    if fuse_bias:  # one pass: s = bias + q k^T
        s = torch.baddbmm(bias, qb, kb.transpose(1, 2))
    else:
        s = torch.matmul(qb, kb.transpose(1, 2)).to(cd)

    # keep: (G, S) key present and not padding; None when every key is kept
    keep = None
    if key_padding_mask is not None or total != lk:
        exists = (torch.arange(total, device=dev) < lk).expand(bsz, total)
        keep = exists if key_padding_mask is None else exists & F.pad(key_padding_mask.to(torch.bool),
                                                                         (0, total - lk))
        keep, exists = keep.reshape(-1, size), exists.reshape(-1, size)
    causal_mask = torch.ones(size, size, dtype=torch.bool, device=dev).tril() if causal else None

    if activation == "softmax":
        if not fuse_bias:
            s = s + bias
        if keep is None and causal_mask is None:
            return torch.softmax(s, dim=-1), vb, (bsz, lq, lk, size, nblocks, total)
        vis = causal_mask[None] if keep is None else exists[:, None, :] & torch.where(
            (keep.any(-1) | ~exists.any(-1))[:, None], keep, exists)[:, None, :]  # all-padding block: no padding
        if causal_mask is not None and keep is not None:
            vis = vis & causal_mask
        row_any = vis.any(-1, keepdim=True)
        vis = vis | ~row_any  # keeps the softmax finite; those rows are zeroed below (spec 9.5)
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1) * row_any
    else:
        if causal:
            n = (pos + 1).to(cd)[None, :, None]
        elif keep is not None:
            n = keep.sum(-1).clamp(min=1).to(cd)[:, None, None]
        else:
            n = float(size)
        s = s / n + bias
        p = laplace(s) if activation == "laplace" else relu2(s)
        if keep is not None:
            p = p * keep[:, None, :]
        if causal_mask is not None:
            p = p * causal_mask
    return p, vb, (bsz, lq, lk, size, nblocks, total)


def _spread(p: Tensor, bsz: int, lq: int, lk: int, size: int, nblocks: int, total: int) -> Tensor:
    """Blocked probabilities (B * blocks, S, S) -> the dense (B, Lq, Lk) matrix, zero outside the blocks."""
    dense = p.new_zeros(bsz, nblocks, size, nblocks, size)
    idx = torch.arange(nblocks, device=p.device)
    dense[:, idx, :, idx, :] = p.reshape(bsz, nblocks, size, size).transpose(0, 1)
    return dense.reshape(bsz, total, total)[:, lk - lq: lk, :lk]


def attention_and_weights(q: Tensor, k: Tensor, v: Tensor, rel_bias: Tensor, *, activation: str = "softmax",
                          chunk_size: Optional[int] = None, causal: bool = False,
                          key_padding_mask: Optional[Tensor] = None,
                          dropout: Optional[Callable[[Tensor], Tensor]] = None,
                          need_weights: bool = True, blocked: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """One materialized pass: (out (B, Lq, E) in v's dtype, the attention weights or None).

    dropout (training's attention dropout) is applied to the blocked probabilities (B * blocks, S, S) before
    their product with v, so memory stays O(L S) however long L; the weights returned are those before it, in
    v's dtype (output_attentions): the matrix (B, Lq, Lk), zero outside each query's block, or with `blocked`
    and Lq = Lk only its diagonal blocks (B, blocks, S, S) (transformers' layout, also O(L S)), the last block
    padded with zeros beyond Lk.
    """
    p, vb, (bsz, lq, lk, size, nblocks, total) = _scores(q, k, v, rel_bias, activation, chunk_size, causal,
                                                          key_padding_mask)
    pv = p.to(v.dtype)
    out = torch.matmul(pv if dropout is None else dropout(pv), vb).reshape(bsz, total, vb.shape[-1])
    weights = None
    if need_weights and blocked and lq == lk > 0:
        # rows are query positions; those past Lk (the zero queries of the padding) get zero weights
        rows = pv.reshape(bsz, total, size)
        weights = F.pad(rows[:, :lk], (0, 0, 0, total - lk)).view(bsz, nblocks, size, size)
    elif need_weights:
        weights = _spread(pv, bsz, lq, lk, size, nblocks, total)
    return out[:, lk - lq: lk], weights


def attention(q: Tensor, k: Tensor, v: Tensor, rel_bias: Tensor, *, activation: str = "softmax",
              chunk_size: Optional[int] = None, causal: bool = False,
              key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Materialized chunked attention: q (B, Lq, Z), k (B, Lk, Z), v (B, Lk, E) -> (B, Lq, E) in v's dtype."""
    return attention_and_weights(q, k, v, rel_bias, activation=activation, chunk_size=chunk_size, causal=causal,
                                 key_padding_mask=key_padding_mask, need_weights=False)[0]


def attention_weights(q: Tensor, k: Tensor, v: Tensor, rel_bias: Tensor, *, activation: str = "softmax",
                      chunk_size: Optional[int] = None, causal: bool = False,
                      key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """The attention matrix (B, Lq, Lk) in the scores' dtype (float32, float64 for float64 inputs), zero
    outside each query's block (for output_attentions)."""
    p, _, shapes = _scores(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask)
    return _spread(p, *shapes)
