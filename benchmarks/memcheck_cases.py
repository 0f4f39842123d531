"""Tiny cases through every Triton kernel path, forward and backward, for compute-sanitizer's memcheck.

    compute-sanitizer --tool memcheck --error-exitcode 9 python -m benchmarks.memcheck_cases   (gpu_check.sh)

The value tests cannot see an out-of-bounds read whose result is never stored (a row past Lq inside a tile,
a lane past D): the interpreter reads whatever lies there, and the results stay right. memcheck on a GPU
reports every such access. The cases cover the EMA's chunked scans (carry, look-back, tensor cores,
truncation, masks, both directions, odd sizes) and the attention kernels (each activation, causal chunked with
left padding, queries not aligned to the chunks, one query against a cache, many small chunks, and a long
block's backward: dS recomputed, the dK launches in bands of tile offsets). On a CPU the same
script runs under TRITON_INTERPRET=1 as a smoke test (tests/test_benchmark_tools.py).
"""
from __future__ import annotations

import functools

import torch

from mega_kernels import ops
from mega_kernels.reference.ema import ema_coefficients
from mega_kernels.testing import ema_params
from mega_kernels.triton.ema_bwd import ema_bwd
from mega_kernels.triton.ema_fwd import ema_fwd
from mega_kernels.triton.ema_step import ema_step_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (bidirectional, truncation, tuning) over B3 L37 D21 N5: three chunks of 16, the last partial; D not a multiple
# of any channel tile.
# Few enough that a GPU compiles them all within gpu_check's 80 s (the tests there share the Triton cache).
EMA_CASES = [
    (False, 0, dict(chunk=16, lookback=True)),
    (False, 5, dict(chunk=16)),
    (True, 0, dict(chunk=16)),
    (True, 0, dict(chunk=16, tensor_cores=True)),
]

# (B, Lq, Lk, Z, E, chunk_size, causal): one Z and E, so each activation compiles its kernels once.
ATTENTION_CASES = [(2, 37, 100, 16, 40, 32, True), (2, 1, 100, 16, 40, 32, True), (2, 23, 23, 16, 40, 5, False)]


def run_ema() -> int:
    torch.manual_seed(0)
    bsz, length, dim, ndim = 3, 37, 21, 5
    n = 0
    for bidirectional, truncation, tuning in EMA_CASES:
        delta, alpha, beta, gamma, omega = (p.float().to(DEVICE) for p in ema_params(dim, ndim, bidirectional))
        a, q, c = ema_coefficients(delta, alpha, beta, gamma)
        x = torch.randn(bsz, length, dim, device=DEVICE)
        mask = torch.rand(bsz, length, device=DEVICE) > 0.2
        with_state = not bidirectional and truncation == 0
        state = torch.randn(bsz, dim, ndim, device=DEVICE) if with_state else None
        y, final = ema_fwd(x, a, q, c, omega, mask, state, bidirectional, truncation, with_state, **tuning)[:2]
        grads = ema_bwd(torch.randn_like(y), torch.randn_like(final) if with_state else None, x, a, q, c, omega,
                        mask, state, bidirectional, truncation, **tuning)
        assert all(bool(torch.isfinite(t).all()) for t in (y, *grads)), (bidirectional, truncation, tuning)
        n += 1
    a, q, c = ema_coefficients(*(p.float().to(DEVICE) for p in ema_params(dim, ndim, False)[:4]))
    y, s = ema_step_fwd(torch.randn(bsz, dim, device=DEVICE), a, q, c, torch.randn(dim, device=DEVICE),
                        torch.randn(bsz, dim, ndim, device=DEVICE), torch.tensor([True, False, True], device=DEVICE))
    assert bool(torch.isfinite(y).all() and torch.isfinite(s).all())
    return n + 1


# The long-block backward (softmax only): its limits lowered so that a tiny case takes that path.
BANDED_CASE = (2, 40, 70, 16, 40, None, True)


def _attention_case(bsz, lq, lk, zdim, edim, chunk, causal, activations) -> int:
    width = chunk if chunk and chunk < lk else lk
    q, k = (torch.randn(bsz, length, zdim, device=DEVICE, requires_grad=True) for length in (lq, lk))
    v = torch.randn(bsz, lk, edim, device=DEVICE, requires_grad=True)
    bias = (0.1 * torch.randn(2 * width - 1, device=DEVICE)).requires_grad_()
    kpm = torch.ones(bsz, lk, dtype=torch.bool, device=DEVICE)
    kpm[0, : lk // 3] = False  # left padding: with causal, the first rows see no key
    for activation in activations:
        out = ops.attention(q, k, v, bias, activation=activation, chunk_size=chunk, causal=causal,
                            key_padding_mask=kpm, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v, bias), torch.randn_like(out))
        assert all(bool(torch.isfinite(t).all()) for t in (out, *grads)), (lq, lk, chunk, activation)
    return len(activations)


def run_attention(banded: bool = True) -> int:
    from mega_kernels.triton import attention_bwd as bwd

    torch.manual_seed(0)
    n = sum(_attention_case(*case, activations=("softmax", "laplace", "relu2")) for case in ATTENTION_CASES)
    if banded:
        saved = bwd.DS_SCRATCH_LIMIT_BYTES, bwd._bias_bands
        bwd.DS_SCRATCH_LIMIT_BYTES = 0                             # dS recomputed
        bwd._bias_bands = functools.partial(saved[1], budget=1)    # one tile offset per dK launch
        try:
            n += _attention_case(*BANDED_CASE, activations=("softmax",))
        finally:
            bwd.DS_SCRATCH_LIMIT_BYTES, bwd._bias_bands = saved
    return n


def main() -> None:
    n_ema = run_ema()
    n_attention = run_attention()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print(f"memcheck cases done on {DEVICE}: {n_ema} EMA, {n_attention} attention (forward and backward)")


if __name__ == "__main__":
    main()
