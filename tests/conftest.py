"""Test configuration: Triton runs under its CPU interpreter when no GPU is present (set before any import
of triton), and tests marked `gpu` skip without CUDA."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# benchmarks/gpu_check.sh sets MEGA_NATIVE_STACKS for the extension's GPU tests: a crash inside an op then also
# prints its C++ frames (pytest's faulthandler prints only the Python ones).
if os.environ.get("MEGA_NATIVE_STACKS") and hasattr(torch._C, "_set_print_stack_traces_on_fatal_signal"):
    torch._C._set_print_stack_traces_on_fatal_signal(True)


# MEGA_REVERSE_GRID=1 (under the interpreter): every Triton launch runs its programs in reverse grid order. A GPU
# runs them in no fixed order; the interpreter runs them in order, which can hide a program that writes into
# another's outputs (the later one overwrites it) or one that reads what another has yet to write.
if os.environ.get("MEGA_REVERSE_GRID") == "1" and os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime import interpreter as _interpreter

    _set_grid_idx = _interpreter.InterpreterBuilder.set_grid_idx

    def _reversed_grid_idx(self, x, y, z):
        gx, gy, gz = self.grid_dim
        return _set_grid_idx(self, gx - 1 - x, gy - 1 - y, gz - 1 - z)

    _interpreter.InterpreterBuilder.set_grid_idx = _reversed_grid_idx


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
