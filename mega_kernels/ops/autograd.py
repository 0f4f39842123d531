"""Gradients of a kernel op through its plain-PyTorch reference, for the two cases a kernel backward does not
cover:

- the decoding step, whose backward would cost more code than the step itself (`register_ema_step_autograd`);
- a backward run with create_graph=True (double backward, gradient penalties): a kernel's backward op has no
  derivative of its own, so under grad mode the kernel backends' backward passes recompute with the reference
  instead, and the gradients they return are differentiable in the op's inputs.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


def reference_grads(recompute: Callable[..., Sequence[Optional[Tensor]]], inputs: Sequence[Optional[Tensor]],
                    needs: Sequence[bool], grad_outputs: Sequence[Optional[Tensor]]) -> Tuple[Optional[Tensor], ...]:
    """The gradients of `recompute(*inputs)` (the reference maths of the op's outputs, None where an output is
    absent) for the cotangents `grad_outputs` (None: no cotangent), one per input (None where `needs` is False).

    Called from a custom op's backward: under grad mode (create_graph=True) the recomputation starts from views of
    the saved inputs, so the returned gradients carry a graph back through them (a view per input: one tensor
    passed as several inputs, attention(x, x, x, ...), gets each input's share, not the sum once per input);
    otherwise it runs on detached views and its graph is freed on return."""
    create = torch.is_grad_enabled()
    leaves = [t if t is None else t.view_as(t) if create else t.detach().requires_grad_(need)
              for t, need in zip(inputs, needs)]
    wanted = [i for i, (t, need) in enumerate(zip(leaves, needs)) if need and t is not None and t.requires_grad]
    grads = [None] * len(inputs)
    if not wanted:
        return tuple(grads)
    with torch.enable_grad():
        pairs = [(o, g) for o, g in zip(recompute(*leaves), grad_outputs) if o is not None and g is not None]
        found = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs],
                                    allow_unused=True, create_graph=create)
    for i, g in zip(wanted, found):
        grads[i] = g
    return tuple(grads)
