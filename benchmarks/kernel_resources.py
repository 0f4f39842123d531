"""Static resource report of the Triton kernels, compiled for a GPU architecture on a machine without one.

    python benchmarks/kernel_resources.py [--arch 90] [--only ema]

For each kernel configuration the production launchers use, Triton compiles to a cubin (ptxas ships with
Triton) and cuobjdump reports registers per thread, spills (local memory) and shared memory; the SASS of the
hottest loop (the longest backward branch) is counted by instruction class. Registers bound occupancy
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


def compile_kernel(fn, types: dict, consts: dict, num_warps: int, arch: int):
    """Compile `fn` (a @triton.jit kernel): `types` maps argument names to Triton types ("*fp32", "i32"); every
    other argument is a constexpr taken from `consts` (None for an absent pointer)."""
    sig, ce = {}, {}
    for name in fn.arg_names:
        if name in types:
            sig[name] = types[name]
        else:
            sig[name], ce[name] = "constexpr", consts.get(name)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=ce)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))


def _tool(name, path, *flags):
    return subprocess.run([os.path.join(BIN, name), *flags, path], capture_output=True, text=True, check=True).stdout


def report(compiled, tmpdir="/tmp") -> dict:
    """Registers, local (spill) bytes, shared bytes and the instruction classes of the longest loop (`loop`,
    `ops`) and of the three longest (`loops`: (length, classes))."""
    path = os.path.join(tmpdir, f"mk_{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = _tool("cuobjdump", path, "--dump-resource-usage")
    regs, local, shared = (int(re.search(rf"{k}:(\d+)", usage).group(1)) for k in ("REG", "LOCAL", "SHARED"))
    sass = _tool("cuobjdump", path, "-sass")
    os.remove(path)
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)
    code = [(int(addr, 16), ins.strip()) for addr, ins in lines]
    loops = []  # (start, end) of every backward branch
    for addr, ins in code:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    loops.sort(key=lambda se: se[0] - se[1])

    def mix(start, end):
        body = [ins for addr, ins in code if start <= addr <= end]
        return len(body), Counter(re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0] for ins in body)

    measured = [mix(*se) for se in loops[:3]] or [(0, Counter())]
    loop, ops = measured[0]
    return dict(regs=regs, local=local, shared=shared, loop=loop, ops=ops, loops=measured)


def occupancy(regs: int, num_warps: int) -> int:
    """Resident warps per SM allowed by registers (allocation granularity 8 per thread, 64 warps max)."""
    per_warp = 32 * ((regs + 7) // 8 * 8)
    return min(64, 65536 // per_warp // num_warps * num_warps)


def ema_configs():
    """(label, kernel, types, constexprs, num_warps, time steps per loop iteration) of the EMA scan."""
    from mega_kernels.triton import ema_fwd as F
    for dt in ("fp32", "bf16"):
        types = {"u_ptr": f"*{dt}", "out_ptr": f"*{dt}", "a_ptr": "*fp32", "q_ptr": "*fp32", "c_ptr": "*fp32",
                 "omega_ptr": "*fp32", "buf_ptr": "*fp32", **{k: "i32" for k in "B L D N K CHUNK NDB".split()}}
        block_d = F.block_d_for(1024)
        consts = dict(EPI=F.EPI_SILU, BIDIR=False, REVERSE=False, MASK_IN=False, MASK_OUT=False, TRUNC=False,
                      HAS_S0=False, CARRY=True, LOOKBACK=False, WRITE_FINAL=False, STAGES=3, UNROLL=4,
                      BLOCK_N=16, BLOCK_D=block_d)
        yield f"ema scan_out fwd {dt} N16", F._scan_out_kernel, types, consts, max(1, block_d // 32), 4
        state_types = {k: v for k, v in types.items() if k in ("u_ptr", "a_ptr", "q_ptr", "buf_ptr")}
        state_types.update({k: "i32" for k in "B L D N K CHUNK NDB".split()})
        yield (f"ema chunk_state {dt} N16", F._chunk_state_kernel, state_types,
               dict(NDIR=1, REVERSE=False, MASK_IN=False, TRUNC=False, BLOCK_N=16, BLOCK_D=block_d, UNROLL=4),
               max(1, block_d // 32), 4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    print(f"sm_{args.arch}: registers/thread, spill bytes, shared bytes, warps/SM by registers, hottest loop "
          "(instructions per time step, main classes)")
    for label, fn, types, consts, warps, steps in ema_configs():
        r = report(compile_kernel(fn, types, consts, warps, args.arch))
        mix = ", ".join(f"{k} {v}" for k, v in r["ops"].most_common(6))
        print(f"{label:32s} reg {r['regs']:3d} spill {r['local']:3d} smem {r['shared']:5d} "
              f"warps/SM {occupancy(r['regs'], warps):2d}  loop {r['loop'] / steps:5.1f}/step  [{mix}]")


if __name__ == "__main__":
    main()
