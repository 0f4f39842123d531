"""Shared test tools: the tolerance rule of DESIGN.md, random inputs and the case lists that every backend's
tests use (never copy these into a test file)."""
from __future__ import annotations

import contextlib

import torch


# -- tolerance rule (lives in the package so `mega-kernels check` applies the same rule) ----------------
from mega_kernels.testing import ATOL, assert_close_to_reference, ema_params  # noqa: E402,F401


def in_ci() -> bool:
    """True on CI (env CI set to anything but "", "0" or "false"): a missing backend or reference is a failure."""
    import os

    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def triton_ema_gate():
    """(device, reason or None, module skip mark) of a Triton EMA test module: the device to test on; without a
    usable Triton backend the module skips, except in CI (CI set), where that is an error, never a skip."""
    import pytest

    from mega_kernels.ops.backends import unavailable_reason

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = unavailable_reason("ema", "triton", torch.device(device))
    if reason is not None and in_ci():
        raise RuntimeError(f"the triton EMA backend must run in CI: {reason}")
    return device, reason, pytest.mark.skipif(reason is not None, reason=str(reason))


def poisoned_like(t):
    """A tensor of t's shape full of NaN: outputs a kernel must overwrite."""
    return torch.full_like(t, float("nan"))


def poison_empty(monkeypatch):
    """From here on, float tensors from torch.empty / empty_like start as NaN: an output no kernel writes fails."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() and t.numel() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(real_like(*a, **kw)))


@contextlib.contextmanager
def nan_filled_allocations():
    """While active, ATen's own uninitialized allocations (at::empty in the C++ kernels) are filled with NaN too:
    torch's deterministic mode fills them (warn_only: no op is refused)."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def guarded(t):
    """The same values (and gradients) as a view into the middle of a NaN-filled buffer: a kernel that reads
    past either end of the tensor gets NaN into its results."""
    pad = torch.full((64,), float("nan"), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t.flatten(), pad])[64:64 + t.numel()].view(t.shape)


def record_launches(monkeypatch, module, kernel: str) -> list:
    """The launch options (keyword arguments) of every launch of module.kernel (a Triton kernel) from here on,
    in order: a list that grows; each launch still runs."""
    launches = []
    real = getattr(module, kernel)

    class Recorded:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, kernel, Recorded())
    return launches


# -- EMA ----------------------------------------------------------------------------------------------
# (B, L, D, N) cases for every EMA backend's tests: odd sizes, L = 1, N = 1.
EMA_CASES = [
    (2, 1, 24, 3),
    (2, 7, 1, 1),
    (1, 7, 130, 16),
    (3, 129, 24, 3),
    (1, 129, 1, 16),
    (2, 1000, 24, 16),
]


def random_mask(bsz, length, device="cpu"):
    """(B, L) bool mask with a full row, an empty row (when B >= 3), and random holes elsewhere."""
    mask = torch.rand(bsz, length, device=device) > 0.3
    mask[:1] = True
    if bsz >= 3:
        mask[1] = False
    return mask


# -- attention ----------------------------------------------------------------------------------------
# (B, Lq, Lk, Z, E, chunk_size) cases for every attention backend's tests.
ATTN_CASES = [
    (2, 1, 1, 16, 8, None),
    (2, 17, 17, 24, 40, None),
    (1, 17, 17, 16, 8, 5),
    (2, 100, 100, 64, 40, 32),
    (2, 1, 17, 24, 300, None),
    (2, 1, 100, 16, 40, 32),
]


def attention_inputs(bsz, lq, lk, zdim, edim, chunk_size, dtype=torch.float64, device="cpu", requires_grad=False):
    """q, k, v and a rel_bias vector sized for the block length, as the modules produce them."""
    width = chunk_size if chunk_size and chunk_size < lk else lk
    q = torch.randn(bsz, lq, zdim, dtype=dtype)
    k = torch.randn(bsz, lk, zdim, dtype=dtype)
    v = torch.randn(bsz, lk, edim, dtype=dtype)
    bias = torch.randn(2 * max(width, 1) - 1, dtype=dtype) * 0.1
    return [t.to(device).requires_grad_(requires_grad) for t in (q, k, v, bias)]


def padding_masks(bsz, lk, chunk_size=None, device="cpu"):
    """Key padding masks to test: none, right padding, left padding, and (when chunked) a wholly padded chunk."""
    masks = {"none": None}
    right = torch.ones(bsz, lk, dtype=torch.bool)
    right[-1, lk - max(1, lk // 3):] = False
    left = torch.ones(bsz, lk, dtype=torch.bool)
    left[0, : max(1, lk // 3)] = False
    masks["right"], masks["left"] = right, left
    if chunk_size and chunk_size < lk:
        whole = torch.ones(bsz, lk, dtype=torch.bool)
        whole[0, :chunk_size] = False
        masks["whole_chunk"] = whole
    return {k: (None if v is None else v.to(device)) for k, v in masks.items()}
