"""The benchmark tools that run without a GPU: the static sm_90 report (benchmarks/kernel_resources.py) compiles
every EMA kernel and reports registers, spills and a hot loop (what GPU-less sessions use to compare kernel
versions); the profiler breakdown of the harness (kernel_ms) names where a call spends its time."""
import os
import re
import subprocess
import sys


def test_kernel_resources_reports_every_ema_kernel():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = re.findall(r"^ema .*? reg +(\d+) spill +(\d+) .*? loop +([\d.]+)/step", res.stdout, re.M)
    assert len(rows) == 8, res.stdout
    for regs, _, loop in rows:
        assert 0 < int(regs) <= 255 and float(loop) > 0


def test_kernel_ms_names_the_costly_op_first():
    import torch

    from benchmarks.harness import Row, format_kernels, kernel_ms

    a = torch.randn(384, 384, dtype=torch.float64)
    split = kernel_ms(lambda: (a @ a @ a).add_(1.0), "cpu", rep=3)
    assert next(iter(split)) == "aten::mm", split
    assert list(split.values()) == sorted(split.values(), reverse=True) and all(v > 0 for v in split.values())
    assert split["aten::mm"] > 5 * split.get("aten::add_", 0.0)
    text = format_kernels([Row("op", "fwd", "S", "fp64", "cpu", 1.0, extra={"kernel_ms": split})])
    assert "where the time goes: op fwd S fp64 cpu" in text and "aten::mm" in text
