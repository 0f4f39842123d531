"""Triton kernels and their launchers (no autograd here; see mega_kernels.ops).

Importing this package under TRITON_INTERPRET=1 (CPU tests) patches one incompatibility of Triton 3.6's
interpreter with NumPy >= 2.4 (see `_patch_interpreter_index`); compiled kernels are untouched.
"""
import os


def interpreting() -> bool:
    """True when Triton runs on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


if interpreting():
    _patch_interpreter_index()
