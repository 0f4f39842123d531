"""Chunked gated attention: the triton backend against the materialized reference, FlexAttention and SDPA.

    python -m benchmarks.bench_attention            # GPU: every ANCHORS.md attention shape + B1 L16384 (~2 min)
    python -m benchmarks.bench_attention --quick    # GPU smoke run: LM and LRA shapes, fewer peers
    python -m benchmarks.bench_attention --tiny     # CPU (TRITON_INTERPRET=1): tiny shapes, end-to-end check
    python -m benchmarks.bench_attention --compile-report lm   # no GPU needed: compile the kernels for sm_90
                                                               # with their GPU configs, print smem/regs/spills
    python -m benchmarks.bench_attention --summary results.json   # the LM rows and verdicts of a saved run

Rows (benchmarks/results/attention-<device>.json, rewritten after each shape so a timeout keeps what ran):
fwd and fwd+bwd ms, peak MiB, speedup vs the materialized reference softmax of the same shape, useful TFLOP/s
as ANCHORS.md counts them: 2 B L C (Z + E) once (halved when causal; C = L unchunked), x3 for fwd+bwd.
Peers (CUDA only): FlexAttention (compiled once per shape; score_mod adds the Toeplitz bias, whose gradient it
computes as ours does, a block_mask holds chunks + causality; v split in heads of 128 with q/k repeated per
head) and SDPA flash (no bias; chunks folded into the batch; q/k/v in heads of 128: an upper bound for stock
kernels), plus SDPA with a dense float bias for the one-block shape. The note of each triton row holds
max |out - reference| (same dtype). "long-double" (the long case at twice its length, triton softmax only)
tells whether the long case's peak memory grows linearly in L. Profiles ("where the time goes") are taken after
every timing, so the profiler cannot slow them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

SHAPES = {  # name: (B, L, Z, E, chunk or None, causal); most important first (a timeout keeps what ran)
    "LM": (4, 4096, 256, 2048, 1024, True),
    "LRA": (32, 4096, 64, 256, 128, False),
    "long": (1, 16384, 256, 2048, None, True),
    "long-double": (1, 32768, 256, 2048, None, True),
    "one-block": (4, 2048, 256, 2048, None, True),
}
TINY = {"tiny-chunked": (1, 64, 16, 32, 32, True), "tiny-lra": (2, 64, 16, 48, 16, False)}
ACTS = ("softmax", "laplace", "relu2")


def shape_str(b, L, z, e, c, causal):
    return f"B{b} L{L} Z{z} E{e} " + (f"C{c}" if c else "unchunked") + (" causal" if causal else "")


def useful_flops(b, L, z, e, c, causal):
    return 2.0 * b * L * (c or L) * (z + e) / (2 if causal else 1)


def make_inputs(b, L, z, e, c, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    w = c if c and c < L else L
    q, k = (torch.randn(b, L, z, generator=g).to(device, dtype) for _ in range(2))
    v = torch.randn(b, L, e, generator=g).to(device, dtype)
    bias = (torch.randn(2 * w - 1, generator=g) * 0.1).to(device, dtype)
    return [t.requires_grad_() for t in (q, k, v, bias)]


def fwd_bwd(fn, inputs):
    """Callables for the forward and for forward + backward (torch.autograd.grad: no .grad accumulation; the
    output gradient is made once, outside the timed calls)."""
    grad = []

    def f():
        with torch.no_grad():
            return fn(*inputs)

    def fb():
        out = fn(*inputs)
        if not grad:
            grad.append(torch.ones_like(out))
        return torch.autograd.grad(out, inputs, grad[0], allow_unused=True)
    return f, fb


def flex_peer(b, L, z, e, c, causal, q, k, v, bias, compiled, bias_grad=True):
    """FlexAttention on MEGA's problem. bias_grad: score_mod reads the bias itself, so its backward computes the
    bias gradient as ours does (torch >= 2.6 supports captured tensors that require grad); False reads a
    detached copy (the q, k, v gradients only)."""
    from torch.nn.attention.flex_attention import create_block_mask

    heads, width = e // 128, (bias.shape[0] + 1) // 2
    size = c or L

    table = bias if bias_grad else bias.detach()

    def score_mod(score, bi, h, qi, kj):
        return score + table[width - 1 + kj - qi].float()

    def mask_mod(bi, h, qi, kj):
        ok = (qi // size) == (kj // size)
        return ok & (kj <= qi) if causal else ok

    block_mask = create_block_mask(mask_mod, None, None, L, L, device=q.device)

    def run(q, k, v, bias):
        qh = q.unsqueeze(1).expand(b, heads, L, z)
        kh = k.unsqueeze(1).expand(b, heads, L, z)
        vh = v.view(b, L, heads, 128).transpose(1, 2)
        return compiled(qh, kh, vh, score_mod=score_mod, block_mask=block_mask)
    return run


def sdpa_peer(b, L, z, e, c, causal):
    """SDPA flash on chunks folded into the batch, q/k/v in heads of 128 (no bias)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    size = c or L
    heads = e // 128

    def run(q, k, v, bias):
        qq = q.repeat(1, 1, max(1, 128 * heads // z))[..., :128 * heads]
        kk = k.repeat(1, 1, max(1, 128 * heads // z))[..., :128 * heads]
        fold = lambda t: t.reshape(b * (L // size), size, heads, 128).transpose(1, 2)  # noqa: E731
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(fold(qq), fold(kk), fold(v), is_causal=causal)
    return run


def sdpa_dense_bias_peer(b, L, z, e, causal):
    """SDPA (efficient kernel) with a dense (L, L) float bias holding the Toeplitz bias and the causal mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads = e // 128

    def run(q, k, v, bias):
        pos = torch.arange(L, device=q.device)
        dense = bias[L - 1 + pos[None, :] - pos[:, None]]
        if causal:
            dense = dense.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        vh = v.view(b, L, heads, 128).transpose(1, 2)
        qh = q.unsqueeze(1).expand(b, heads, L, z)
        kh = k.unsqueeze(1).expand(b, heads, L, z)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):  # (run 2's cuDNN pick failed)
            return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=dense.to(q.dtype))
    return run


def bench_shape(rows, name, spec, device, dtype, quick, profile=None):
    """Time every method at one shape into rows; profile: a list collecting (row, fn) of the rows worth a kernel
    breakdown, for the caller to profile once every timing is done."""
    from benchmarks.harness import Row, measure
    from mega_kernels.ops.attention_triton import attention as triton_attention
    from mega_kernels.reference.attention import attention as reference

    b, L, z, e, c, causal = spec
    shape = shape_str(*spec)
    flops = useful_flops(*spec)
    dname = str(dtype).replace("torch.", "")
    x = make_inputs(b, L, z, e, c, device, dtype)
    kw = dict(chunk_size=c, causal=causal)
    methods = []
    for act in ACTS if name != "long-double" else ("softmax",):
        if (act == "softmax" or not (quick or name == "long")) and name != "long-double":
            methods.append((f"reference-{act}", lambda *t, act=act: reference(*t, activation=act, **kw)))
        methods.append((f"triton-{act}", lambda *t, act=act: triton_attention(*t, activation=act, **kw)))
    if device.type == "cuda" and name != "long-double":
        from torch.nn.attention.flex_attention import flex_attention

        if name != "long":  # ANCHORS has no Flex row there; its compile would cost ~30 s of the budget
            compiled = torch.compile(flex_attention, dynamic=False)
            try:  # (its block mask is built here, outside measure: a failure must cost only its own rows)
                methods.append(("flex-softmax", flex_peer(*spec, *x, compiled)))
                methods.append(("flex-softmax-nobiasgrad", flex_peer(*spec, *x, compiled, bias_grad=False)))
            except Exception as exc:
                rows.append(Row("attention", "fwd", shape, dname, "flex-softmax", None,
                                note=f"peer setup: {type(exc).__name__}: {str(exc)[:120]}"))
        methods.append(("sdpa-flash-nobias", sdpa_peer(*spec)))
        if name == "one-block" and not quick:
            methods.append(("sdpa-dense-bias", sdpa_dense_bias_peer(b, L, z, e, causal)))
    refs = {}
    for backend, fn in methods:
        if backend == "flex-softmax-nobiasgrad" and any(r.shape == shape and r.backend == "flex-softmax" and r.ms
                                                        for r in rows if r.mode == "fwd+bwd"):
            continue  # only when Flex could not differentiate the bias (a fallback peer, labelled as such)
        note = ""
        try:
            if backend.startswith("reference-"):
                with torch.no_grad():
                    refs[backend.split("-", 1)[1]] = fn(*x)
            elif backend.startswith("triton-"):
                act = backend.split("-", 1)[1]
                with torch.no_grad():
                    out = fn(*x)
                    if act in refs:
                        note = f"max|out - ref| {(out.float() - refs[act].float()).abs().max().item():.2e}"
        except Exception as exc:  # an OOM of the reference at 16k must not stop the run
            note = f"{type(exc).__name__}: {str(exc)[:120]}"
        f, fb = fwd_bwd(fn, x)
        for mode, call, mult in (("fwd", f, 1), ("fwd+bwd", fb, 3)):
            r = measure(rows, call, device, op="attention", mode=mode, shape=shape, dtype=dname, backend=backend,
                        extra={"case": name})
            if r.ms:
                r.tflops = mult * flops / (r.ms * 1e-3) / 1e12
                r.note = r.note or note
                if backend == "triton-softmax" and name in ("LM", "LRA", "tiny-chunked") and profile is not None:
                    profile.append((r, call))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        from mega_kernels.triton.attention_common import tuned_configs

        for r in rows:
            if r.shape == shape and r.backend.startswith("triton"):
                r.extra["tuned_configs"] = tuned_configs()


def reference_of(rows):
    """Compare each triton row with the materialized reference of its activation when that was measured at
    its shape, every other row (and a triton row without one) with the softmax reference."""
    measured = {(r.shape, r.backend) for r in rows if r.ms}

    def ref(row):
        own = "reference-" + row.backend.split("-", 1)[1] if row.backend.startswith("triton-") else None
        return own if (row.shape, own) in measured else "reference-softmax"

    return ref


def check_targets(rows) -> list:
    """Print (and return) the issue's targets (H100/H200) against this run: PASS / FAIL / n/a lines. Every line of
    a case the run reached is printed, so a row that failed or never ran reads n/a, never as a missing line."""
    def row(case, mode, backend):
        return next((r for r in rows if r.extra.get("case") == case and r.mode == mode and r.backend == backend
                     and r.ms), None)

    def ms(case, mode, backend):
        r = row(case, mode, backend)
        return r and r.ms

    reached = {r.extra.get("case") for r in rows}
    lines = []

    def check(text, ok):
        lines.append(f"{'n/a ' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")

    lm = row("LM", "fwd", "triton-softmax")
    check(f"LM softmax fwd >= 250 useful TFLOP/s: {lm.tflops if lm and lm.tflops else float('nan'):.0f}",
          None if not (lm and lm.tflops) else lm.tflops >= 250)
    fallback = not ms("LM", "fwd+bwd", "flex-softmax") and ms("LM", "fwd+bwd", "flex-softmax-nobiasgrad")
    flex = "flex-softmax-nobiasgrad" if fallback else "flex-softmax"  # (the fallback when Flex cannot train the bias)
    for peer, factor in (("reference-softmax", 2.0), (flex, 4.0)):
        a, b = ms("LM", "fwd+bwd", "triton-softmax"), ms("LM", "fwd+bwd", peer)
        check(f"LM fwd+bwd >= {factor}x faster than {peer}: {b / a if a and b else float('nan'):.2f}x",
              None if not (a and b) else b / a >= factor)
    a, b = ms("LRA", "fwd+bwd", "triton-softmax"), ms("LRA", "fwd+bwd", "reference-softmax")
    check(f"LRA fwd+bwd >= 2.5x faster than the reference: {b / a if a and b else float('nan'):.2f}x",
          None if not (a and b) else b / a >= 2.5)
    for case in ("LM", "LRA", "long", "one-block"):
        if case not in reached:
            continue
        for mode in ("fwd", "fwd+bwd"):
            soft = ms(case, mode, "triton-softmax")
            for act in ("laplace", "relu2"):
                t = ms(case, mode, f"triton-{act}")
                check(f"{case} {mode} triton-{act} no slower than softmax (5% noise allowed): "
                      f"{t or float('nan'):.3f} vs {soft or float('nan'):.3f} ms",
                      None if not (soft and t) else t <= 1.05 * soft)
    long, double = row("long", "fwd+bwd", "triton-softmax"), row("long-double", "fwd+bwd", "triton-softmax")
    peak, double_peak = long and long.peak_mib, double and double.peak_mib
    check(f"long (B1 L16384 unchunked) fwd+bwd peak < 2 GiB: {peak or float('nan'):.0f} MiB",
          None if not peak else peak < 2048)
    # above the inputs, a peak linear in L doubles with L (less with a constant part); the allocator's rounding
    # is allowed 2.5%, while an L^2 term of a tenth of the peak would read 2.2
    check(f"long fwd+bwd peak linear in L: peak(L32768) / peak(L16384) <= 2.05: "
          f"{double_peak / peak if peak and double_peak else float('nan'):.3f}",
          None if not (peak and double_peak) else double_peak / peak <= 2.05)
    print("# targets\n" + "\n".join(lines))
    return lines


SUMMARY_BACKENDS = ("reference-softmax", "triton-softmax", "triton-laplace", "triton-relu2", "flex-softmax",
                    "flex-softmax-nobiasgrad", "sdpa-flash-nobias")


def summarize(path) -> None:
    """The LM rows (main methods), the kernel breakdowns and the targets, from a saved results file."""
    from benchmarks.harness import format_kernels, format_table, load_rows

    rows = load_rows(path)
    print(format_table([r for r in rows if r.extra.get("case") == "LM" and r.backend in SUMMARY_BACKENDS]))
    print(format_kernels(rows, top=4))
    check_targets(rows)


FIXED_KINDS = ("lse", "fwd", "decode", "dv", "dk", "dq", "dq_ds")   # what float32 launches (no autotuning)
AUTOTUNED_KINDS = ("fwd_e256", "fwd_e512", "dv_e512")               # 16-bit candidates beside "fwd" and "dv"


def compile_report(shape: str, dtype=torch.bfloat16, target=(90, 32), kinds=None):
    """Compile every attention kernel with its launcher's GPU config for sm_90 (no GPU needed): shared memory,
    registers, spill bytes and the SASS length of its longest loops (masked and interior key tiles) per
    (kernel, activation), read by `benchmarks.kernel_resources.report`, and its TF32 MMA instructions in the
    PTX (`tf32_mma`: none may exist for float32 inputs, whose dots are IEEE). `kinds` defaults to what the
    launchers can run in `dtype`: the autotuner's extra candidates only in 16 bits. Run with TRITON_INTERPRET
    unset."""
    if kinds is None:
        kinds = FIXED_KINDS + (AUTOTUNED_KINDS if dtype != torch.float32 else ())
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benchmarks.kernel_resources import report
    from mega_kernels.triton import attention_bwd as bw
    from mega_kernels.triton import attention_common as common
    from mega_kernels.triton import attention_fwd as fw

    zdim, edim, size = {"lm": (256, 2048, 1024), "lra": (64, 256, 128), "z128": (128, 512, 512)}[shape]
    pb = common.Problem(1, 4096, 4096, zdim, edim, size, size, 0, 1, max(16, triton.next_power_of_2(zdim)),
                        "ieee" if dtype == torch.float32 else "tf32")
    tname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    unit = ("s_qz", "s_kz", "s_ve", "s_oe", "s_de")          # specialised to 1 at launch, as Triton does
    f32 = ("BIAS", "LSE", "DELTA", "GB", "ACC", "M", "L")
    rows = []
    for kind, fn in (("lse", fw._lse_kernel), ("fwd", fw._fwd_kernel), ("fwd_e256", fw._fwd_kernel),
                     ("fwd_e512", fw._fwd_kernel),
                     ("decode", fw._decode_kernel), ("dv_e512", bw._dv_kernel),
                     ("dv", bw._dv_kernel), ("dk", bw._dk_kernel), ("dq", bw._dq_kernel),
                     ("dq_ds", bw._dq_ds_kernel)):
        if kind not in kinds:
            continue
        cfg = dict(common.config("dk" if kind == "dq_ds" else kind, pb, dtype))
        if kind == "dq_ds":
            cfg["T"] = cfg["BLOCK_N"]
        opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        cfg = {key: val for key, val in cfg.items() if key in fn.arg_names}
        for act in (0, 1):
            consts = dict(BLOCK_Z=pb.block_z, **cfg)
            if kind != "dq_ds":
                consts.update(ACT=act, **common.constants())
            if kind == "dk":
                consts.update(STORE_DS=True, BANDED=False)
            if fn is fw._fwd_kernel:   # as the launcher decides it
                consts["PRE_LSE"] = act == 0 and pb.edim >= fw.PRE_LSE_MIN_E
            if kind == "lse":
                consts = {key: val for key, val in consts.items() if key in fn.arg_names}
            if "DOT_PRECISION" in fn.arg_names:
                consts["DOT_PRECISION"] = pb.dot_precision
            consts.update({n: 1 for n in unit if n in fn.arg_names})
            sig, attrs = {}, {}
            for i, arg in enumerate(fn.arg_names):
                if arg in consts:
                    sig[arg] = "constexpr"
                elif arg.isupper() and arg not in ("Lq", "Lk", "Z", "E", "S", "W", "BAND_LO", "BAND_HI"):
                    sig[arg] = ("*fp32" if arg in f32 else "*i8" if arg == "KPM" else "*i32" if arg == "CNT"
                                else "*" + tname)
                    attrs[(i,)] = [["tt.divisibility", 16]]
                elif arg == "scale":
                    sig[arg] = "fp32"
                else:
                    sig[arg] = "i32"
                    if arg not in common.NO_SPECIALIZE:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", *target),
                                    options=opts)
            res = report(kernel)
            tf32 = sum("mma" in line and ".tf32" in line for line in kernel.asm["ptx"].splitlines())
            rows.append(dict(kernel=kind, act=act, shared=kernel.metadata.shared, registers=res["regs"],
                             spill_bytes=res["local"], loops=res["all_loops"][:3], tf32_mma=tf32, **cfg, **opts))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="LM and LRA shapes only, fewer peers")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--compile-report", choices=["lm", "lra", "z128"], help="print sm_90 compile resources as JSON")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--summary", metavar="JSON", help="print the LM rows and verdicts of a saved run, then exit")
    args = ap.parse_args(argv)
    if args.summary:
        summarize(args.summary)
        return 0
    if args.compile_report:
        os.environ.pop("TRITON_INTERPRET", None)
        print(json.dumps(compile_report(args.compile_report, getattr(torch, args.dtype))))
        return 0
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is imported
    from benchmarks.harness import fill_speedups, kernel_ms, save_rows

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    if not cuda and dtype == torch.bfloat16:
        dtype = torch.float16 if args.tiny else torch.float32  # the interpreter has no bfloat16
    tiny = args.tiny or not cuda                            # the interpreter runs tiny shapes only
    shapes = TINY if tiny else {k: SHAPES[k] for k in ("LM", "LRA")} if args.quick else SHAPES
    if cuda:  # Flex compiles per shape and gradient mode on one code object: more than dynamo's default 8
        cfg = torch._dynamo.config
        limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # (renamed in 2.6)
        setattr(cfg, limit, max(getattr(cfg, limit), 64))
    rows, profile = [], []
    name = "attention-tiny" if tiny else "attention"   # *-tiny-* results are git-ignored
    for case, spec in shapes.items():
        print(f"# {case}: {shape_str(*spec)}", file=sys.stderr, flush=True)
        bench_shape(rows, case, spec, device, dtype, args.quick or tiny, profile)
        fill_speedups(rows, reference_of(rows))
        save_rows(rows, name, device, quiet=True)   # rewritten after each shape: a timeout keeps what ran
    for r, call in profile:
        r.extra["kernel_ms"] = kernel_ms(call, device)
    save_rows(rows, name, device)
    check_targets(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
