"""Moving-average gated attention (`mega_layer`, MEGA_SPEC.md section 5), batch-first.

    residual = x;  x = norm(x) if normalize_before_mega
    v  = act(v_proj(x))                                   (B, L, E)
    mx = dropout(EMA(x, mask))                            `ops.ema` through MegaMultiDimensionDampedEma
    u | zr | hx = mx_proj(mx)                             D | Z + E | D
    u = sigmoid(u);  z | r = silu(zr)                     Z | E
    q = z * qk_weight[0] + qk_bias[0];  k = z * qk_weight[1] + qk_bias[1]
    h = attention(q, k, v, Toeplitz bias, chunks, causal, key padding)       `ops.attention`
    out = dropout(act(hx + h_proj(h * r)))
    y = residual + u * (out - residual);  y = norm(y) if not normalize_before_mega

Chunking accepts any length: `ops.attention` cuts the keys in blocks of C and treats the last, shorter block
as padding beyond the sequence end (spec 9.2); outputs keep the input length.

Cache (decoders): (self_key (B, c, Z), self_value (B, c, E), ema cache); with chunking the K/V cache holds only
the keys since the last chunk boundary (it restarts at each boundary), so queries at the end of the cached
keys see exactly their chunk, as in the full causal pass.

A call with attention weights (output_attentions) or attention dropout (training) runs the materialized
reference once for both, `mega_kernels.reference.attention.attention_and_weights` (same maths as the op; the
kernels have no dropout): dropout goes on the per-block probabilities, so memory stays O(L C); otherwise only
the op runs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops import backends
from ..ops.attention import block_length
from ..reference.attention import attention_and_weights
from .common import init_gated_attention
from .ema import MegaMultiDimensionDampedEma
from .embeddings import make_relative_bias

Tensor = torch.Tensor


class MegaMovingAverageGatedAttention(nn.Module):
    """One MEGA attention layer with transformers' parameter names (spec section 8)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        d, z, e = config.hidden_size, config.shared_representation_size, config.intermediate_size
        self.dims = (d, z, e)
        self.chunk_size = config.chunk_size if config.use_chunking else None
        init_gated_attention(self, config)
        self.ema_gate = MegaMultiDimensionDampedEma(config)
        self.v_proj = nn.Linear(d, e)
        self.mx_proj = nn.Linear(d, z + e + 2 * d)
        self.h_proj = nn.Linear(e, d)
        self.qk_weight = nn.Parameter(torch.zeros(2, z))
        self.qk_bias = nn.Parameter(torch.zeros(2, z))
        self.rel_pos_bias = make_relative_bias(config)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, causal: bool = False,
                cache: Optional[Tuple[Tensor, Tensor, Tensor]] = None, output_attentions: bool = False,
                use_cache: bool = False):
        """x (B, L, D); padding_mask (B, c + L) bool, True = token, covering the cached keys too (c = cached
        length). Returns (y (B, L, D), attention weights or None, new cache or None)."""
        d, z, e = self.dims
        bsz, length, _ = x.shape
        residual = x
        if self.prenorm:
            x = self.norm(x)
        value = self.activation(self.v_proj(x))
        ema_mask = None if padding_mask is None else padding_mask[:, -length:]
        mx, ema_cache = self.ema_gate(x, ema_mask, None if cache is None else cache[2], use_cache)
        mx = self.dropout(mx)
        u, zr, hx = torch.split(self.mx_proj(mx), [d, z + e, d], dim=-1)
        u = torch.sigmoid(u)
        qk, gate = torch.split(F.silu(zr), [z, e], dim=-1)
        query = qk * self.qk_weight[0] + self.qk_bias[0]
        key = qk * self.qk_weight[1] + self.qk_bias[1]
        cast = backends.autocast_dtype(qk)
        if cast is not None and key.dtype != torch.float64:
            # Under autocast q and k come out float32 (qk_weight is), and ops.attention casts them to `cast`:
            # cast once here, so the K cache holds that dtype and a decoding step does not recast it whole.
            query, key = query.to(cast), key.to(cast)
        if cache is not None:
            key = torch.cat([cache[0].to(key.dtype), key], dim=1)
            value = torch.cat([cache[1].to(value.dtype), value], dim=1)
        new_cache = None
        if use_cache:
            start = (key.shape[1] // self.chunk_size) * self.chunk_size if self.chunk_size else 0
            new_cache = (key[:, start:], value[:, start:], ema_cache)
        value = self.hidden_dropout(value)
        h, weights = self._attend(query, key, value, padding_mask, causal, output_attentions)
        out = self.dropout(self.activation(hx + self.h_proj(h * gate)))
        y = torch.addcmul(residual, u, out - residual)
        if not self.prenorm:
            y = self.norm(y)
        return y, weights, new_cache

    def _attend(self, query, key, value, padding_mask, causal, output_attentions):
        lk = key.shape[1]
        kpm = None if padding_mask is None else padding_mask[:, -lk:]
        bias = self.rel_pos_bias.vector(block_length(lk, self.chunk_size))
        kwargs = dict(activation=self.attention_activation, chunk_size=self.chunk_size, causal=causal,
                      key_padding_mask=kpm)
        drop = self.training and self.attention_dropout.p > 0
        if not (output_attentions or drop):
            return ops.attention(query, key, value, bias, backend=self.backend, **kwargs), None
        h, weights = attention_and_weights(query, key, value, bias, dropout=self.attention_dropout if drop else None,
                                           need_weights=output_attentions, blocked=True, **kwargs)
        # transformers' layout: (B, blocks, C, C) for a square call (one block of L when not chunking), else
        # (B, 1, Lq, Lk) (cached decoding)
        return h, weights if weights is None or weights.dim() == 4 else weights.unsqueeze(1)
