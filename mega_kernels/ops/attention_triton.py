"""The `triton` backend of `mega_kernels.ops.attention`: torch.library custom ops around the Triton launchers.

    mega_kernels::attention_fwd_triton  ATTN_FWD_SCHEMA -> (out (B, Lq, E), stats)
    mega_kernels::attention_bwd_triton  ATTN_BWD_SCHEMA -> (dq, dk, dv, d rel_bias)

stats is, for softmax, (B, 2, Lq) float32: each query row's max of the log2-domain scores and log2 of its sum
(triton/attention_fwd.py); an empty tensor for laplace / relu2.
`custom_op` + `register_fake` (not `triton_op`): it traces under torch.compile on the GPU and on the CPU under
TRITON_INTERPRET=1 (where triton_op's fake tracing touches data, DESIGN.md). `register_autograd` ties the pair
into one differentiable op, so `attention` below is differentiable in q, k, v and rel_bias.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import triton as _triton
from ..triton.attention_bwd import attention_bwd
from ..triton.attention_fwd import attention_fwd
from ..reference.attention import attention as reference
from .attention import ATTN_BWD_SCHEMA, ATTN_FWD_SCHEMA
from .autograd import reference_grads

Tensor = torch.Tensor


@torch.library.custom_op("mega_kernels::attention_fwd_triton", mutates_args=(), schema=ATTN_FWD_SCHEMA)
def attention_fwd_op(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask):
    with _triton.on_device_of(q):
        return attention_fwd(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask)


@attention_fwd_op.register_fake
def _(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask):
    out = v.new_empty(q.shape[0], q.shape[1], v.shape[2])
    stats = q.new_empty((q.shape[0], 2, q.shape[1]) if activation == "softmax" else (0,), dtype=torch.float32)
    return out, stats


@torch.library.custom_op("mega_kernels::attention_bwd_triton", mutates_args=(), schema=ATTN_BWD_SCHEMA)
def attention_bwd_op(grad_out, q, k, v, rel_bias, out, stats, activation, chunk_size, causal, key_padding_mask):
    with _triton.on_device_of(q):
        return attention_bwd(grad_out, q, k, v, rel_bias, out, stats, activation, chunk_size, causal,
                             key_padding_mask)


@attention_bwd_op.register_fake
def _(grad_out, q, k, v, rel_bias, out, stats, activation, chunk_size, causal, key_padding_mask):
    # attention_bwd allocates its gradients contiguous, whatever the inputs' strides
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), rel_bias.new_empty(rel_bias.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, rel_bias, out, stats, key_padding_mask)
    ctx.flags = (activation, chunk_size, causal)


def _backward(ctx, grad_out, grad_stats):
    q, k, v, rel_bias, out, stats, key_padding_mask = ctx.saved_tensors
    activation, chunk_size, causal = ctx.flags
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients through the reference (ops/autograd.py)
        def recompute(q, k, v, rel_bias):
            return (reference(q, k, v, rel_bias, activation=activation, chunk_size=chunk_size or None, causal=causal,
                              key_padding_mask=key_padding_mask),)

        return reference_grads(recompute, (q, k, v, rel_bias), ctx.needs_input_grad[:4], (grad_out,)) + (None,) * 4
    dq, dk, dv, dbias = attention_bwd_op(grad_out.contiguous(), q, k, v, rel_bias, out, stats, activation,
                                         chunk_size, causal, key_padding_mask)
    return dq, dk, dv, dbias, None, None, None, None


torch.library.register_autograd("mega_kernels::attention_fwd_triton", _backward, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, rel_bias: Tensor, *, activation: str = "softmax",
              chunk_size: Optional[int] = None, causal: bool = False,
              key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Chunked attention on the Triton kernels: q (B, Lq, Z), k (B, Lk, Z), v (B, Lk, E), rel_bias (2W - 1,),
    key_padding_mask (B, Lk) (True / 1 = token) -> (B, Lq, E) in v's dtype. Semantics:
    `mega_kernels.reference.attention`. rel_bias is used in float32 and its gradient comes back in its dtype."""
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
    out, _ = attention_fwd_op(q, k, v, rel_bias.contiguous(), activation, int(chunk_size or 0), bool(causal), mask)
    return out
