"""MEGA_REVERSE_GRID=1 (tests/conftest.py) really reverses the interpreter's program order."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="an interpreter setting")

PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def _ticket(count, out):
    tl.store(out + tl.program_id(0), tl.atomic_add(count, 1))

def test_probe():
    count, out = torch.zeros(1, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    _ticket[(4,)](count, out)
    print("ORDER", out.tolist())
"""


@pytest.mark.parametrize("reverse,order", [("0", [0, 1, 2, 3]), ("1", [3, 2, 1, 0])])
def test_reverse_grid_switch(tmp_path, reverse, order):
    (tmp_path / "test_probe.py").write_text(PROBE)
    here = os.path.dirname(__file__)
    (tmp_path / "conftest.py").write_text(open(os.path.join(here, "conftest.py")).read())
    env = dict(os.environ, MEGA_REVERSE_GRID=reverse, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert f"ORDER {order}" in run.stdout, run.stdout + run.stderr
