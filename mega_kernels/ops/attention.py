"""Functional chunked gated attention with backend dispatch (contract: DESIGN.md "Functional contracts").

    attention(q, k, v, rel_bias, *, activation="softmax", chunk_size=None, causal=False,
              key_padding_mask=None, backend="auto") -> (B, Lq, E)

q (B, Lq, Z), k (B, Lk, Z), v (B, Lk, E), queries aligned to the end of the keys; rel_bias (2W - 1,) with
W >= the block length (chunk_size when it cuts the keys, else Lk). Maths: `mega_kernels.reference.attention`.

Kernel backends implement two torch.library ops with the schemas below (chunk_size 0 = none; `stats` is
whatever per-row float32 tensor the forward keeps for the backward, e.g. the softmax row max and sum).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference.attention import ACTIVATIONS
from . import backends

Tensor = torch.Tensor

ATTN_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor rel_bias, str activation, int chunk_size, bool causal, "
                   "Tensor? key_padding_mask) -> (Tensor, Tensor)")
ATTN_BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor rel_bias, Tensor out, Tensor stats, "
                   "str activation, int chunk_size, bool causal, Tensor? key_padding_mask) "
                   "-> (Tensor, Tensor, Tensor, Tensor)")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# `auto` runs the Triton kernel only for attention blocks longer than this. Measured in GPU run 2 (H100, bf16,
# results/gpu-run2/attention-*.json), fwd+bwd, reference vs triton softmax: LM B4 L4096 C1024 causal 1.59 vs
# 2.97 ms; LRA B32 L4096 C128 1.08 vs 1.64 ms; one block B4 L2048 causal 2.25 vs 3.14 ms; but unchunked
# B1 L16384 causal 76.6 vs 39.5 ms with 15.3 GiB vs 241 MiB peak memory (the reference is quadratic in L).
TRITON_ATTENTION_MIN_BLOCK = 4096
# The widest q / k the Triton kernels take (mega_kernels/triton/attention_common.MAX_Z; a test holds them equal):
# auto sends wider ones to the reference instead of failing.
TRITON_ATTENTION_MAX_Z = 256


def block_length(lk: int, chunk_size: Optional[int]) -> int:
    """The attention block length W: chunk_size when it cuts the keys, else Lk."""
    return chunk_size if chunk_size and chunk_size < lk else lk


def _validate(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"attention: {name} must be a 3-d (B, L, X) tensor, got {getattr(t, 'shape', t)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"attention: {name} must be a float tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    bsz, lq, zdim = q.shape
    if k.shape[0] != bsz or v.shape[0] != bsz:
        raise ValueError(f"attention: batch sizes differ: q {bsz}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != zdim:
        raise ValueError(f"attention: q and k must share Z, got {zdim} and {k.shape[2]}")
    if zdim < 1:
        raise ValueError("attention: q and k need Z >= 1 features (softmax scales by Z^-0.5), got Z = 0")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"attention: k and v must share Lk, got {k.shape[1]} and {v.shape[1]}")
    lk = k.shape[1]
    if lq > lk:
        raise ValueError(f"attention: Lq ({lq}) must not exceed Lk ({lk}); queries sit at the end of the keys")
    if activation not in ACTIVATIONS:
        raise ValueError(f"attention: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be True or False, got {causal!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"attention: chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(rel_bias, Tensor) or not rel_bias.dtype.is_floating_point:
        raise TypeError(f"attention: rel_bias must be a float tensor, got {getattr(rel_bias, 'dtype', rel_bias)!r}")
    if key_padding_mask is not None and not isinstance(key_padding_mask, Tensor):
        raise TypeError(f"attention: key_padding_mask must be a tensor, got {type(key_padding_mask).__name__}")
    if rel_bias.dim() != 1 or rel_bias.shape[0] % 2 != 1:
        raise ValueError(f"attention: rel_bias must be a (2W - 1,) vector, got {tuple(rel_bias.shape)}")
    width, blk = (rel_bias.shape[0] + 1) // 2, block_length(lk, chunk_size)
    if width < blk:
        raise ValueError(f"attention: rel_bias covers blocks of {width} but the block length is {blk}; pass a bias "
                         f"of length 2 * {blk} - 1")
    if rel_bias.device != q.device:
        raise ValueError(f"attention: rel_bias is on {rel_bias.device} but q is on {q.device}")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (bsz, lk):
            raise ValueError(f"attention: key_padding_mask must be (B, Lk) = ({bsz}, {lk}), "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


def _no_output(q: Tensor, k: Tensor, v: Tensor, rel_bias: Tensor) -> Tensor:
    """The (B, Lq, E) output when it has no element (B, Lq or E is 0), with zero gradients for every input and no
    kernel launch (the kernels take Lq >= 1; the reference would still form the scores)."""
    nothing = q[:0].sum() + k[:0].sum() + v[:0].sum() + rel_bias[:0].sum()  # exactly 0, keeps each input's graph
    return v.new_zeros(q.shape[0], q.shape[1], v.shape[2]) + nothing.to(v.dtype)


def resolve(backend: Optional[str], q: Tensor, block: int) -> str:
    """The backend a call runs on: the request resolved for q's device and dtype; `auto` keeps the reference
    for blocks of at most TRITON_ATTENTION_MIN_BLOCK keys and for Z above TRITON_ATTENTION_MAX_Z."""
    name = backends.resolve("attention", backend, q.device, q.dtype)
    if name == "triton" and backends.is_auto("attention", backend):
        if q.shape[2] > TRITON_ATTENTION_MAX_Z:
            backends.note_fallback("attention", q.device, f"triton: Z = {q.shape[2]} > {TRITON_ATTENTION_MAX_Z}")
            return "reference"
        if block <= TRITON_ATTENTION_MIN_BLOCK:
            return "reference"  # measured: the reference is faster there (a speed choice, not logged)
    return name


def attention(q: Tensor, k: Tensor, v: Tensor, rel_bias: Tensor, *, activation: str = "softmax",
              chunk_size: Optional[int] = None, causal: bool = False, key_padding_mask: Optional[Tensor] = None,
              backend: Optional[str] = "auto") -> Tensor:
    """Chunked single-head attention with a Toeplitz bias: -> (B, Lq, E) in v's dtype.

    key_padding_mask (B, Lk), True/1 = token (not padding). Under torch.autocast q, k and v are cast to the
    autocast dtype first, as for torch's matmuls (float64 is left alone), and the output is in that dtype.
    """
    cast = backends.autocast_dtype(q)
    if cast is not None:
        q, k, v = (t.to(cast) if isinstance(t, Tensor) and t.dtype in _FLOATS[:3] else t for t in (q, k, v))
        with torch.autocast(q.device.type, enabled=False):
            return attention(q, k, v, rel_bias, activation=activation, chunk_size=chunk_size, causal=causal,
                             key_padding_mask=key_padding_mask, backend=backend)
    _validate(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask)
    name = resolve(backend, q, block_length(k.shape[1], chunk_size))
    if q.shape[0] * q.shape[1] * v.shape[2] == 0:
        return _no_output(q, k, v, rel_bias)
    impl = backends.implementation("attention", name)
    return impl(q, k, v, rel_bias, activation=activation, chunk_size=chunk_size, causal=causal,
                key_padding_mask=key_padding_mask)


backends.register("attention", "reference", "mega_kernels.reference.attention", "attention",
                  backends.probe_reference)
backends.register("attention", "triton", "mega_kernels.ops.attention_triton", "attention", backends.probe_triton)
