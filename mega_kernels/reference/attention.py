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
`attention_and_weights` both from one pass, with training's attention dropout where asked. Only the blocks that
hold queries are computed, and when the queries all sit in one block (a cached decoding step) only their rows:
a step against L cached keys costs O(L), not O(L^2).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

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


def _toeplitz(rel_bias: Tensor, width: int, r0: int, r1: int, cols: int) -> Tensor:
    """Rows r0..r1-1, columns 0..cols-1 of the Toeplitz matrix bias[i, j] = rel_bias[width - 1 + j - i].

    The windows of the taps they use hold those rows in reverse order: an unfold view and one flip (a copy of
    the (r1 - r0, cols) result only) give them (at S = 1024 its backward costs 2.5 ms, a gather's 6.6 ms)."""
    return rel_bias[width - r1: width - 1 - r0 + cols].unfold(0, cols, 1).flip(0)


class _Layout(NamedTuple):
    """Where the probabilities of `_scores` sit. Keys before `start` (a block boundary) are in no query's block
    and were left out. tail: every query is in one block, and p is (B, Lq, Lk - start), the query rows only (a
    decoding step costs O(L), not O(L^2)); else p is (B * blocks, S, S), the blocks of positions [start, Lk)
    with the queries at the end."""
    bsz: int
    lq: int
    lk: int
    size: int
    nblocks: int
    start: int
    tail: bool


def _scores(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask):
    """Probabilities and the values they weigh: (p, v (B * blocks, S, E) or (B, Lk - start, E), _Layout)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    bsz, lq, zdim = q.shape
    lk = k.shape[1]
    size = max(1, _blocks(lk, chunk_size))  # (no key: zero blocks of one position)
    width = (rel_bias.shape[0] + 1) // 2
    if width < size:
        raise ValueError(f"attention: rel_bias covers blocks of {width} positions but the block length is {size}")
    start = (lk - lq) // size * size if lq else 0  # the first block holding a query
    if start:
        k, v = k[:, start:], v[:, start:]
        key_padding_mask = None if key_padding_mask is None else key_padding_mask[:, start:]
    keys = lk - start
    nblocks = -(-keys // size)
    tail = nblocks == 1
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device

    if activation == "softmax":
        q = q * zdim ** -0.5
    if tail:  # the query rows of the one block: positions keys - lq .. keys - 1 of it, all keys present
        rows = torch.arange(keys - lq, keys, device=dev)
        qb, kb, vb, total = q, k, v, keys
        bias = _toeplitz(rel_bias.to(cd), width, keys - lq, keys, keys)
    else:
        total = nblocks * size
        rows = torch.arange(size, device=dev)
        qb = _to_blocks(q, size, keys - lq, total)
        kb = _to_blocks(k, size, 0, total)
        vb = _to_blocks(v, size, 0, total)
        bias = _toeplitz(rel_bias.to(cd), width, 0, size, size)
    cols = torch.arange(bias.shape[1], device=dev)
    fuse_bias = activation == "softmax" and qb.dtype == cd
    if fuse_bias:  # one pass: s = bias + q k^T
        s = torch.baddbmm(bias, qb, kb.transpose(1, 2))
    else:
        s = torch.matmul(qb, kb.transpose(1, 2)).to(cd)

    # keep: (G, keys of a block) key present and not padding; None when every key is kept
    keep = None
    if key_padding_mask is not None or total != keys:
        exists = (torch.arange(total, device=dev) < keys).expand(bsz, total)
        keep = exists if key_padding_mask is None else exists & F.pad(key_padding_mask.to(torch.bool),
                                                                         (0, total - keys))
        keep, exists = keep.reshape(-1, bias.shape[1]), exists.reshape(-1, bias.shape[1])
    causal_mask = cols[None, :] <= rows[:, None] if causal else None

    if activation == "softmax":
        if not fuse_bias:
            s = s + bias
        if keep is None and causal_mask is None:
            return torch.softmax(s, dim=-1), vb, _Layout(bsz, lq, lk, size, nblocks, start, tail)
        vis = causal_mask[None] if keep is None else exists[:, None, :] & torch.where(
            (keep.any(-1) | ~exists.any(-1))[:, None], keep, exists)[:, None, :]  # all-padding block: no padding
        if causal_mask is not None and keep is not None:
            vis = vis & causal_mask
        row_any = vis.any(-1, keepdim=True)
        vis = vis | ~row_any  # keeps the softmax finite; those rows are zeroed below (spec 9.5)
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1) * row_any
    else:
        if causal:
            n = (rows + 1).to(cd)[None, :, None]
        elif keep is not None:
            n = keep.sum(-1).clamp(min=1).to(cd)[:, None, None]
        else:
            n = float(bias.shape[1])
        s = s / n + bias
        p = laplace(s) if activation == "laplace" else relu2(s)
        if keep is not None:
            p = p * keep[:, None, :]
        if causal_mask is not None:
            p = p * causal_mask
    return p, vb, _Layout(bsz, lq, lk, size, nblocks, start, tail)


def _output(pv: Tensor, vb: Tensor, at: _Layout) -> Tensor:
    """(weighted) probabilities times values -> (B, Lq, E)."""
    out = torch.matmul(pv, vb)
    if at.tail:
        return out
    keys = at.lk - at.start
    return out.reshape(at.bsz, at.nblocks * at.size, vb.shape[-1])[:, keys - at.lq: keys]


def _dense(p: Tensor, at: _Layout) -> Tensor:
    """Probabilities -> the dense (B, Lq, Lk) matrix, zero outside each query's block."""
    if at.tail:
        return F.pad(p, (at.start, 0))
    size, nblocks = at.size, at.nblocks
    keys, total = at.lk - at.start, nblocks * size
    dense = p.new_zeros(at.bsz, nblocks, size, nblocks, size)
    idx = torch.arange(nblocks, device=p.device)
    dense[:, idx, :, idx, :] = p.reshape(at.bsz, nblocks, size, size).transpose(0, 1)
    return F.pad(dense.reshape(at.bsz, total, total)[:, keys - at.lq: keys, :keys], (at.start, 0))


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
    p, vb, at = _scores(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask)
    pv = p.to(v.dtype)
    out = _output(pv if dropout is None else dropout(pv), vb, at)
    weights = None
    if need_weights and blocked and at.lq == at.lk > 0:
        # rows are query positions; those past Lk (the zero queries of the padding) get zero weights
        total = at.nblocks * at.size
        rows = pv.reshape(at.bsz, total, at.size)
        weights = F.pad(rows[:, :at.lk], (0, 0, 0, total - at.lk)).view(at.bsz, at.nblocks, at.size, at.size)
    elif need_weights:
        weights = _dense(pv, at)
    return out, weights


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
    p, _, at = _scores(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask)
    return _dense(p, at)
