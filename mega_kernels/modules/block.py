"""Normalized FFN, the MEGA block and the pooler (MEGA_SPEC.md section 6), batch-first.

Block = mega_layer -> cross_attn (decoders with add_cross_attention) -> nffn (use_normalized_ffn).

Per-layer cache of a decoder (a tuple, every entry batch-first so beam search can `index_select` dim 0):
    (self_key (B, c, Z), self_value (B, c, E), ema_cache, position (B,) int64 [, cross_key (B, S, Z),
     cross_value (B, S, D)])
ema_cache is the EMA state (B, D, N) float32 (float64 for a float64 model), or with truncation T the last T - 1
masked EMA inputs (B, T - 1, D); c is the number of keys since the last chunk boundary (all keys without
chunking); position is the number of tokens consumed so far (used by the cross-attention bias and the mask checks).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .attention import MegaMovingAverageGatedAttention
from .common import MegaDropout, MegaSequenceNorm, get_activation
from .cross_attention import MegaGatedCrossAttention

Tensor = torch.Tensor


class MegaNormalizedFeedForwardNetwork(nn.Module):
    """x + dropout(fc2(dropout(act(fc1(norm(x)))))) with pre- or post-norm: (B, L, D) -> (B, L, D)."""

    def __init__(self, config):
        super().__init__()
        self.activation = get_activation(config.activation)
        self.dropout = MegaDropout(config.dropout_prob, config.use_feature_dropout)
        self.hidden_dropout = MegaDropout(config.nffn_activation_dropout_prob, config.use_feature_dropout)
        self.prenorm = config.normalize_before_ffn
        self.norm = MegaSequenceNorm(config.normalization_type, config.hidden_size, affine=config.norm_affine)
        self.fc1 = nn.Linear(config.hidden_size, config.nffn_hidden_size)
        self.fc2 = nn.Linear(config.nffn_hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        if self.prenorm:
            x = self.norm(x)
        out = self.dropout(self.fc2(self.hidden_dropout(self.activation(self.fc1(x))))) + residual
        return out if self.prenorm else self.norm(out)


class MegaBlock(nn.Module):
    """One MEGA layer: gated attention, optional cross-attention, optional NFFN."""

    def __init__(self, config):
        super().__init__()
        self.mega_layer = MegaMovingAverageGatedAttention(config)
        self.nffn = MegaNormalizedFeedForwardNetwork(config) if config.use_normalized_ffn else None
        if config.add_cross_attention:
            if not config.is_decoder:
                raise ValueError("add_cross_attention=True needs is_decoder=True")
            self.cross_attn = MegaGatedCrossAttention(config)
        else:
            self.cross_attn = None

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, causal: bool = False,
                encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None,
                cache: Optional[Tuple[Tensor, ...]] = None, output_attentions: bool = False,
                use_cache: bool = False, past: Optional[int] = None):
        """x (B, L, D); padding_mask (B, past + L) bool. Returns (x, self weights, cross weights, new cache).

        past: the cached length, which the model reads once for all layers (reading it from the cache's
        position entry here would sync a GPU in every layer)."""
        bsz, length, _ = x.shape
        if past is None:
            past = 0 if cache is None else int(cache[3].max()) if cache[3].numel() else 0
        x, self_w, self_cache = self.mega_layer(x, padding_mask, causal, None if cache is None else cache[:3],
                                                output_attentions, use_cache)
        cross_w, cross_cache = None, None
        if self.cross_attn is not None:
            x, cross_w, cross_cache = self.cross_attn(
                x, encoder_hidden_states, encoder_attention_mask, None if cache is None else cache[4:6],
                past, output_attentions, use_cache)
        if self.nffn is not None:
            x = self.nffn(x)
        new_cache = None
        if use_cache:
            position = torch.full((bsz,), past + length, dtype=torch.long, device=x.device)
            new_cache = self_cache + (position,) + (cross_cache if cross_cache is not None else ())
        return x, self_w, cross_w, new_cache


class MegaPooler(nn.Module):
    """tanh(dense(x[:, 0])): (B, L, D) -> (B, D)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))
