"""Reading checkpoints in transformers' format (one file or shards; dtype and device options) and matching their
state_dict to a model, as transformers' from_pretrained does for its common cases, but strict where a silent
mismatch would hide an error:

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

import json
import logging
import os
from typing import Dict, Optional

import torch

from ..hub import SAFE_WEIGHTS_NAME, WEIGHTS_NAME

logger = logging.getLogger("mega_kernels")


def safetensors_module():
    try:
        import safetensors.torch as st
    except ImportError:
        return None
    return st


def _read_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        st = safetensors_module()
        if st is None:
            raise ImportError(f"{path} needs the safetensors package to load; pip install safetensors")
        return st.load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_weights(folder: str) -> dict:
    """The state_dict of a checkpoint folder: model.safetensors, pytorch_model.bin, or either sharded (an
    `<name>.index.json` whose weight_map names the file of each key), safetensors first."""
    for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return _read_file(path)
        index = path + ".index.json"
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            state = {}
            for shard in sorted(set(weight_map.values())):
                part = _read_file(os.path.join(folder, shard))
                state.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
            lost = sorted(set(weight_map) - set(state))
            if lost:
                raise KeyError(f"from_pretrained: {index} lists weights its shards do not hold: {lost[:10]}")
            return state
    raise FileNotFoundError(f"from_pretrained: no {SAFE_WEIGHTS_NAME} or {WEIGHTS_NAME} (or their sharded "
                            f"*.index.json) in {folder!r}")


def load_dtype(dtype, config, state: dict) -> Optional[torch.dtype]:
    """from_pretrained's dtype: None (float32, whatever was saved), a torch.dtype, a name, or "auto":
    config.dtype (config.torch_dtype before transformers 4.56), else the checkpoint's first floating tensor's."""
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or next(
            (t.dtype for t in state.values() if t.is_floating_point()), None)
    if dtype is None:
        return dtype
    named = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(named, torch.dtype) or not named.is_floating_point:
        raise ValueError(f"dtype {dtype!r}: pass a floating torch.dtype, its name (e.g. 'bfloat16') or 'auto'")
    return named


def load_device(device_map) -> Optional[torch.device]:
    """from_pretrained's device_map: one device for the whole model (no sharding across devices)."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"device_map {device_map!r}: the model loads on one device; pass a device or "
                             "{'': device} (no placement of single modules)")
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device_map {device_map!r} is not a device ({err}); pass e.g. 'cuda', 0 or 'cpu'") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ValueError(f"device_map {device_map!r}: this machine has {have}; pass 'cpu', 'auto' or a device "
                         "that exists")
    return device


def _listing(keys, most: int = 10) -> str:
    keys = sorted(keys)
    return f"{keys[:most]}{'...' if len(keys) > most else ''}"


def match_checkpoint(model, state: Dict[str, torch.Tensor], ignore_mismatched_sizes: bool = False) -> dict:
    """The entries of `state` to load into `model` (keys renamed to the model's), after the checks above."""
    name = type(model).__name__
    prefix = model.base_model_prefix + "."
    is_head = model.base_model is not model
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
