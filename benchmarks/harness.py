"""One benchmark harness for every op: timing, peak memory, the copy floor, and the results schema.

GPU timings are medians of `triton.testing.do_bench` (warm-up first, so autotuning is done before timing);
CPU timings are medians of `torch.utils.benchmark.Timer.blocked_autorange`. Every row records what it was
measured against in the same run (speedup vs the reference, fraction of a floor), and `save_rows` writes
benchmarks/results/<name>-<device>.json with the device, versions and git commit.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Row:
    op: str
    mode: str                      # fwd / bwd / fwd+bwd / step
    shape: str                     # e.g. "B8 L4096 D1024 N16 uni"
    dtype: str
    backend: str
    ms: Optional[float]            # None when the row could not run (see note)
    speedup: Optional[float] = None         # reference ms / this ms, same run
    floor_fraction: Optional[float] = None  # floor ms / this ms (memory or FLOP floor)
    tflops: Optional[float] = None          # useful TFLOP/s
    peak_mib: Optional[float] = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device, *, warmup: int = 25, rep: int = 100) -> float:
    """Median wall time of fn() in milliseconds on `device` (fn is warmed up first)."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    import torch.utils.benchmark as tb

    fn()
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=0.5)
    return m.median * 1e3


def peak_mib(fn: Callable[[], object], device) -> Optional[float]:
    """Peak memory allocated while running fn() once, above what was allocated before (CUDA only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def kernel_ms(fn: Callable[[], object], device, *, rep: int = 5, top: int = 10) -> Dict[str, float]:
    """Where one call of fn spends its time, from torch.profiler: {kernel name: ms per call} for the `top`
    largest, decreasing. On a GPU the device time of each CUDA kernel (Triton kernels under their own names,
    so a multi-launch op shows each of its passes); on the CPU each op's self time. fn is warmed up first."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    gpu = device.type == "cuda"
    try:
        fn()
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
            for _ in range(rep):
                fn()
            _sync(device)
    except Exception as exc:  # a profiler (or call) that fails here must not cost the run its timings
        return {f"(profiler failed: {type(exc).__name__}: {str(exc)[:80]})": 0.0}
    times: Dict[str, float] = {}
    for evt in prof.key_averages():
        us = evt.self_device_time_total if gpu else evt.self_cpu_time_total
        if us > 0 and not evt.key.startswith("ProfilerStep"):
            times[evt.key] = times.get(evt.key, 0.0) + us / 1e3 / rep
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:top])


def format_kernels(rows: List[Row], top: Optional[int] = None) -> str:
    """The kernel breakdowns (extra["kernel_ms"]) of the rows that have one, a block each (its `top` largest)."""
    lines = []
    for r in rows:
        split = r.extra.get("kernel_ms")
        if split:
            lines.append(f"# where the time goes: {r.op} {r.mode} {r.shape} {r.dtype} {r.backend} "
                         f"({r.ms:.3f} ms per call)" if r.ms else f"# {r.op} {r.mode} {r.shape} {r.backend}")
            lines += [f"  {ms:9.3f} ms  {name[:90]}" for name, ms in list(split.items())[:top]]
    return "\n".join(lines)


def copy_ms(nbytes: int, device) -> float:
    """Time of a device copy that reads nbytes/2 and writes nbytes/2 (the memory floor for that traffic)."""
    n = max(1, nbytes // 2)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(rows: List[Row], fn: Callable[[], object], device, *, with_memory: bool = True, **row) -> Row:
    """Time fn (and its peak memory) into a Row appended to rows; an OOM or error becomes a row with a note."""
    try:
        ms = time_ms(fn, device)
        mem = peak_mib(fn, device) if with_memory else None
        r = Row(ms=ms, peak_mib=mem, **row)
    except Exception as exc:  # one failing row must not lose the others
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        error = ("OOM" if is_oom(exc) else f"{type(exc).__name__}: {exc}")[:200]
        note = row.pop("note", "")  # (a row may bring a note of its own: keep both)
        r = Row(ms=None, note=f"{note}; {error}" if note else error, **row)
    rows.append(r)
    return r


def _git_commit() -> str:
    if os.environ.get("MEGA_GIT_COMMIT"):  # set by the GPU script, whose copy of the tree has no .git
        return os.environ["MEGA_GIT_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def environment(device) -> dict:
    env = {"device": device_name(device), "torch": torch.__version__, "git_commit": _git_commit()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


def format_table(rows: List[Row]) -> str:
    head = (f"{'op':<10}{'mode':<9}{'shape':<34}{'dtype':<10}{'backend':<19}{'ms':>9}{'x ref':>8}{'floor':>7}"
            f"{'TF/s':>7}{'MiB':>8}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        lines.append(f"{r.op:<10}{r.mode:<9}{r.shape:<34}{r.dtype:<10}{r.backend:<19}{f(r.ms, '9.3f'):>9}"
                     f"{f(r.speedup, '8.1f'):>8}{f(r.floor_fraction, '7.2f'):>7}{f(r.tflops, '7.0f'):>7}"
                     f"{f(r.peak_mib, '8.0f'):>8}  {r.note}")
    return "\n".join(lines)


def save_rows(rows: List[Row], name: str, device, out_dir: Optional[str] = None, quiet: bool = False) -> str:
    """Write rows + environment to <out_dir or benchmarks/results>/<name>-<device>.json, print the table (unless
    quiet: the partial saves a long run makes as it goes, so a timeout keeps what was measured)."""
    out_dir = out_dir or os.environ.get("MEGA_BENCH_OUT", RESULTS)
    os.makedirs(out_dir, exist_ok=True)
    env = environment(device)
    tag = env["device"].split(" (")[0].replace(" ", "_").replace("/", "_")
    path = os.path.join(out_dir, f"{name}-{tag}.json")
    with open(path, "w") as fh:
        json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, fh, indent=1)
    if quiet:
        return path
    print(f"# {name} on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']})")
    print(format_table(rows))
    breakdown = format_kernels(rows)
    if breakdown:
        print(breakdown)
    print(f"# written to {path}")
    return path


def load_rows(path: str) -> List[Row]:
    """The rows of a results file written by `save_rows` (e.g. to judge the targets after a run cut short)."""
    with open(path) as fh:
        return [Row(**r) for r in json.load(fh)["rows"]]


def fill_speedups(rows: List[Row], reference: Callable[[Row], str] = lambda r: "reference"):
    """Set each row's speedup against the row of the same op, mode, shape and dtype whose backend is
    `reference(row)` (by default the backend named "reference")."""
    ms = {(r.op, r.mode, r.shape, r.dtype, r.backend): r.ms for r in rows if r.ms}
    for r in rows:
        base = ms.get((r.op, r.mode, r.shape, r.dtype, reference(r)))
        if base and r.ms:
            r.speedup = base / r.ms
