"""Gated cross-attention (`cross_attn`, MEGA_SPEC.md section 6), batch-first.

    qn = norm(query) if normalize_before_mega else query
    u | r | q = q_proj(qn)                    D (sigmoid) | D (silu) | Z
    k = k_proj(src) (Z);  v = act(v_proj(src)) (D)
    bias[i, j] = rel_pos(max(T, S))[p + i, j]  (p = position of the first query: 0, or the cached length)
    softmax: s = q k^T Z^-0.5 + bias, padded keys -> -inf (a row with no key gives zeros, not NaN)
    laplace / relu2: s = q k^T / n + bias, n = number of non-padded keys (at least 1); act(s) * key mask
    out = query + u * (dropout(act(h_proj((attn @ v) * r))) - query);  norm(out) if not normalize_before_mega

Where the attention runs:
- When the module's backend (config.kernel_backend, the "attention" entry) resolves to a kernel backend
  (triton), through `ops.attention`: target queries attend to all S source keys (no causality, no chunking),
  so each group of at most S queries is one op call with Lq = rows <= Lk = S, and the op's Toeplitz vector is
  the module's bias vector shifted so that the op's query positions (S - rows + r) land on the true ones
  (p + g0 + r); see `_attend_op`. `auto` resolves as the op itself does (the kernel only for blocks longer
  than TRITON_ATTENTION_MIN_BLOCK).
- Otherwise (the reference), and always for output_attentions=True or attention dropout in training, the
  materialized weights `_weights` (B, T, S): the same maths, and cheaper than the op's reference, which pads
  the queries to an (S, S) block.

Cache: (cross_key (B, S, Z), cross_value (B, S, D)), computed once from the encoder states.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.attention import resolve as resolve_attention
from ..reference.attention import laplace, relu2
from .common import init_gated_attention
from .embeddings import make_relative_bias

Tensor = torch.Tensor


class MegaGatedCrossAttention(nn.Module):
    """Parameters: norm, k_proj (D->Z), v_proj (D->D), q_proj (D->2D+Z), h_proj (D->D), rel_pos_bias."""

    def __init__(self, config):
        super().__init__()
        d, z = config.hidden_size, config.shared_representation_size
        self.dims = (d, z)
        init_gated_attention(self, config)
        self.k_proj = nn.Linear(d, z)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, 2 * d + z)
        self.h_proj = nn.Linear(d, d)
        self.rel_pos_bias = make_relative_bias(config)

    def _weights(self, q: Tensor, k: Tensor, key_mask: Optional[Tensor], offset: int) -> Tensor:
        """Attention weights (B, T, S) in float32 (float64 for float64 inputs)."""
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        bias = self.rel_pos_bias.matrix(q.shape[1], k.shape[1], offset).to(cd)
        s = torch.matmul(q, k.transpose(1, 2)).to(cd)
        if self.attention_activation == "softmax":
            s = s * self.dims[1] ** -0.5 + bias
            if key_mask is None:
                return torch.softmax(s, dim=-1)
            s = s.masked_fill(~key_mask[:, None, :], float("-inf"))
            any_key = key_mask.any(-1)[:, None, None]
            return torch.softmax(s.masked_fill(~any_key, 0.0), dim=-1) * any_key
        n = k.shape[1] if key_mask is None else key_mask.sum(-1).clamp(min=1).to(cd)[:, None, None]
        p = (laplace if self.attention_activation == "laplace" else relu2)(s / n + bias)
        return p if key_mask is None else p * key_mask[:, None, :]

    def _op_backend(self, q: Tensor, src_len: int) -> Optional[str]:
        """The kernel backend `ops.attention` would run for this call, or None when it would run the reference
        (then `_weights` does the same maths): the module's request resolved for q's device and dtype, with
        the op's `auto` rules (`ops.attention.resolve`: short blocks, large Z)."""
        name = resolve_attention(self.backend, q, src_len)
        return None if name == "reference" else name

    def _shifted_bias(self, vec: Tensor, width: int, src_len: int, rows: int, first: int) -> Tensor:
        """The op's (2S - 1,) bias for `rows` queries at absolute positions first.. against S keys.

        The op puts query r at position P = S - rows + r and reads rel'[S - 1 + j - P] = rel'[rows - 1 + j - r];
        cross-attention needs vec[W - 1 + j - (first + r)], so rel'[m] = vec[m + shift], shift = W - rows -
        first. Real pairs read m in [0, rows + S - 2], i.e. vec indices [W - first - rows, W + S - 2 - first],
        inside [0, 2W - 2] because first + rows <= offset + T <= W and S <= W. Entries whose source falls
        outside vec only meet the op's padding query rows: they are zeros (pad + slice keeps the gradient)."""
        shift = width - rows - first
        n = 2 * src_len - 1
        left, right = max(0, -shift), max(0, shift + n - vec.shape[0])
        if left or right:
            vec = F.pad(vec, (left, right))
        return vec[shift + left: shift + left + n]

    def _attend_op(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], offset: int,
                   backend: str) -> Tensor:
        """(attn @ v) (B, T, D) through `ops.attention` on `backend`: groups of at most S queries, each with
        its shifted bias vector; a batch row with no valid key gives zeros (the op would ignore the padding)."""
        tgt, src = q.shape[1], k.shape[1]
        width = max(tgt + offset, src)
        vec = self.rel_pos_bias.vector(width)
        outs = []
        for g0 in range(0, tgt, src):
            rows = min(src, tgt - g0)
            bias = self._shifted_bias(vec, width, src, rows, offset + g0)
            # contiguous: q is a strided view of q_proj's output, and the Triton backward writes dq with q's
            # strides into a contiguous buffer (mega_kernels/triton/attention_bwd.py)
            outs.append(ops.attention(q[:, g0: g0 + rows].contiguous(), k, v, bias,
                                      activation=self.attention_activation, chunk_size=None, causal=False,
                                      key_padding_mask=key_mask, backend=backend))
        h = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if key_mask is not None and self.attention_activation == "softmax":
            h = h * key_mask.any(-1)[:, None, None].to(h.dtype)
        return h

    def forward(self, query: Tensor, encoder_states: Optional[Tensor], key_mask: Optional[Tensor] = None,
                cache: Optional[Tuple[Tensor, Tensor]] = None, offset: int = 0, output_attentions: bool = False,
                use_cache: bool = False):
        """query (B, T, D); encoder_states (B, S, D) (unused when `cache` is given); key_mask (B, S) bool.

        Returns (out (B, T, D), weights (B, T, S) or None, (cross_key, cross_value) or None)."""
        d, z = self.dims
        qn = self.norm(query) if self.prenorm else query
        u, r, q = torch.split(self.q_proj(qn), [d, d, z], dim=-1)
        u, r = torch.sigmoid(u), F.silu(r)
        if cache is not None:
            key, value = cache
        else:
            if encoder_states is None:
                raise ValueError("cross-attention needs encoder_hidden_states (or a cache holding them)")
            key, value = self.k_proj(encoder_states), self.activation(self.v_proj(encoder_states))
        if key_mask is not None and tuple(key_mask.shape) != tuple(key.shape[:2]):
            raise ValueError(f"encoder_attention_mask must be (B, S) = {tuple(key.shape[:2])}, "
                             f"got {tuple(key_mask.shape)}")
        cached = (key, value) if use_cache else None  # before dropout: a later step applies its own
        value = self.hidden_dropout(value)
        weights = None
        drop = self.training and self.attention_dropout.p > 0
        backend = None if output_attentions or drop else self._op_backend(q, key.shape[1])
        if backend is None:
            weights = self._weights(q, key, key_mask, offset).to(value.dtype)
            h = torch.matmul(self.attention_dropout(weights), value)
        else:
            h = self._attend_op(q, key, value, key_mask, offset, backend)
        out = self.dropout(self.activation(self.h_proj(h * r)))
        out = torch.addcmul(query, u, out - query)
        if not self.prenorm:
            out = self.norm(out)
        return out, (weights if output_attentions else None), cached
