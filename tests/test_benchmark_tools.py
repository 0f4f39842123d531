"""The static sm_90 report (benchmarks/kernel_resources.py) works without a GPU: every EMA kernel compiles and
reports registers, spills and a hot loop (what GPU-less sessions use to compare kernel versions)."""
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
