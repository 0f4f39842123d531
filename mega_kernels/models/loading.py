"""Matching a checkpoint's state_dict to a model, as transformers' from_pretrained does for its common cases,
but strict where a silent mismatch would hide an error.

- A bare MegaModel checkpoint loads into a head (its keys get the `mega.` prefix) and a head's checkpoint into
  a MegaModel (the prefix is dropped, with the head's weights).
- Head weights (the keys outside `mega.`, and the pooler) may be missing: they keep their fresh init (e.g. a
  classifier on a masked-LM checkpoint); another head's weights are ignored. Both are logged.
- Every weight of the MEGA body itself must be there and nothing unknown may be: a body that does not match
  (another config, a broken file) raises KeyError.
- A weight of another shape raises ValueError, or with ignore_mismatched_sizes keeps its fresh init (e.g. a
  classifier with another num_labels), logged.
"""
from __future__ import annotations

import logging
from typing import Dict

import torch

logger = logging.getLogger("mega_kernels")


def _listing(keys, most: int = 10) -> str:
    keys = sorted(keys)
    return f"{keys[:most]}{'...' if len(keys) > most else ''}"


def match_checkpoint(model, state: Dict[str, torch.Tensor], ignore_mismatched_sizes: bool = False) -> dict:
    """The entries of `state` to load into `model` (keys renamed to the model's), after the checks above."""
    name = type(model).__name__
    prefix = model.base_model_prefix + "."
    is_head = model.base_model() is not model
    has_prefix = any(k.startswith(prefix) for k in state)
    dropped = []
    if is_head and not has_prefix:
        state = {prefix + k: v for k, v in state.items()}
    elif not is_head and has_prefix:
        dropped = [k for k in state if not k.startswith(prefix)]
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    body = prefix if is_head else ""

    def optional(key: str) -> bool:  # head weights and the pooler: the model may add or leave them out
        return not key.startswith(body) or key.startswith(body + "pooler.")

    expected = model.state_dict()
    missing = set(expected) - set(state) - model._tied_keys()
    unexpected = set(state) - set(expected)
    bad_missing = [k for k in missing if not optional(k)]
    bad_unexpected = [k for k in unexpected if not optional(k)]
    if bad_missing or bad_unexpected:
        raise KeyError(f"{name}.from_pretrained: the MEGA body's state_dict keys do not match (another config?); "
                       f"missing {_listing(bad_missing)}, unexpected {_listing(bad_unexpected)}")
    mismatched = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                  if k in expected and v.shape != expected[k].shape}
    if mismatched and not ignore_mismatched_sizes:
        shapes = ", ".join(f"{k}: checkpoint {a}, model {b}" for k, (a, b) in sorted(mismatched.items())[:10])
        raise ValueError(f"{name}.from_pretrained: weights of another shape ({shapes}); pass "
                         "ignore_mismatched_sizes=True to initialize them anew (e.g. a head with another num_labels)")
    fresh = sorted(missing | set(mismatched))
    if fresh:
        logger.warning("%s.from_pretrained: newly initialized (train them before use): %s", name, _listing(fresh))
    ignored = sorted(unexpected | set(dropped))
    if ignored:
        logger.warning("%s.from_pretrained: checkpoint weights not used by this model: %s", name, _listing(ignored))
    return {k: v for k, v in state.items() if k in expected and k not in mismatched}
