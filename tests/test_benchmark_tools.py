"""The benchmark tools that run without a GPU: the static sm_90 report (benchmarks/kernel_resources.py) compiles
every EMA kernel and reports registers, spills and a hot loop (what GPU-less sessions use to compare kernel
versions); the profiler breakdown of the harness (kernel_ms) names where a call spends its time."""
import os
import re
import subprocess
import sys


def test_kernel_resources_reports_every_ema_kernel():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = re.findall(r"^ema .*? reg +(\d+) spill +(\d+) .*? loop +([\d.]+)/32el", res.stdout, re.M)
    # 4 sweep kernels x 2 dtypes, the bidirectional chunk-state and output sweeps (fp32), 2 tensor-core forward
    # passes x 3 precisions, the backward's 2 tensor-core scans, the tensor-core parameter sweep x 2 dtypes
    assert len(rows) == 20, res.stdout
    for regs, _, loop in rows:
        assert 0 < int(regs) <= 255 and float(loop) > 0


def test_kernel_ms_names_the_costly_op_first():
    import torch

    from benchmarks.harness import Row, format_kernels, kernel_ms

    a = torch.randn(512, 512, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    split = kernel_ms(lambda: ((a @ a @ a), b.add_(1.0)), "cpu", rep=3)  # ~270M multiply-adds against 8 adds
    assert next(iter(split)) == "aten::mm", split
    assert "aten::add_" in split
    assert list(split.values()) == sorted(split.values(), reverse=True) and all(v > 0 for v in split.values())
    text = format_kernels([Row("op", "fwd", "S", "fp64", "cpu", 1.0, extra={"kernel_ms": split})])
    assert "where the time goes: op fwd S fp64 cpu" in text and "aten::mm" in text


def test_bench_ema_target_lines():
    """bench_ema's target check reads the rows it should: verdicts for made-up rows on both sides of each line."""
    from benchmarks.bench_ema import check_targets
    from benchmarks.harness import Row

    uni, bi = "B8 L4096 D1024 N16 uni", "B8 L4096 D1024 N16 bi"
    rows = [Row("ema", "fwd", uni, "fp32", "triton", 0.10, speedup=30.0, floor_fraction=0.9),
            Row("ema", "fwd+bwd", uni, "fp32", "triton", 0.50, speedup=12.0, peak_mib=100.0),  # (100 + 256) / 512
            Row("ema", "fwd", bi, "fp32", "triton", 0.16),
            Row("ema", "fwd", uni, "bf16", "triton", 0.20, floor_fraction=0.3, speedup=26.0),
            Row("ema", "fwd+bwd", uni, "bf16", "triton", 0.60, speedup=19.0),
            Row("ema", "fwd+bwd", bi, "bf16", "triton", 0.80),
            Row("ema", "fwd", bi, "bf16", "triton", 0.20),
            Row("ema", "fwd+bwd", bi, "bf16", "triton[x]", 1.0, peak_mib=100.0),
            Row("ema", "fwd+bwd", bi, "fp32", "triton", 1.0, peak_mib=600.0, extra={"peak_over_x_y_dx_dy": 1.0}),
            Row("ema", "fwd", uni, "fp32", "cuda", 0.12, floor_fraction=0.75),
            Row("ema", "fwd", uni, "bf16", "triton[tc c256]", 0.08, floor_fraction=0.72),
            Row("ema", "fwd+bwd", uni, "fp32", "triton[tc c256]", 0.30, speedup=21.0),
            Row("ema", "fwd+bwd", "B1 L1048576 D1024 N16 uni", "bf16", "triton", None, note="OOM")]
    verdict = {line[6:].split(":")[0]: line[:4] for line in check_targets(rows)}
    assert verdict["triton fp32 fwd >= 0.70 of the copy floor"] == "PASS"
    assert verdict["triton bf16 fwd >= 0.70 of the copy floor"] == "FAIL"
    assert verdict["cuda fp32 fwd >= 0.70 of the copy floor"] == "PASS"
    assert verdict["cuda bf16 fwd >= 0.70 of the copy floor"] == "n/a "
    assert verdict["triton fp32 fwd >= 25x the FFT reference"] == "PASS"
    assert verdict["triton fp32 fwd+bwd >= 20x the FFT reference"] == "FAIL"
    assert verdict["triton fp32 fwd bidirectional / unidirectional <= 1.5"] == "FAIL"   # 1.6
    assert verdict["triton bf16 fwd bidirectional / unidirectional <= 1.5"] == "PASS"   # 1.0
    assert verdict["triton bf16 fwd >= 25x the FFT reference"] == "PASS"
    assert verdict["triton bf16 fwd+bwd >= 20x the FFT reference"] == "FAIL"
    assert verdict["triton bf16 fwd+bwd bidirectional / unidirectional <= 1.5"] == "PASS"   # 1.33
    assert verdict["triton fp32 fwd+bwd bidirectional / unidirectional <= 1.5"] == "FAIL"   # 2.0
    assert verdict[f"triton {uni} fp32 fwd+bwd peak <= 1.5x bytes(x, y, dx, dy)"] == "PASS"
    assert verdict[f"triton {bi} fp32 fwd+bwd peak <= 1.5x bytes(x, y, dx, dy)"] == "FAIL"   # 1.67, from the
    # shape and peak_mib (a stored ratio of an older formula is not trusted)
    assert verdict[f"triton {bi} bf16 fwd+bwd peak <= 1.5x bytes(x, y, dx, dy)"] == "n/a "  # a variant's row is
    # not the target's
    assert not any("B1 L65536" in line for line in verdict)  # a shape the run did not reach has no lines
    assert verdict["triton B1 L1048576 bf16 fwd+bwd runs"] == "FAIL"
    assert verdict["(variant) triton[tc c256] bf16 fwd >= 0.70 of the copy floor"] == "PASS"
    assert verdict["(variant) triton[tc c256] fp32 fwd >= 0.70 of the copy floor"] == "n/a "
    assert verdict["(variant) triton[tc c256] fp32 fwd+bwd >= 20x the FFT reference"] == "PASS"
    slower = "cuda no slower than triton (5% noise allowed), " + uni + " fp32 fwd"
    assert verdict[slower] == "FAIL"   # 0.10 / 0.12 ms
    assert verdict[slower + "+bwd"] == "n/a "   # no cuda row: a line that says so, not a missing line
    assert verdict["(info) cuda fp32 fwd >= 25x the FFT reference"] == "n/a "
    assert verdict[f"(info) cuda {uni} fp32 fwd+bwd peak <= 1.5x bytes(x, y, dx, dy)"] == "n/a "
    # the long row: PASS once it ran, n/a when the run never reached it
    rows[-1] = Row("ema", "fwd+bwd", "B1 L1048576 D1024 N16 uni", "bf16", "triton", 70.0)
    assert "PASS  triton B1 L1048576 bf16 fwd+bwd runs: 70.0 ms" in check_targets(rows)
    assert "n/a   triton B1 L1048576 bf16 fwd+bwd runs: not reached" in check_targets(rows[:-1])


def test_bench_attention_target_lines():
    """bench_attention's target check: made-up rows on both sides of each line; a case the run reached prints
    every line (n/a where a row failed); the long case's peak must double at most with L."""
    from benchmarks.bench_attention import check_targets
    from benchmarks.harness import Row

    def r(case, mode, backend, ms, **kw):
        return Row("attention", mode, case, "bfloat16", backend, ms, extra={"case": case}, **kw)

    rows = [r("LM", "fwd", "triton-softmax", 0.2, tflops=260.0), r("LM", "fwd+bwd", "triton-softmax", 1.0),
            r("LM", "fwd+bwd", "reference-softmax", 1.9), r("LM", "fwd+bwd", "flex-softmax", 4.5),
            r("LM", "fwd", "triton-laplace", 0.21), r("LM", "fwd", "triton-relu2", 0.3),
            r("LM", "fwd+bwd", "triton-laplace", None, note="OOM"),
            r("LRA", "fwd+bwd", "triton-softmax", 0.4), r("LRA", "fwd+bwd", "reference-softmax", 1.2),
            r("long", "fwd+bwd", "triton-softmax", 40.0, peak_mib=241.0),
            r("long-double", "fwd+bwd", "triton-softmax", 160.0, peak_mib=546.0)]
    verdict = {line[6:].split(":")[0]: line[:4] for line in check_targets(rows)}
    assert verdict["LM softmax fwd >= 250 useful TFLOP/s"] == "PASS"
    assert verdict["LM fwd+bwd >= 2.0x faster than reference-softmax"] == "FAIL"   # 1.9x
    assert verdict["LM fwd+bwd >= 4.0x faster than flex-softmax"] == "PASS"        # 4.5x
    assert verdict["LRA fwd+bwd >= 2.5x faster than the reference"] == "PASS"      # 3x
    assert verdict["LM fwd triton-laplace no slower than softmax (5% noise allowed)"] == "PASS"   # 0.21 vs 0.2
    assert verdict["LM fwd triton-relu2 no slower than softmax (5% noise allowed)"] == "FAIL"
    assert verdict["LM fwd+bwd triton-laplace no slower than softmax (5% noise allowed)"] == "n/a "  # it failed
    assert verdict["LM fwd+bwd triton-relu2 no slower than softmax (5% noise allowed)"] == "n/a "   # never ran
    assert not any(line.startswith("one-block") for line in verdict)   # not reached: no lines
    assert verdict["long (B1 L16384 unchunked) fwd+bwd peak < 2 GiB"] == "PASS"
    assert verdict["long fwd+bwd peak linear in L"] == "FAIL"   # 546 / 241 = 2.27: an L^2 term
    rows[-1] = r("long-double", "fwd+bwd", "triton-softmax", 160.0, peak_mib=480.0)
    assert "PASS  long fwd+bwd peak linear in L" in "\n".join(check_targets(rows))   # 1.99
    # Flex without the bias gradient is the peer only when Flex could not train the bias
    rows[3] = r("LM", "fwd+bwd", "flex-softmax-nobiasgrad", 3.0)
    assert "FAIL  LM fwd+bwd >= 4.0x faster than flex-softmax-nobiasgrad" in "\n".join(check_targets(rows))


def test_summaries_judge_a_saved_run(tmp_path, monkeypatch, capsys):
    """--summary reads the JSON a run rewrites after each shape: a run cut short is still judged from it."""
    from benchmarks import bench_attention, bench_ema
    from benchmarks.harness import Row, load_rows, save_rows

    monkeypatch.setenv("MEGA_GIT_COMMIT", "test")
    uni = "B8 L4096 D1024 N16 uni"
    rows = [Row("ema", "fwd", uni, "fp32", "triton", 0.1, floor_fraction=0.8, extra={"kernel_ms": {"k": 0.09}}),
            Row("ema", "fwd", uni, "fp32", "reference", 2.5)]
    path = save_rows(rows, "bench_ema", "cpu", out_dir=str(tmp_path), quiet=True)
    assert load_rows(path) == rows
    bench_ema.main(["--summary", path])
    out = capsys.readouterr().out
    assert "PASS  triton fp32 fwd >= 0.70 of the copy floor: 0.80" in out
    assert "where the time goes: ema fwd " + uni in out and "reference" in out
    rows = [Row("attention", "fwd", "S", "bfloat16", "triton-softmax", 0.2, tflops=100.0, extra={"case": "LM"})]
    path = save_rows(rows, "attention", "cpu", out_dir=str(tmp_path), quiet=True)
    assert bench_attention.main(["--summary", path]) == 0
    assert "FAIL  LM softmax fwd >= 250 useful TFLOP/s: 100" in capsys.readouterr().out


def test_memcheck_cases_run(monkeypatch, capsys):
    """benchmarks/memcheck_cases.py, which gpu_check.sh runs under compute-sanitizer, runs end to end (two EMA
    variants, the decoding step, one attention case and the banded long-block backward here; all of them on a
    GPU), and its limits are restored after the banded case."""
    from benchmarks import memcheck_cases as mc
    from mega_kernels.triton import attention_bwd as bwd

    bands = []
    real = bwd._bias_bands
    monkeypatch.setattr(bwd, "_bias_bands", lambda *a, **kw: bands.append(real(*a, **kw)) or bands[-1])
    monkeypatch.setattr(mc, "EMA_CASES", [mc.EMA_CASES[0], mc.EMA_CASES[3]])  # look-back; bi on tensor cores
    monkeypatch.setattr(mc, "ATTENTION_CASES", mc.ATTENTION_CASES[:1])
    limits = bwd.DS_SCRATCH_LIMIT_BYTES, bwd._bias_bands
    mc.main()
    out = capsys.readouterr().out
    assert "memcheck cases done on" in out and "3 EMA, 4 attention" in out
    assert [len(b) > 1 for b in bands] == [False] * 3 + [True]
    assert (bwd.DS_SCRATCH_LIMIT_BYTES, bwd._bias_bands) == limits


def test_float32_attention_has_no_tf32_dots():
    """Every attention kernel compiled for float32 inputs (sm_90, the launchers' configs) does its dots in IEEE
    float32: a tl.dot without input_precision would be TF32 on a GPU (Triton's default), which the interpreter's
    exact matmul cannot show. At Z 256 none spills either."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch\nfrom benchmarks.bench_attention import compile_report\n"
            "for r in compile_report('lm', dtype=torch.float32): print(r['kernel'], r['act'], r['tf32_mma'], "
            "r['spill_bytes'])")
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines()]
    assert len(rows) == 14 and {r[0] for r in rows} == {"lse", "fwd", "decode", "dv", "dk", "dq", "dq_ds"}, res.stdout
    assert all(r[2] == "0" for r in rows), res.stdout
    # Z 256 (the widest q tile): float32 tiles once spilled 2.4-3 KB per thread in dV, dK and dQ
    assert all(int(r[3]) == 0 for r in rows), res.stdout
