"""`MegaMultiDimensionDampedEma` (MEGA_SPEC.md section 4): the module holds transformers' parameters and calls
`mega_kernels.ops.ema` / `ops.ema_step` (maths: `mega_kernels.reference.ema`). No kernel is cached between
calls, so a weight change is always seen (transformers caches it in eval mode, spec 9.6).

Incremental decoding (unidirectional only) carries one cache tensor:
- without truncation: the EMA state h (B, D, N), float32 (float64 for a float64 model); one token goes through
  `ops.ema_step`, several tokens through `ops.ema(state=..., return_state=True)`;
- with truncation T: a truncated EMA has no finite state, so the cache is the window of the last T - 1 masked
  inputs (B, T - 1, D) (zeros before the sequence start); the new outputs are recomputed over
  window + new inputs, which gives exactly the full pass' truncated convolution.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

Tensor = torch.Tensor


class MegaMultiDimensionDampedEma(nn.Module):
    """silu(EMA(x * mask) + omega * x) for batch-first x (B, L, D).

    Parameters (kd = 2D if bidirectional else D): damping_factor, decay_factor, ema_expansion_matrix (kd, N, 1),
    kernel_projection_matrix (kd, N), residual_weight (D,).
    """

    def __init__(self, config):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.ndim = config.ema_projection_size
        self.bidirectional = config.bidirectional
        self.truncation = config.truncation
        self.scale = math.sqrt(1.0 / self.ndim)
        self.backend = config.backend_for("ema")
        kd = 2 * config.hidden_size if self.bidirectional else config.hidden_size
        self.damping_factor = nn.Parameter(torch.zeros(kd, self.ndim, 1))
        self.decay_factor = nn.Parameter(torch.zeros(kd, self.ndim, 1))
        self.ema_expansion_matrix = nn.Parameter(torch.zeros(kd, self.ndim, 1))
        self.kernel_projection_matrix = nn.Parameter(torch.zeros(kd, self.ndim))
        self.residual_weight = nn.Parameter(torch.zeros(config.hidden_size))

    def _params(self):
        return (self.damping_factor, self.decay_factor, self.ema_expansion_matrix, self.kernel_projection_matrix,
                self.residual_weight)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, cache: Optional[Tensor] = None,
                use_cache: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """x (B, L, D), mask (B, L) True = token -> (y (B, L, D), new cache or None).

        `cache` continues a previous call (see the module docstring for its layout); `use_cache` returns one.
        """
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"EMA: input has hidden size {x.shape[-1]}, the module expects {self.embed_dim}")
        if (cache is not None or use_cache) and self.bidirectional:
            raise ValueError("EMA: incremental state (past_key_values / use_cache) needs a unidirectional EMA; "
                             "build the model with bidirectional=False (and is_decoder=True)")
        mask = None if mask is None else mask.to(torch.bool)
        if not use_cache and cache is None:
            y = ops.ema(x, *self._params(), mask=mask, bidirectional=self.bidirectional, truncation=self.truncation,
                        backend=self.backend)
            return y, None
        if self.truncation is not None:
            return self._windowed(x, mask, cache)
        if cache is not None and x.shape[1] == 1:
            y, state = ops.ema_step(x[:, 0], *self._params(), cache, mask=None if mask is None else mask[:, 0],
                                    backend=self.backend)
            return y[:, None], state
        return ops.ema(x, *self._params(), mask=mask, state=cache, return_state=True, backend=self.backend)

    def _windowed(self, x: Tensor, mask: Optional[Tensor], window: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        bsz, length, dim = x.shape
        keep = self.truncation - 1
        xm = x if mask is None else torch.where(mask.unsqueeze(-1), x, 0)  # (a NaN at a padded position stays out)
        if window is None:  # a first call (prefill): no past inputs, so the plain truncated EMA of x
            y = ops.ema(x, *self._params(), mask=mask, truncation=self.truncation, backend=self.backend)
            return y, F.pad(xm[:, max(0, length - keep):], (0, 0, max(0, keep - length), 0))
        if tuple(window.shape) != (bsz, keep, dim):
            raise ValueError(f"EMA: the truncated-EMA cache must be (B, truncation - 1, D) = ({bsz}, {keep}, {dim}), "
                             f"got {tuple(window.shape)}")
        full = torch.cat([window.to(x.dtype), x], dim=1)
        full_mask = None
        if mask is not None:
            full_mask = torch.cat([mask.new_ones(bsz, keep), mask], dim=1)
        y = ops.ema(full, *self._params(), mask=full_mask, truncation=self.truncation, backend=self.backend)
        new_window = torch.cat([window.to(x.dtype), xm], dim=1)[:, full.shape[1] - keep:]
        return y[:, keep:].contiguous(), new_window  # (a strided y would take another matmul path next: a
        # 16-bit cached step would then round differently from the full pass)
