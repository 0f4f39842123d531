"""Backend registry and resolution for the functional ops.

Each op ("ema", "attention") has implementations registered under a backend name ("reference", "triton",
"cuda", "cpu"). A backend module is imported lazily, the first time it is asked for, so importing the package
never compiles or loads a kernel. `resolve(op, requested, device)` turns a request into a backend name:

- an explicit name is used if available for that device, else a `BackendUnavailable` error says why;
- "auto" (or None) takes `MEGA_KERNELS_BACKEND` when set, else the first available entry of `AUTO_ORDER`
  for the device type, else "reference" (logged once per op, device type and reason).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

logger = logging.getLogger("mega_kernels")

BACKENDS = ("reference", "triton", "cuda", "cpu")
ENV_VAR = "MEGA_KERNELS_BACKEND"

# auto's preference per (op, device type), fastest first. Each entry is justified by a measured benchmark
# (benchmarks/NOTES.md); an op/device with no measured winner over the reference stays on the reference.
AUTO_ORDER: Dict[Tuple[str, str], Tuple[str, ...]] = {
    # ema on cuda: Triton before the CUDA extension, faster in every row of GPU run 2 (H100, same run,
    # results/gpu-run2/bench_ema-*.json): B8 L4096 D1024 N16 bf16 uni fwd 0.615 vs 0.756 ms, fwd+bwd 2.67 vs
    # 3.51 ms; fp32 bidirectional fwd 0.583 vs 2.17 ms, fwd+bwd 2.96 vs 7.34 ms. Both beat the FFT reference.
    ("ema", "cuda"): ("triton", "cuda"),
    # cpu: the C++ extension vs the FFT reference, B4 L4096 D256 N16 fp32, 2 threads, same run
    # (benchmarks/bench_ema_cpu.py, results/ema_cpu-cpu.json, session 18): fwd 10.8 vs 81.2 ms (7.5x), fwd+bwd
    # 41.4 vs 234 ms (5.6x), bidirectional fwd+bwd 58.8 vs 588 ms (10.0x); a decoding step 73.8 vs 74.3 us (1.0x:
    # both are Python coefficient maths and dispatch). Every earlier run (this comment's git history) agrees.
    ("ema", "cpu"): ("cpu",),
    # attention on cuda: Triton, but only for blocks longer than TRITON_ATTENTION_MIN_BLOCK (ops/attention.py):
    # below that the materialized reference was faster in GPU run 2.
    ("attention", "cuda"): ("triton",),
    ("attention", "cpu"): (),
}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to do."""


class NotLoadedWhileTracing(RuntimeError):
    """Raised by a probe that would have to load or build something (it has not yet) while torch.compile /
    torch.export traces: tracing cannot do that, and the answer must not silently become "unavailable"."""


def _preload_message(op: str, backend: str) -> str:
    return (f"{op}: the {backend!r} backend is not loaded yet and torch.compile / torch.export cannot trace its "
            f"import; call mega_kernels.ops.backends.preload(device, {backend!r}) (a model: preload(device, "
            f"model.config.kernel_backend)) or run once eagerly before compiling or exporting")


@dataclass
class _Entry:
    module: str                                   # module path holding the implementation
    attr: str                                     # the callable in it
    probe: Callable[[torch.device], Optional[str]]  # None if usable on this device, else the reason
    _impl: Optional[Callable] = field(default=None, repr=False)

    def load(self) -> Callable:
        if self._impl is None:
            self._impl = getattr(importlib.import_module(self.module), self.attr)
        return self._impl


_REGISTRY: Dict[str, Dict[str, _Entry]] = {}
DISPATCHED_AS = {"ema_step": "ema"}  # ops whose backend is resolved under another op's name
_LOGGED = set()


def register(op: str, backend: str, module: str, attr: str, probe: Callable[[torch.device], Optional[str]]):
    """Register `module.attr` as `op`'s `backend`. A module already imported (the reference's) is loaded now, so
    torch.compile finds it without a `preload`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    entry = _REGISTRY.setdefault(op, {})[backend] = _Entry(module, attr, probe)
    if module in sys.modules:
        entry.load()


def implemented(op: str) -> Tuple[str, ...]:
    """The backends that implement `op` (available here or not)."""
    return tuple(_REGISTRY.get(op, {}))


def unavailable_reason(op: str, backend: str, device: torch.device) -> Optional[str]:
    """None when `backend` can run `op` on `device`, else a sentence saying why not."""
    entry = _REGISTRY.get(op, {}).get(backend)
    if entry is None:
        return f"no {backend!r} implementation of {op!r} exists"
    try:
        return entry.probe(torch.device(device))
    except NotLoadedWhileTracing:
        raise RuntimeError(_preload_message(op, backend)) from None
    except Exception as exc:  # a probe must never crash the caller
        return f"{type(exc).__name__}: {exc}"


# Backends whose kernels take float64 inputs; `auto` skips the others for float64 tensors.
FLOAT64_BACKENDS = ("reference", "cpu")


def resolve(op: str, requested: Optional[str], device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend to run `op` on `device` (for inputs of `dtype`, when given)."""
    device = torch.device(device)
    name = requested or "auto"
    source = "backend="
    if name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
        source = f"{ENV_VAR}="
        if name in BACKENDS and name not in _REGISTRY.get(op, {}):
            name = "auto"  # e.g. MEGA_KERNELS_BACKEND=cpu: attention has no cpu kernel, so auto decides it
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"{source}{name!r} is not a backend; use 'auto' or one of {BACKENDS}")
        reason = unavailable_reason(op, name, device)
        if reason is not None:
            fix = f"unset {ENV_VAR} or set it to 'reference'" if source != "backend=" else \
                ("use backend='auto' or 'reference' (a model takes it from config.kernel_backend, which "
                 "save_pretrained keeps: model.set_kernel_backend('auto'), or from_pretrained(..., "
                 "kernel_backend='auto'))")
            raise BackendUnavailable(f"{op}: {source}{name!r} cannot run on {device.type}: {reason}. "
                                     f"To go on, {fix}, or fix the cause.")
        return name
    tried = []
    for cand in AUTO_ORDER.get((op, device.type), ()):
        if dtype == torch.float64 and cand not in FLOAT64_BACKENDS:
            continue  # float64 is a checking precision: the reference (or the C++ cpu kernels) serve it
        reason = unavailable_reason(op, cand, device)
        if reason is None:
            return cand
        tried.append(f"{cand}: {reason}")
    if tried:
        note_fallback(op, device, "; ".join(tried))
    return "reference"


def warn_once(key, message: str) -> None:
    """Log `message` as a warning the first time `key` is seen (not while torch.compile traces: the eager call
    logs it)."""
    if key not in _LOGGED and not torch.compiler.is_compiling():
        _LOGGED.add(key)
        logger.warning("%s", message)


def note_fallback(op: str, device: torch.device, why: str) -> None:
    """Log once per (op, device type, reason) that auto runs `op` on the reference because no kernel can take the
    call (not for auto's measured speed choices)."""
    kind = torch.device(device).type
    warn_once((op, kind, why), f"mega_kernels {op} on {kind} falls back to the reference ({why})")


def is_auto(op: str, requested: Optional[str]) -> bool:
    """True when `auto` chooses `op`'s backend for `requested`: it is "auto" and MEGA_KERNELS_BACKEND names no
    backend that `op` implements (as `resolve` decides)."""
    env = os.environ.get(ENV_VAR, "auto") or "auto"
    return (requested or "auto") == "auto" and (env == "auto" or (env in BACKENDS and env not in _REGISTRY.get(op, {})))


def autocast_dtype(t) -> Optional[torch.dtype]:
    """torch.autocast's lower-precision dtype when autocast is on for the device type of tensor t, else None.

    The ops take autocast into account themselves (their kernels are not autocast-aware): `ops.attention` is a
    matmul-class op and runs in this dtype, as torch's scaled_dot_product_attention does; `ops.ema` is a scan
    and keeps x's dtype with float32 state and sums. Both then run their backend with autocast off, so every
    backend, the reference included, computes what it computes outside autocast."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        enabled = torch.is_autocast_enabled(t.device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return None
    return torch.get_autocast_dtype(t.device.type) if enabled else None


def implementation(op: str, backend: str) -> Callable:
    entry = _REGISTRY[op][backend]
    if entry._impl is None and torch.compiler.is_compiling():
        raise RuntimeError(_preload_message(op, backend))
    return entry.load()


def preload(device, backend=None) -> Dict[str, str]:
    """Load the implementation each op resolves to on `device`, so that calls traced later by
    torch.compile(fullgraph=True) find it loaded. backend: what the calls will ask for, as a model's
    `config.kernel_backend` holds it: None or "auto" (auto's or MEGA_KERNELS_BACKEND's pick), one name (for the
    ops that implement it; the others auto), or a per-op dict ({"ema": "cpu"}; a missing op is auto; a name the op
    lacks raises ValueError). An explicit backend that cannot run on `device` raises BackendUnavailable, as the
    call would. Returns {op: backend loaded}."""
    device = torch.device(device)
    chosen = {}
    for op in _REGISTRY:
        key = DISPATCHED_AS.get(op, op)
        asked = backend.get(key, "auto") if isinstance(backend, dict) else backend or "auto"
        if asked not in _REGISTRY.get(key, {}):
            if isinstance(backend, dict) and asked != "auto":
                raise ValueError(f"preload: backend {{{key!r}: {asked!r}}} names no kernels of {key}; use one of "
                                 f"{('auto',) + implemented(key)}")
            asked = "auto"  # (one name for every op: the ops that lack it take auto)
        name = resolve(key, asked, device)
        if name in _REGISTRY[op]:
            _REGISTRY[op][name].load()
            chosen[op] = name
    return chosen


def available_backends(op: str, device: torch.device) -> Dict[str, Optional[str]]:
    """{backend: None if available else reason} for every registered backend of `op`."""
    return {name: unavailable_reason(op, name, device) for name in _REGISTRY.get(op, {})}


# -- probes shared by the ops -------------------------------------------------------------------------

def probe_reference(device: torch.device) -> Optional[str]:
    return None


def probe_triton(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({exc})"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda":
        if interpret:
            return "TRITON_INTERPRET=1 is set, which runs Triton on the CPU only"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if device.type == "cpu":
        return None if interpret else "Triton runs on the CPU only under TRITON_INTERPRET=1 (for tests)"
    return f"Triton does not support device {device.type!r}"


def probe_extension_cpu(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpu backend runs CPU tensors only (got {device.type}); use 'cuda' or 'triton' there"
    return _extension_reason(device)


def _extension_reason(device: torch.device) -> Optional[str]:
    from .. import _ext

    if _ext._STATE is None and torch.compiler.is_compiling():  # loading (or building) it takes a lock: untraceable
        raise NotLoadedWhileTracing()
    return _ext.unavailable_reason(device)


def probe_extension_cuda(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend runs CUDA tensors only (got {device.type}); use 'cpu' there"
    return _extension_reason(device)
