"""`mega-kernels` command line: info, check, bench.

    mega-kernels info              versions, devices, and which backend of each op can run here (or why not)
    mega-kernels check [--device]  every available backend of every op, and inside two small models, against the
                                   float64 reference on fresh random inputs, forward and gradients; a table; exit
                                   status 1 on any failure
    mega-kernels bench NAME [...]  run benchmarks/bench_NAME.py from a source checkout (ema, attention, ...)
"""
from __future__ import annotations

import argparse
import os
import platform
import runpy
import sys
from typing import Callable, List, Optional, Tuple

import torch

from . import __version__, _ext
from .ops import backends
from .ops.attention import TRITON_ATTENTION_MAX_Z, TRITON_ATTENTION_MIN_BLOCK
from .ops.ema import CUDA_MAX_N
from .reference.attention import attention as attention_ref
from .reference.ema import ema_coefficients, ema_fft
from .testing import ema_params, error_and_bound

OPS = ("ema", "attention")
# `check --op model`: two small models (a chunked causal LM with truncation; a bidirectional laplace classifier)
MODEL_CASES = (("MegaForCausalLM", dict(is_decoder=True, bidirectional=False, use_chunking=True, chunk_size=8,
                                        truncation=11)),
               ("MegaForSequenceClassification", dict(attention_activation="laplace", normalization_type="layernorm")))
MODEL_SIZES = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, intermediate_size=48, ema_projection_size=4,
                   shared_representation_size=16, nffn_hidden_size=40, max_positions=64, dropout_prob=0.0,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0)


def _versions() -> List[Tuple[str, str]]:
    rows = [("mega-kernels", __version__), ("python", platform.python_version()), ("torch", torch.__version__),
            ("torch CUDA", str(torch.version.cuda))]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except Exception as exc:
        rows.append(("triton", f"not importable ({type(exc).__name__})"))
    return rows


def _devices() -> List[torch.device]:
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs.append(torch.device("cuda"))
    return devs


# auto's own limits, applied per call by the ops (ops.attention.resolve, ops.ema._resolve)
_AUTO_LIMITS = {
    ("attention", "triton"): f" for blocks of more than {TRITON_ATTENTION_MIN_BLOCK} keys and Z <= "
                             f"{TRITON_ATTENTION_MAX_Z}; the reference otherwise",
    ("ema", "cuda"): f" for N <= {CUDA_MAX_N}; the reference otherwise",
}


def cmd_info(args) -> int:
    for name, value in _versions():
        print(f"{name:<14}{value}")
    print(f"{'extension':<14}{_ext.summary()}")
    for dev in _devices():
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
        print(f"\ndevice {dev}: {name}")
        for op in OPS:
            try:
                auto = backends.resolve(op, "auto", dev)
            except (backends.BackendUnavailable, ValueError) as err:  # MEGA_KERNELS_BACKEND names what cannot run
                auto = None
                print(f"  {op:<10}auto: {err}")
            for name, reason in backends.available_backends(op, dev).items():
                status = "available" if reason is None else f"unavailable: {reason}"
                mark = f"  <- auto{_AUTO_LIMITS.get((op, name), '')}" if name == auto else ""
                print(f"  {op:<10}{name:<10}{status}{mark}")
    return 0


# -- check ---------------------------------------------------------------------------------------------

def _ema_case(device, dtype, bidirectional, bsz=2, length=67, dim=36, ndim=5):
    gen = torch.Generator().manual_seed(1234 + bidirectional)
    params = ema_params(dim, ndim, bidirectional, generator=gen)
    x = torch.randn(bsz, length, dim, generator=gen, dtype=torch.float64)
    mask = torch.rand(bsz, length, generator=gen) > 0.2
    mask[0] = True
    grad = torch.randn(bsz, length, dim, generator=gen, dtype=torch.float64)
    return x, params, mask, grad


def _run_ema(backend, x, params, mask, grad, bidirectional):
    x = x.detach().requires_grad_(True)
    params = [p.detach().requires_grad_(True) for p in params]
    if backend is None:  # the reference maths, called directly (any dtype)
        a, q, c = ema_coefficients(*params[:4])
        y = ema_fft(x, a, q, c, params[4], mask=mask, bidirectional=bidirectional)
    else:
        from .ops import ema

        y = ema(x, *params, mask=mask, bidirectional=bidirectional, backend=backend)
    grads = torch.autograd.grad((y.double() * grad).sum(), [x, *params])
    return [y, *grads]


def _attention_case(device, activation, causal, chunk, bsz=2, length=45, zdim=24, edim=40):
    gen = torch.Generator().manual_seed(99)
    q, k = (torch.randn(bsz, length, zdim, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(bsz, length, edim, generator=gen, dtype=torch.float64)
    width = chunk if chunk and chunk < length else length
    bias = torch.randn(2 * width - 1, generator=gen, dtype=torch.float64) * 0.1
    mask = torch.ones(bsz, length, dtype=torch.bool)
    mask[1, -7:] = False
    grad = torch.randn(bsz, length, edim, generator=gen, dtype=torch.float64)
    return (q, k, v, bias), mask, grad


def _run_attention(backend, inputs, mask, grad, activation, causal, chunk):
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    kw = dict(activation=activation, chunk_size=chunk, causal=causal, key_padding_mask=mask)
    if backend is None:
        out = attention_ref(*inputs, **kw)
    else:
        from .ops import attention

        out = attention(*inputs, **kw, backend=backend)
    grads = torch.autograd.grad((out.double() * grad).sum(), inputs)
    return [out, *grads]


def _model_case(head, overrides):
    """(config dict, float64 state_dict moved off the init, ids, mask with padding, output weights)."""
    from . import models
    from .config import MegaConfig

    cfg = dict(MODEL_SIZES, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = getattr(models, head)(MegaConfig(**cfg)).double()
        gen = torch.Generator().manual_seed(8)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    ids = torch.randint(3, cfg["vocab_size"], (2, 21), generator=gen)
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    shape = (2, 21, cfg["vocab_size"]) if head == "MegaForCausalLM" else (2, model.config.num_labels)
    return cfg, model.state_dict(), ids, mask, torch.randn(shape, generator=gen, dtype=torch.float64)


def _run_model(kernels, head, cfg, state, ids, mask, grad, dtype, device):
    """Logits and every parameter gradient (one vector) of the model on `kernels` ({op: backend})."""
    from . import models
    from .config import MegaConfig

    model = getattr(models, head)(MegaConfig(**cfg, kernel_backend=kernels))
    model.load_state_dict(state)
    model.to(device, dtype).eval()
    logits = model(ids.to(device), attention_mask=mask.to(device)).logits
    grads = torch.autograd.grad((logits.double() * grad.to(device)).sum(), list(model.parameters()))
    return [logits, torch.cat([g.reshape(-1) for g in grads])]


def _check_model(name, dtype, device):
    """Both MODEL_CASES with `name` for every op it can run here (the reference for the others)."""
    kernels = {op: name for op in OPS if backends.unavailable_reason(op, name, device) is None}
    rows = []
    for head, overrides in MODEL_CASES:
        case = _model_case(head, overrides)

        def run(backend, dt, dev, case=case, head=head):
            return _run_model(kernels if backend else "reference", head, *case, dt, dev)

        label = f"model/{name}/{str(dtype).replace('torch.', '')}/{head[len('MegaFor'):]}"
        for _, tensor, err, bound, ok in _compare(label, run, lambda dt, dev: run(name, dt, dev), dtype, device):
            rows.append((label, "logits" if tensor == "out" else "param grads", err, bound, ok))
    return rows


def _compare(label, run: Callable, to: Callable, dtype, device) -> List[Tuple[str, str, float, float, bool]]:
    """Run `run` in dtype on device and the reference in float64 and in dtype; apply the tolerance rule."""
    ref64 = [t.detach().cpu() for t in run(None, torch.float64, torch.device("cpu"))]
    ref_low = [t.detach().cpu() for t in run(None, dtype, device)]
    got = [t.detach().cpu() for t in to(dtype, device)]
    names = ["out"] + [f"grad[{i}]" for i in range(len(got) - 1)]
    rows = []
    for name, g, r64, rl in zip(names, got, ref64, ref_low):
        err, bound, _ = error_and_bound(g.to(torch.float64 if dtype == torch.float64 else g.dtype), r64, rl)
        ok = bool(torch.isfinite(g).all()) and err <= bound
        rows.append((label, name, err, bound, ok))
    return rows


def _check_device(name: Optional[str]) -> torch.device:
    """The device `check` runs on: --device, else cuda when present; SystemExit naming the fix if unusable."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise SystemExit(f"mega-kernels check: --device must be cpu or cuda[:index], got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"mega-kernels check: --device must be cpu or cuda[:index], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mega-kernels check: --device cuda asked for, but CUDA is not available here "
                         "(see `mega-kernels info`); use --device cpu")
    return device


def cmd_check(args) -> int:
    device = _check_device(args.device)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float64] if device.type == "cpu" else [])
    results = []
    skipped = []
    ops = args.op or OPS + ("model",)

    def wanted(op):  # the kernel backends to check (the reference is what they are checked against); only these
        return [n for n in backends.implemented(op)  # are probed: probing cpu loads (or builds) the extension
                if n != "reference" and (not args.backend or n in args.backend)]

    for op in (o for o in ops if o != "model"):
        for name in wanted(op):
            reason = backends.unavailable_reason(op, name, device)
            if reason is not None:
                skipped.append(f"{op}/{name}: {reason}")
                continue
            for dtype in dtypes:
                if dtype == torch.float64 and name not in ("reference", "cpu"):
                    continue
                try:
                    results += _check_op(op, name, dtype, device)
                except Exception as exc:
                    results.append((f"{op}/{name}/{str(dtype)[6:]}", "error", float("nan"), float("nan"), False))
                    print(f"{op}/{name} {dtype}: {type(exc).__name__}: {exc}", file=sys.stderr)
    if "model" in ops:  # every kernel backend that runs here, inside whole models (float32, and cpu float64)
        for name in dict.fromkeys(n for op in OPS for n in wanted(op)
                                  if backends.unavailable_reason(op, n, device) is None):
            for dtype in [torch.float32] + ([torch.float64] if name == "cpu" else []):
                try:
                    results += _check_model(name, dtype, device)
                except Exception as exc:
                    results.append((f"model/{name}/{str(dtype)[6:]}", "error", float("nan"), float("nan"), False))
                    print(f"model/{name} {dtype}: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"{'case':<46}{'worst tensor':<14}{'max err':>10}{'bound':>10}  result")
    for label in dict.fromkeys(r[0] for r in results):
        case = [r for r in results if r[0] == label]
        worst = max(case, key=lambda r: (not r[-1], r[2] / r[3] if r[3] else float("inf")))
        ok = all(r[-1] for r in case)
        print(f"{label:<46}{worst[1]:<14}{worst[2]:>10.2e}{worst[3]:>10.2e}  {'ok' if ok else 'FAIL'}")
    for line in skipped:
        print(f"skipped {line}")
    cases = len(dict.fromkeys(r[0] for r in results))
    failed = len(dict.fromkeys(r[0] for r in results if not r[-1]))
    print(f"\n{cases - failed} passed, {failed} failed on {device} (forward and gradients vs the float64 reference)")
    if not results:
        if args.backend:  # what was asked for explicitly could not run, or does not exist for these ops
            have = {op: [n for n in backends.implemented(op) if n != "reference"] for op in ops if op in OPS}
            print(f"nothing to check: backend {', '.join(args.backend)} runs none of {', '.join(ops)} on {device} "
                  f"(kernel backends: {have}; see `mega-kernels info`)")
            return 1
        print("no kernel backend is available on this device; see `mega-kernels info`")
    return 1 if failed else 0


def _check_op(op, name, dtype, device):
    rows = []
    tag = str(dtype).replace("torch.", "")
    if op == "ema":
        for bidirectional in (False, True):
            x, params, mask, grad = _ema_case(device, dtype, bidirectional)

            def run(backend, dt, dev, x=x, params=params, mask=mask, grad=grad, bidirectional=bidirectional):
                return _run_ema(backend, x.to(dev, dt), [p.to(dev) for p in params], mask.to(dev),
                                grad.to(dev), bidirectional)

            label = f"ema/{name}/{tag}/{'bi' if bidirectional else 'uni'}"
            rows += _compare(label, run, lambda dt, dev: run(name, dt, dev), dtype, device)
    else:
        for activation in ("softmax", "laplace", "relu2"):
            for causal, chunk in ((False, None), (True, 16)):
                inputs, mask, grad = _attention_case(device, activation, causal, chunk)

                def run(backend, dt, dev, inputs=inputs, mask=mask, grad=grad, a=activation, c=causal, ch=chunk):
                    return _run_attention(backend, [t.to(dev, dt) for t in inputs], mask.to(dev), grad.to(dev),
                                          a, c, ch)

                label = f"attention/{name}/{tag}/{activation}/{'causal' if causal else 'full'}/C{chunk}"
                rows += _compare(label, run, lambda dt, dev: run(name, dt, dev), dtype, device)
    return rows


def cmd_bench(args) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks", f"bench_{args.name or ''}.py")
    if args.name is None or not os.path.exists(path):
        folder = os.path.dirname(path)
        if os.path.isdir(folder):
            names = sorted(f[len("bench_"):-3] for f in os.listdir(folder)
                           if f.startswith("bench_") and f.endswith(".py"))
            what = "name a benchmark" if args.name is None else f"no benchmark {args.name!r}"
            print(f"{what}; choose one of: {', '.join(names)}", file=sys.stderr)
        else:
            print(f"no benchmark {args.name!r}: benchmarks/ ships with the source checkout only "
                  f"(looked for {path})", file=sys.stderr)
        return 2
    sys.path.insert(0, root)
    with open(path) as fh:
        is_pytest_benchmark = "__main__" not in fh.read()
    if is_pytest_benchmark:  # a pytest-benchmark module (the CPU benchmarks)
        import pytest

        return int(pytest.main([path, "--benchmark-only", "-q", *args.rest]))
    sys.argv = [path, *args.rest]
    runpy.run_module(f"benchmarks.bench_{args.name}", run_name="__main__")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mega-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and backend availability").set_defaults(fn=cmd_info)
    p = sub.add_parser("check", help="check every available backend against the reference")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--op", action="append", choices=OPS + ("model",),
                   help="only this op, or 'model': the backends inside two small models (repeatable)")
    p.add_argument("--backend", action="append", choices=backends.BACKENDS[1:], help="only this backend (repeatable)")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/")
    p.add_argument("name", nargs="?", help="ema, attention, ema_cpu, model_cpu, ... (none: list them)")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="...", help="the benchmark's own options (e.g. --tiny)")
    p.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
