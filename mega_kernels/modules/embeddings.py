"""Token embeddings and the two relative position biases (MEGA_SPEC.md sections 2-3).

Both biases are Toeplitz, bias[i, j] = f(j - i), so a module hands the attention op only the vector
vec (2W - 1,) with bias[i, j] = vec[W - 1 + j - i] (`vector(W)`), and builds full matrices only where the
attention is not a square block (cross-attention: `matrix(rows, cols, row_offset)`).

simple:  vec = w[M - W : M + W - 1] with M = chunk_size if chunk_size >= 0 else max_positions; W > M is an error.
rotary:  bias[i, j] = rot_i(alpha) . rot_j(b), with rot_t rotating the halves of a vector by the angles t * f,
         f_k = exp(-k ln(10000) / (Z/2)). Expanding the products,
             bias(d = j - i) = sum_k (a1_k b1_k + a2_k b2_k) cos(d f_k) + (a2_k b1_k - a1_k b2_k) sin(d f_k),
         so the vector is computed directly for d = -(W-1)..W-1, in float64 with transformers' float32
         frequencies (its own float32 angles t * f lose digits for large t; ours do not), then cast back.
         The cos / sin tables depend on no parameter: they are kept per (Z, device) and sliced (a decoding
         step asks for a new W each token), so a call costs one (2W - 1, Z) matrix-vector product.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

Tensor = torch.Tensor


class MegaEmbeddings(nn.Module):
    """Word embedding (+ token-type embedding when enabled; missing type ids are zeros): ids (B, L) -> (B, L, D)."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.use_token_types = config.add_token_type_embeddings
        if self.use_token_types:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.padding_idx = config.pad_token_id

    def forward(self, input_ids: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None) -> Tensor:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("MegaEmbeddings: pass input_ids or inputs_embeds")
            inputs_embeds = self.word_embeddings(input_ids)
        if not self.use_token_types:
            return inputs_embeds
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:-1], dtype=torch.long, device=inputs_embeds.device)
        return inputs_embeds + self.token_type_embeddings(token_type_ids)


def _toeplitz(vec: Tensor, rows: int, cols: int, row_offset: int = 0) -> Tensor:
    """(rows, cols) matrix m[i, j] = vec[W - 1 + j - (i + row_offset)] of a (2W - 1,) vector."""
    width = (vec.shape[0] + 1) // 2
    i = torch.arange(rows, device=vec.device)[:, None] + row_offset
    j = torch.arange(cols, device=vec.device)[None, :]
    return vec[width - 1 + j - i]


class _RelativeBias(nn.Module):
    def vector(self, width: int) -> Tensor:
        raise NotImplementedError

    def matrix(self, rows: int, cols: int, row_offset: int = 0) -> Tensor:
        """bias[i + row_offset, j] for i < rows, j < cols (transformers' rel_pos(n)[offset:offset+rows, :cols])."""
        return _toeplitz(self.vector(max(rows + row_offset, cols)), rows, cols, row_offset)

    def forward(self, seq_len: int) -> Tensor:
        """The (L, L) bias matrix, as transformers' module returns it."""
        return self.matrix(seq_len, seq_len)


class MegaSimpleRelativePositionalBias(_RelativeBias):
    """A learned bias per offset: parameter `rel_pos_bias` (2 * max_positions - 1,)."""

    def __init__(self, config):
        super().__init__()
        self.max_positions = config.max_positions if config.chunk_size < 0 else config.chunk_size
        self.limit = "max_positions" if config.chunk_size < 0 else "chunk_size"
        self.rel_pos_bias = nn.Parameter(torch.zeros(2 * config.max_positions - 1))

    def vector(self, width: int) -> Tensor:
        if width > self.max_positions:
            if self.limit == "max_positions":
                fix = "use shorter inputs, or use_chunking=True with a chunk_size"
            else:  # the config's chunk_size sizes this bias even when chunking is off (spec section 3)
                fix = (f"the bias is sized by chunk_size={self.max_positions} (even when use_chunking=False and for "
                       "cross-attention, which spans the whole source): use blocks of at most that many positions "
                       "(use_chunking=True), or chunk_size=-1 to size it by max_positions")
            raise ValueError(f"a block of {width} positions exceeds the simple relative bias' maximum "
                             f"{self.max_positions} ({self.limit}); {fix}; or relative_positional_bias='rotary'")
        return self.rel_pos_bias[self.max_positions - width: self.max_positions + width - 1]


# [cos | sin](d f_k) per (Z / 2, device), offsets d = -(n - 1)..n - 1, float64; grown by doubling n. A table over
# _TABLE_LIMIT elements (n ~ 32K at Z 128, 16K at Z 256; 64 MiB) is computed for its call and not kept.
_TABLES: Dict[Tuple[int, torch.device], Tensor] = {}
_TABLE_LIMIT = 1 << 23


def _angle_table(half: int, n: int, device: torch.device) -> Tensor:
    freqs = torch.exp(torch.arange(half, device=device).float() * -(math.log(10000) / half))  # as transformers
    angles = torch.arange(-(n - 1), n, device=device, dtype=torch.float64)[:, None] * freqs.double()[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rotary_table(half: int, width: int, device: torch.device) -> Tensor:
    """(2 width - 1, 2 half) float64: [cos(d f_k) | sin(d f_k)] for d = -(width - 1)..width - 1."""
    key = (half, torch.device(device))
    table = None if torch.compiler.is_compiling() else _TABLES.get(key)
    if table is None or table.shape[0] < 2 * width - 1:
        n = width if table is None else max(width, table.shape[0] + 1)  # (rows + 1 = 2 n_old: doubling)
        if (2 * n - 1) * 2 * half > _TABLE_LIMIT:
            n = width
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable later in training too
            table = _angle_table(half, n, device)
        if not torch.compiler.is_compiling() and table.numel() <= _TABLE_LIMIT:
            _TABLES[key] = table
    middle = (table.shape[0] - 1) // 2
    return table[middle - (width - 1): middle + width]


class MegaRotaryRelativePositionalBias(_RelativeBias):
    """Rotary bias rot(alpha) @ rot(b)^T: parameters `alpha`, `b_param` (1, Z), buffer `_float_tensor` [0.]."""

    def __init__(self, config):
        super().__init__()
        zdim = config.shared_representation_size
        if zdim % 2:
            raise ValueError(f"the rotary relative bias needs an even shared_representation_size, got {zdim}")
        self.embed_dim = zdim
        self.alpha = nn.Parameter(torch.zeros(1, zdim))
        self.b_param = nn.Parameter(torch.zeros(1, zdim))
        self.register_buffer("_float_tensor", torch.FloatTensor([0.0]))

    def vector(self, width: int) -> Tensor:
        half = self.embed_dim // 2
        a = self.alpha.double().view(-1)
        b = self.b_param.double().view(-1)
        a1, a2, b1, b2 = a[:half], a[half:], b[:half], b[half:]
        vec = rotary_table(half, width, a.device) @ torch.cat([a1 * b1 + a2 * b2, a2 * b1 - a1 * b2])
        return vec.to(self.alpha.dtype)


def make_relative_bias(config) -> _RelativeBias:
    if config.relative_positional_bias == "simple":
        return MegaSimpleRelativePositionalBias(config)
    if config.relative_positional_bias == "rotary":
        return MegaRotaryRelativePositionalBias(config)
    raise ValueError(f"unknown relative_positional_bias {config.relative_positional_bias!r}; use 'rotary' or 'simple'")
