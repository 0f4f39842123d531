"""Triton kernels and their launchers (no autograd here; see mega_kernels.ops).

Importing this package under TRITON_INTERPRET=1 (CPU tests) patches faults of Triton 3.6's interpreter: an
incompatibility with NumPy >= 2.4 (`_patch_interpreter_index`) and its bfloat16 dots and rounding
(`_patch_interpreter_bfloat16`). Compiled kernels are untouched.
"""
import contextlib
import os

import torch


def interpreting() -> bool:
    """True when Triton runs on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device_of(t):
    """A context making t's GPU the current device (a no-op for CPU tensors). Triton launches on the current
    device and its current stream: inputs on cuda:1 while cuda:0 is current (device_map="auto") would otherwise
    fail to launch, or run on the wrong device and stream."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _patch_interpreter_index():
    """Triton 3.6's CPU interpreter keeps scalars as 1-element arrays and turns them into loop bounds with
    int(array), which NumPy >= 2.4 refuses ("only 0-dimensional arrays ..."). Re-point `__index__` at the
    array's single element. Idempotent."""
    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - a triton without the interpreter
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mega_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._mega_patched = True
    interpreter._patch_lang_tensor = patched


def _patch_interpreter_bfloat16():
    """Two bfloat16 faults of Triton 3.6's interpreter, which holds bfloat16 values as their uint16 bit patterns:
    `tl.dot` multiplies those patterns (values near 1e10; triton-lang/triton#11584, unsupported upstream), and
    float32 -> bfloat16 truncates, where the GPU rounds to nearest even (half of all values one ulp low, which
    doubled the bfloat16 attention kernels' error against the reference's). Here `create_dot` gets bfloat16
    operands as float32 (exact: a bfloat16 is the top half of a float32; products of two bfloat16 values are
    exact in float32, as on the tensor cores), and the float32 -> bfloat16 cast rounds to nearest even. Idempotent."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - a triton without the interpreter
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    dot, cast = getattr(builder, "create_dot", None), getattr(builder, "cast_impl", None)
    if dot is None or cast is None or getattr(dot, "_mega_patched", False):
        return

    def scalar(h):
        return getattr(h.dtype, "scalar", h.dtype)

    def as_float32(h):
        if scalar(h) != tl.bfloat16:
            return h
        bits = np.ascontiguousarray(h.data).view(np.uint16).astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, as_float32(a), as_float32(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if scalar(src) != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16  # to nearest, ties to even
        nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        out = np.where(nan, (bits >> 16) | np.uint32(0x40), rounded).astype(np.uint16)  # NaN stays a quiet NaN
        return interpreter.TensorHandle(out, tl.bfloat16)

    create_dot._mega_patched = True
    builder.create_dot, builder.cast_impl = create_dot, cast_impl


if interpreting():
    _patch_interpreter_index()
    _patch_interpreter_bfloat16()
