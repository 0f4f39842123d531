"""EMA on the CPU: the C++ `cpu` backend against the FFT reference (the transformers way), same run.

    python -m pytest benchmarks/bench_ema_cpu.py --benchmark-only --benchmark-group-by=group

Rows: B4 L4096 D256 N16 float32, unidirectional and bidirectional, forward (no grad) and forward+backward
(gradients of x and every parameter), and one decoding step (B4 D256 N16). A module fixture prints the
speedups and writes them with the harness when the module ends (benchmarks/results/ema_cpu-<device>.json).
Targets (issue 5): forward >= 5x and forward+backward >= 3x the reference.
"""
import pytest
import torch

from benchmarks.harness import Row, fill_speedups, save_rows
from mega_kernels import ops

B, L, D, N = 4, 4096, 256, 16
SHAPE = f"B{B} L{L} D{D} N{N}"
BACKENDS = ("reference", "cpu")
_ROWS = []


def _params(bidirectional):
    torch.manual_seed(0)
    kd = 2 * D if bidirectional else D
    sign = torch.tensor([(-1.0) ** i for i in range(N)])
    return [(torch.randn(kd, N, 1) * 0.2).requires_grad_(), (torch.randn(kd, N, 1) * 0.2).requires_grad_(),
            (torch.randn(kd, N, 1) * 0.02 + sign.view(1, N, 1)).requires_grad_(), torch.randn(kd, N).requires_grad_(),
            torch.randn(D).requires_grad_()]


def _record(benchmark, mode, shape, backend):
    _ROWS.append(Row(op="ema", mode=mode, shape=shape, dtype="fp32", backend=backend,
                     ms=benchmark.stats.stats.median * 1e3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("direction", ["uni", "bi"])
def test_ema_cpu(benchmark, direction, mode, backend):
    bi = direction == "bi"
    params = _params(bi)
    x = torch.randn(B, L, D, requires_grad=True)
    benchmark.group = f"ema {mode} {SHAPE} {direction} fp32"

    def run():
        if mode == "fwd":
            with torch.no_grad():
                return ops.ema(x, *params, bidirectional=bi, backend=backend)
        y = ops.ema(x, *params, bidirectional=bi, backend=backend)
        y.backward(torch.ones_like(y))
        return y

    benchmark.pedantic(run, rounds=3 if backend == "reference" else 10, warmup_rounds=1)
    _record(benchmark, mode, f"{SHAPE} {direction}", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_step_cpu(benchmark, backend):
    delta, alpha, beta, gamma, omega = (p.detach() for p in _params(False))
    x = torch.randn(B, D)
    state = torch.randn(B, D, N)
    benchmark.group = f"ema step B{B} D{D} N{N} fp32"

    def run():
        return ops.ema_step(x, delta, alpha, beta, gamma, omega, state, backend=backend)

    benchmark.pedantic(run, rounds=200, warmup_rounds=5)
    _record(benchmark, "step", f"B{B} D{D} N{N}", backend)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    """After the module: speedups of the cpu backend over the reference measured in this run, saved."""
    yield
    if _ROWS:
        fill_speedups(_ROWS)
        save_rows(_ROWS, "ema_cpu", torch.device("cpu"))
