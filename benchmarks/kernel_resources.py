"""Static resource report of the Triton kernels, compiled for a GPU architecture on a machine without one.

    python -m benchmarks.kernel_resources [--arch 90] [--cuda] [--attention lm]

For each kernel configuration the production launchers use, Triton compiles to a cubin (ptxas ships with
Triton) and cuobjdump reports registers per thread, spills (local or stack bytes) and shared memory; the SASS
of the hottest loop (see `report`) is counted by instruction class. Registers bound occupancy
(65536 per SM / (32 x registers) warps), and the loop's instruction count per time step bounds the issue
rate, so this predicts GPU behaviour between GPU sessions; it measures nothing (NOTES.md keeps the two apart).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_kernel(fn, types: dict, consts: dict, num_warps: int, arch: int, divisible=()):
    """Compile `fn` (a @triton.jit kernel): `types` maps argument names to Triton types ("*fp32", "i32"); every
    other argument is a constexpr taken from `consts` (else its default; None for an absent pointer). `divisible`:
    arguments Triton may take as multiples of 16 (pointers: 16-byte aligned), as it specializes them at launch.
    consts["maxnreg"], if given, is the launch's register cap (not an argument)."""
    sig, ce = {}, {}
    defaults = {p.name: p.default for p in fn.params if p.has_default}
    for name in fn.arg_names:
        if name in types:
            sig[name] = types[name]
        else:
            sig[name], ce[name] = "constexpr", consts.get(name, defaults.get(name))
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in divisible}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=ce, attrs=attrs)
    options = dict(num_warps=num_warps)
    if consts.get("maxnreg"):
        options["maxnreg"] = consts["maxnreg"]
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name, path, *flags):
    return subprocess.run([os.path.join(BIN, name), *flags, path], capture_output=True, text=True, check=True).stdout


def report(compiled, tmpdir="/tmp") -> dict:
    """Registers, local (spill) bytes, shared bytes and the instruction classes of the hot loop (`loop`, `ops`;
    see below), of the three longest innermost loops (`loops`: (length, classes)) and the length of
    every loop, longest first (`all_loops`)."""
    path = os.path.join(tmpdir, f"mk_{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = _tool("cuobjdump", path, "--dump-resource-usage")
    regs, stack, local, shared = (int(re.search(rf"{k}:(\d+)", usage).group(1))
                                  for k in ("REG", "STACK", "LOCAL", "SHARED"))
    local = max(local, stack)  # register spills land in the stack frame
    sass = _tool("cuobjdump", path, "-sass")
    os.remove(path)
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)
    code = [(int(addr, 16), ins.strip()) for addr, ins in lines]
    loops = []  # (start, end) of every backward branch
    for addr, ins in code:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    every = sorted(loops, key=lambda se: se[0] - se[1])
    loops = sorted(inner, key=lambda se: se[0] - se[1])  # innermost loops, longest first

    def mix(start, end):
        body = [ins for addr, ins in code if start <= addr <= end]
        return len(body), Counter(re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0] for ins in body)

    measured = [mix(*se) for se in loops[:3]] or [(0, Counter())]
    # the hot loop: the longest innermost one, or the longest with tensor-core instructions where some have them
    # (a kernel's epilogue can compile to a longer loop that runs once); an upper bound where LLVM unrolled a
    # scalar tail loop longer than the main loop. Where LLVM unrolled a tensor-core loop k times (leaving a
    # remainder copy with 1/k of its HMMA), its count is divided by k, so it stays per iteration of the source.
    mma = [m for m in map(lambda se: mix(*se), loops) if m[1]["HMMA"]]
    loop, ops = mma[0] if mma else measured[0]
    if mma and ops["HMMA"] % min(m[1]["HMMA"] for m in mma) == 0:
        loop //= ops["HMMA"] // min(m[1]["HMMA"] for m in mma)
    return dict(regs=regs, local=local, shared=shared, loop=loop, ops=ops, loops=measured,
                all_loops=[mix(*se)[0] for se in every])


def occupancy(regs: int, num_warps: int) -> int:
    """Resident warps per SM allowed by registers (allocation granularity 8 per thread, 64 warps max)."""
    per_warp = 32 * ((regs + 7) // 8 * 8)
    return min(64, 65536 // per_warp // num_warps * num_warps)


def ema_configs():
    """(label, kernel, types, constexprs, num_warps, warp-steps per loop iteration, arguments divisible by 16) of
    the EMA kernels with the launchers' GPU settings, unidirectional, no mask, N = 16. A warp-step is 32 elements
    (one time step of a warp's 32 channels), so every kernel's loop is reported per 32 elements."""
    import torch

    from mega_kernels.triton import ema_bwd as B
    from mega_kernels.triton import ema_fwd as F
    from mega_kernels.triton import ema_sweep as SW
    from mega_kernels.triton import ema_tc as TC
    sizes = {k: "i32" for k in "B L D N K CHUNK NDB".split()}
    block_d = F.block_d_for(1024)
    warps = max(1, block_d // 32)
    def cap(kernel, bidirectional, epilogue):  # the launcher's register cap (no mask or truncation, chunks)
        return F._register_cap(kernel, bidirectional, epilogue, False, False, True, False, block_d, warps, 4, 16)

    scan = dict(BIDIR=False, REVERSE=False, MASK_IN=False, MASK_OUT=False, TRUNC=False, HAS_S0=False, CARRY=True,
                LOOKBACK=False, WRITE_FINAL=False, UNROLL=4, BLOCK_N=16, BLOCK_D=block_d)
    for dt in ("fp32", "bf16"):
        types = {"u_ptr": f"*{dt}", "out_ptr": f"*{dt}", "a_ptr": "*fp32", "q_ptr": "*fp32", "c_ptr": "*fp32",
                 "omega_ptr": "*fp32", "buf_ptr": "*fp32", **sizes}
        yield f"ema fwd scan_out {dt}", F._scan_out_kernel, types, dict(scan, EPI=SW.EPI_SILU), warps, 4, ()
        yield (f"ema fwd chunk_state {dt}", F._chunk_state_kernel,
               {k: v for k, v in types.items() if k in ("u_ptr", "a_ptr", "q_ptr", "buf_ptr") or v == "i32"},
               dict(NDIR=1, REVERSE=False, MASK_IN=False, TRUNC=False, BLOCK_N=16, BLOCK_D=block_d, UNROLL=4,
                    maxnreg=cap("states", False, SW.EPI_SILU)), warps, 4, ())
        if dt == "fp32":  # bidirectional: both directions' chunk states from one read, then the two walks
            yield (f"ema fwd chunk_state bi {dt}", F._chunk_state_kernel,
                   {k: v for k, v in types.items() if k in ("u_ptr", "a_ptr", "q_ptr", "buf_ptr") or v == "i32"},
                   dict(NDIR=2, REVERSE=False, MASK_IN=False, TRUNC=False, BLOCK_N=16, BLOCK_D=block_d, UNROLL=4,
                        BOTH=True), warps, 4, ())
            yield (f"ema fwd scan_out bi {dt}", F._scan_out_kernel, dict(types, acc_ptr="*fp32"),
                   dict(scan, EPI=SW.EPI_SILU, BIDIR=True, maxnreg=cap("out", True, SW.EPI_SILU)), warps, 4, ())
        yield (f"ema bwd scan_out dsilu {dt}", F._scan_out_kernel,
               dict(types, out_ptr="*fp32", gy_ptr=f"*{dt}", dom_ptr="*fp32"),
               dict(scan, EPI=SW.EPI_DSILU, maxnreg=cap("out", False, SW.EPI_DSILU)), warps, 4, ())
        yield (f"ema bwd param_grad {dt}", B._param_grad_kernel,
               {"x_ptr": f"*{dt}", "g_ptr": "*fp32", "a_ptr": "*fp32", "q_ptr": "*fp32", "buf_ptr": "*fp32",
                "part_ptr": "*fp32", "adj_ptr": "*fp32", "GROUP": "i32", **sizes},
               dict(NDIR=1, MASK_IN=False, TRUNC=False, HAS_S=False, HAS_BUF=True, UNROLL=4, BLOCK_N=16,
                    BLOCK_D=block_d), warps, 4, ())
    # the tensor-core forward (ema_scan(tensor_cores=True)) at its launcher defaults, D a multiple of 16
    tc_types = {"u_ptr": "*bf16", "keep_ptr": "*u8", "out_ptr": "*bf16", "acc_ptr": "*fp32", "op_ptr": "*fp32",
                "omega_ptr": "*fp32", "s0_ptr": "*fp32", "buf_ptr": "*fp32", "flag_ptr": "*i32", "ticket_ptr": "*i32",
                **{k: "i32" for k in "B L D N CHUNK NDB NCOL".split()}}
    tc_warps, tc_nb, fp32_bd = 8, 16, TC.default_block_d(torch.float32, False)
    aligned = tuple(tc_types) + ("D",)
    torch_dt = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for dt, prec in (("fp32", "split"), ("bf16", "split"), ("bf16", "tf32")):
        types = dict(tc_types, u_ptr=f"*{dt}", out_ptr=f"*{dt}")
        consts = dict(NDIR=1, MASK_IN=False, HAS_S0=False, CARRY=True, LOOKBACK=False, EVEN=True, PREC=prec,
                      EXACT_X=dt != "fp32", SUB=TC.SUB, BLOCK_N=16, NB=tc_nb)
        for mode in ("states", "out"):
            bd = TC.default_block_d(torch_dt[dt], False)
            yield (f"ema fwd tc {mode} {dt} {prec}", TC._tc_scan_kernel, types,
                   dict(consts, STATES=mode == "states", BD=bd), tc_warps, bd * TC.SUB * tc_nb // (32 * tc_warps),
                   tuple(n for n in aligned if n.endswith("_ptr") or n == "D"))
    # the backward's two scans on tensor cores (ema_bwd(tensor_cores=True)): z and dL/dz from the forward's chunk
    # states, and the adjoint (reversed rows, g in, dx out)
    bwd_types = dict(tc_types, u_ptr="*fp32", out_ptr="*fp32", gy_ptr="*fp32", dom_ptr="*fp32")
    bwd = dict(NDIR=1, MASK_IN=False, HAS_S0=False, CARRY=True, LOOKBACK=False, EVEN=True, PREC="split",
               EXACT_X=False, SUB=TC.SUB, BLOCK_N=16, BD=fp32_bd, NB=tc_nb, STATES=False)
    for label, consts in (("dsilu", dict(bwd, EPI=SW.EPI_DSILU)), ("dx", dict(bwd, EPI=SW.EPI_DX, REVERSE=True))):
        yield (f"ema bwd tc {label} fp32", TC._tc_scan_kernel, bwd_types, consts, tc_warps,
               fp32_bd * TC.SUB * tc_nb // (32 * tc_warps),
               tuple(n for n in bwd_types if n.endswith("_ptr")) + ("D",))
    # the tensor-core parameter sweep of the backward
    from mega_kernels.triton import ema_tc_bwd as TB
    for dt in ("fp32", "bf16"):
        types = {"x_ptr": f"*{dt}", "keep_ptr": "*u8", "g_ptr": "*fp32", "a_ptr": "*fp32", "q_ptr": "*fp32",
                 "op_ptr": "*fp32", "s_ptr": "*fp32", "buf_ptr": "*fp32", "part_ptr": "*fp32", "adj_ptr": "*fp32",
                 **{k: "i32" for k in "B L D N CHUNK GROUP NDB NCOL".split()}}
        consts = dict(NDIR=1, MASK_IN=False, HAS_S=False, HAS_BUF=True, EVEN=True, EXACT_X=dt != "fp32",
                      SUB=TC.SUB, BLOCK_N=16, BD=TB.BLOCK_D, NB=tc_nb)
        yield (f"ema bwd tc param {dt}", TB._tc_param_kernel, types, consts, TB.NUM_WARPS,
               TB.BLOCK_D * TC.SUB * tc_nb // (32 * TB.NUM_WARPS),
               tuple(n for n in types if n.endswith("_ptr")) + ("D",))


CUDA_KERNEL_FILES = ("csrc/ema/ema_cuda_f32.cu", "csrc/ema/ema_cuda_f16.cu", "csrc/ema/ema_cuda_bf16.cu")


def cuda_report(paths=CUDA_KERNEL_FILES, arch: int = 90) -> list:
    """(kernel, registers, stack bytes, shared bytes) of every kernel in the .cu files compiled by nvcc for
    `arch` (flags of scripts/compile_cuda.sh; about a minute each), names demangled when c++filt is present."""
    import shutil
    import tempfile
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    usage = ""
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(paths):
            cubin = os.path.join(tmp, f"k{i}.cubin")
            subprocess.run([nvcc, "-std=c++20", "-O3", "-cubin", f"-arch=sm_{arch}", "-Icsrc", path, "-o", cubin],
                           check=True, capture_output=True, text=True)
            usage += _tool("cuobjdump", cubin, "--dump-resource-usage")
    rows = []
    for name, body in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage):
        if shutil.which("c++filt"):  # "void ns::(anonymous namespace)::kernel<T, 16>(args)" -> "kernel<T, 16>"
            name = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
            name = re.sub(r"^void |\(anonymous namespace\)::|\w+::", "", name).split("(")[0]
        regs, stack, shared = (int(re.search(rf"{k}:(\d+)", body).group(1)) for k in ("REG", "STACK", "SHARED"))
        rows.append((name, regs, stack, shared))
    return sorted(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--cuda", action="store_true", help="also the CUDA EMA kernels (nvcc, about a minute)")
    parser.add_argument("--attention", choices=["lm", "lra"],
                        help="also the attention kernels at that shape (benchmarks.bench_attention.compile_report)")
    args = parser.parse_args()
    print(f"sm_{args.arch}: registers/thread, spill bytes, shared bytes, warps/SM by registers, longest loop "
          "(instructions per 32 elements, main classes)")
    for label, fn, types, consts, warps, steps, divisible in ema_configs():
        compiled = compile_kernel(fn, types, consts, warps, args.arch, divisible)
        r = report(compiled)
        mix = ", ".join(f"{k} {v}" for k, v in r["ops"].most_common(5))
        print(f"{label:30s} reg {r['regs']:3d} spill {r['local']:3d} smem {compiled.metadata.shared:6d} "
              f"warps/SM {occupancy(r['regs'], warps):2d}  loop {r['loop'] / steps:6.1f}/32el  [{mix}]")
    if args.cuda:
        print("cuda: kernel, registers, stack (spill) bytes, shared bytes")
        for name, regs, stack, shared in cuda_report(arch=args.arch):
            print(f"{name[:60]:60s} reg {regs:3d} stack {stack:4d} smem {shared:6d}")
    if args.attention:
        from benchmarks.bench_attention import compile_report
        print("attention: kernel, activation (0 softmax), registers, spill bytes, shared bytes, longest loops "
              "(SASS instructions per key tile: masked, interior)")
        for row in compile_report(args.attention):
            print(f"{row['kernel']:10s} {row['act']} reg {row['registers']:3d} spill {row['spill_bytes']:3d} "
                  f"smem {row['shared']:6d} loops {row['loops']}")


if __name__ == "__main__":
    main()
