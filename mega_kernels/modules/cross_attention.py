"""Gated cross-attention (`cross_attn`, MEGA_SPEC.md section 6), batch-first, in plain PyTorch.

Target queries attend to all source keys (no causality, no chunking), so the Toeplitz-square attention op
does not apply; the maths is small and lives here:

    qn = norm(query) if normalize_before_mega else query
    u | r | q = q_proj(qn)                    D (sigmoid) | D (silu) | Z
    k = k_proj(src) (Z);  v = act(v_proj(src)) (D)
    bias[i, j] = rel_pos(max(T, S))[p + i, j]  (p = position of the first query: 0, or the cached length)
    softmax: s = q k^T Z^-0.5 + bias, padded keys -> -inf (a row with no key gives zeros, not NaN)
    laplace / relu2: s = q k^T / n + bias, n = number of non-padded keys (at least 1); act(s) * key mask
    out = query + u * (dropout(act(h_proj((attn @ v) * r))) - query);  norm(out) if not normalize_before_mega

Cache: (cross_key (B, S, Z), cross_value (B, S, D)), computed once from the encoder states.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.attention import laplace, relu2
from .common import MegaDropout, MegaSequenceNorm, get_activation
from .embeddings import make_relative_bias

Tensor = torch.Tensor


class MegaGatedCrossAttention(nn.Module):
    """Parameters: norm, k_proj (D->Z), v_proj (D->D), q_proj (D->2D+Z), h_proj (D->D), rel_pos_bias."""

    def __init__(self, config):
        super().__init__()
        d, z = config.hidden_size, config.shared_representation_size
        self.dims = (d, z)
        self.activation = get_activation(config.activation)
        self.attention_activation = config.attention_activation
        self.prenorm = config.normalize_before_mega
        self.dropout = MegaDropout(config.dropout_prob, config.use_feature_dropout)
        self.hidden_dropout = MegaDropout(config.hidden_dropout_prob, config.use_feature_dropout)
        self.attention_dropout = MegaDropout(config.attention_probs_dropout_prob, False)
        self.norm = MegaSequenceNorm(config.normalization_type, d, affine=config.norm_affine)
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
        weights = self._weights(q, key, key_mask, offset).to(value.dtype)
        h = torch.matmul(self.attention_dropout(weights), self.hidden_dropout(value))
        out = self.dropout(self.activation(self.h_proj(h * r)))
        out = torch.addcmul(query, u, out - query)
        if not self.prenorm:
            out = self.norm(out)
        return out, (weights if output_attentions else None), ((key, value) if use_cache else None)
