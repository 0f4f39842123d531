"""Loads the compiled extension (csrc/): the prebuilt `mega_kernels._C` if setup.py built one, else a JIT
build with ninja (torch.utils.cpp_extension.load) into a cache folder, the first time a kernel is needed.

Nothing here ever raises: every failure (no compiler, no sources, a build error) is kept as a sentence that
`unavailable_reason(device)` returns and `mega-kernels info` shows. The cache folder is
$MEGA_KERNELS_CACHE or ~/.cache/mega_kernels, one subfolder per hash of the sources, flags and torch version.

torch's JIT build guards its folder with a `lock` file that a killed build leaves behind, and every later
build then waits on it forever. Builders here first take an flock on `build.lock` (the kernel drops it when
its holder dies), so a `lock` file found while holding it is stale and is removed (`_build_lock`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from . import _build

logger = logging.getLogger("mega_kernels")

_LOCK = threading.Lock()
_STATE: Optional[dict] = None  # {"ok", "how", "path", "cuda", "cuda_reason", "reason"}


def cache_root() -> Path:
    return Path(os.environ.get("MEGA_KERNELS_CACHE", Path.home() / ".cache" / "mega_kernels"))


def _digest(files, with_cuda: bool) -> str:
    """The cache folder's name: the sources' contents, the flags, torch, the GPU targets and where the sources
    are. Two copies of the same sources (two checkouts, two environments) get folders of their own: ninja rebuilds
    when a compile command changes, and the commands name the sources by path, so one shared folder would be
    rebuilt (minutes) each time the other copy loads."""
    h = hashlib.sha256(str(_build.ROOT.resolve()).encode())
    for rel in sorted(set(files)):
        h.update(rel.encode())
        h.update((_build.ROOT / rel).read_bytes())
    flags = _build.cxx_flags() + _build.ld_flags() + (_build.NVCC_FLAGS if with_cuda else [])
    h.update(f"{torch.__version__}|{torch.version.cuda}|{with_cuda}|{flags}|{_cuda_targets(with_cuda)}".encode())
    return h.hexdigest()[:16]


def _cuda_targets(with_cuda: bool) -> str:
    """The GPU architectures a CUDA build compiles for: TORCH_CUDA_ARCH_LIST, else (as torch's JIT build does)
    those of the visible GPUs. Part of the cache key, so a cache built for another GPU is never loaded (its
    kernels would fail with "no kernel image is available")."""
    if not with_cuda:
        return ""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if listed:
        return listed
    try:
        return ",".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                for i in range(torch.cuda.device_count())}))
    except Exception:  # no driver: the build itself reports that
        return ""


def _prebuilt_is_stale(path: Optional[str]) -> bool:
    """In a source checkout (an editable install), a prebuilt library older than any source it was built from,
    or than the build flags (_build.py), is stale. An installed package is never: its csrc/ copy was shipped
    with the library, and the installer does not keep file times (the copy often looks newer)."""
    if not path or _build.ROOT != _build.PACKAGE.parent:
        return False
    built = Path(path).stat().st_mtime
    files = [_build.ROOT / f for f in _build.CPU_SOURCES + _build.CUDA_SOURCES + _build.HEADERS]
    return any(f.exists() and f.stat().st_mtime > built for f in files + [Path(_build.__file__)])


def _try_prebuilt() -> Optional[dict]:
    try:
        spec = importlib.util.find_spec("mega_kernels._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    if _prebuilt_is_stale(spec.origin):
        logger.warning("mega_kernels: %s is older than csrc/ or _build.py; using a JIT build instead (rebuild with "
                       "MEGA_KERNELS_BUILD_EXT=1 pip install --no-build-isolation -e .)", spec.origin)
        return None
    try:
        mod = importlib.import_module("mega_kernels._C")
    except Exception as exc:  # e.g. built against another torch (undefined symbol): fall back to the JIT build
        logger.warning("mega_kernels: ignoring the prebuilt extension %s (%s: %s); rebuild it with "
                       "MEGA_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .", spec.origin,
                       type(exc).__name__, exc)
        return None
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("mega_kernels::ema_fwd", "CUDA")
    return {"ok": True, "how": "prebuilt", "path": getattr(mod, "__file__", None), "cuda": cuda,
            "cuda_reason": None if cuda else "the prebuilt extension was built without CUDA", "reason": None}


def _jit_build() -> dict:
    cuda_reason = _build.cuda_unavailable_reason()
    if cuda_reason is None:
        try:
            return _jit_build_with(True, None)
        except Exception as exc:  # keep the CPU kernels usable when only the CUDA part fails to build
            cuda_reason = f"the CUDA build failed ({_first_error(exc)})"
            logger.warning("mega_kernels: %s; building the CPU kernels alone", cuda_reason)
    return _jit_build_with(False, cuda_reason)


def _first_error(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower()]
    return f"{type(exc).__name__}: {(errors or lines or [''])[0][:300]}"


@contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Hold the build folder exclusively; remove the `lock` file a killed torch build left there."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own lock file alone guards the folder
        yield
        return
    with open(build_dir / "build.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("mega_kernels: waiting for another process building the extension in %s", build_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                logger.warning("mega_kernels: removing %s, left by a build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _jit_build_with(with_cuda: bool, cuda_reason: Optional[str]) -> dict:
    from torch.utils import cpp_extension

    srcs = _build.sources(with_cuda)
    missing = [s for s in srcs + _build.HEADERS if not (_build.ROOT / s).exists()]
    if missing:
        return {"ok": False, "reason": f"the extension sources are missing ({', '.join(missing)}); install "
                                       "from a source checkout or build with MEGA_KERNELS_BUILD_EXT=1"}
    tag = _digest(srcs + _build.HEADERS, with_cuda)
    build_dir = cache_root() / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("mega_kernels: building the C++%s extension in %s (first use only)",
                "/CUDA" if with_cuda else "", build_dir)
    with _build_lock(build_dir):
        cpp_extension.load(
            name=f"mega_kernels_C_{tag}", sources=[str(_build.ROOT / s) for s in srcs],
            extra_cflags=_build.cxx_flags(), extra_cuda_cflags=_build.NVCC_FLAGS, extra_ldflags=_build.ld_flags(),
            build_directory=str(build_dir), is_python_module=False, with_cuda=with_cuda, verbose=False)
    return {"ok": True, "how": "jit", "path": str(build_dir), "cuda": with_cuda, "cuda_reason": cuda_reason,
            "reason": None}


def load() -> dict:
    """Load (building if needed) the extension once; returns its state dict. Never raises."""
    global _STATE
    if _STATE is not None:  # lock-free once loaded (torch.compile traces through the backend probe)
        return _STATE
    with _LOCK:
        if _STATE is None:
            try:
                _STATE = _try_prebuilt() or _jit_build()
            except Exception as exc:
                _STATE = {"ok": False, "reason": f"building the extension failed ({_first_error(exc)}); a C++20 "
                                                 "compiler and ninja are needed"}
                logger.warning("mega_kernels: %s", _STATE["reason"])
            if _STATE["ok"]:
                _warn_if_single_threaded()
        return _STATE


def cpu_threads() -> Optional[int]:
    """How many threads the loaded extension's CPU kernels spread over (None: a library without the counter)."""
    try:
        return torch.ops.mega_kernels.cpu_parallel_threads()
    except (AttributeError, RuntimeError):
        return None


def _warn_if_single_threaded() -> None:
    threads, torch_threads = cpu_threads(), torch.get_num_threads()
    if threads is not None and threads < torch_threads:
        logger.warning("mega_kernels: the CPU kernels run on %d of %d threads: the extension was built without "
                       "OpenMP (mega_kernels/_build.py adds -fopenmp for GCC on Linux)", threads, torch_threads)
    elif threads is not None and threads > torch_threads:
        logger.warning("mega_kernels: the CPU kernels run on %d threads, torch on %d: the extension uses another "
                       "OpenMP runtime than torch's, which torch.set_num_threads does not size", threads,
                       torch_threads)


def unavailable_reason(device) -> Optional[str]:
    """None when the extension can run on `device`, else a sentence saying why not."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"the extension has no kernels for {device.type!r}"
    state = load()
    if not state["ok"]:
        return state["reason"]
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if not state["cuda"]:
            return f"the extension was built without CUDA kernels ({state['cuda_reason']})"
    return None


def summary() -> str:
    """One line for `mega-kernels info`: how the extension was loaded and how many threads its CPU kernels
    use, or why it is unavailable (loads it)."""
    state = load()
    if not state["ok"]:
        return f"unavailable: {state['reason']}"
    threads = cpu_threads()
    how = "prebuilt" if state["how"] == "prebuilt" else "JIT-built"
    cuda = "CUDA kernels built" if state["cuda"] else f"no CUDA kernels ({state['cuda_reason']})"
    cpu = "CPU kernels' threads unknown (an older build)" if threads is None else \
        f"CPU kernels on {threads} of {torch.get_num_threads()} torch threads"
    return f"{how} ({state['path']}); {cuda}; {cpu}"
