"""The triton backend of `ops.attention` (issue 4) against the float64 reference.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py) on tiny shapes, in
float32, float16 and bfloat16; on a GPU the same tests run compiled, plus the `gpu` tests (bfloat16, large E, the LM
tile configuration, torch.compile with inductor, bitwise determinism). Every kernel output is allocated
NaN-poisoned (the `poison` fixture) so a kernel that forgets to write a row or tile fails.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import (ATTN_CASES, assert_close_to_reference, attention_inputs, guarded, in_ci, padding_masks,
                     poison_empty)
from mega_kernels import ops
from mega_kernels.reference.attention import ACTIVATIONS
from mega_kernels.reference.attention import attention as reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it; never skip silently in CI
    pytest.fail("the triton attention tests need a GPU or TRITON_INTERPRET=1", pytrace=False)

from mega_kernels.ops.attention_triton import attention as triton_attention  # noqa: E402
from mega_kernels.triton.attention_bwd import attention_bwd  # noqa: E402
from mega_kernels.triton.attention_fwd import attention_fwd  # noqa: E402

# ATTN_CASES plus: queries not aligned to the chunks (Lq < Lk, chunked), several key tiles in one block, a
# tile spanning many small chunks (chunk 5, the last one partial), and query tiles whose last rows' chunks reach
# into a later key tile than their first row's (chunk 5 at L 70: the backward's key-tile range per query tile).
CASES = ATTN_CASES + [(2, 37, 100, 16, 24, 32), (1, 70, 70, 24, 8, None), (3, 23, 23, 16, 8, 5),
                      (2, 70, 70, 16, 8, 5)]
# On a GPU every new (Z, E, stride divisibility, dtype, activation) compiles five kernels afresh: the tiny-shape
# matrices run on a few cases there (the `gpu` tests add larger shapes), all of them under the interpreter.
FP16_CASES = [ATTN_CASES[1], ATTN_CASES[3], ATTN_CASES[5]]
if HAS_CUDA:  # the `gpu` matrix below covers Lq = 1, float16 and more shapes compiled
    CASES = [(2, 37, 100, 16, 24, 32)]
    FP16_CASES = []
GPU_LEAN = pytest.mark.skipif(HAS_CUDA, reason="CPU-side check; on a GPU it would only add compile time")
# activations for tests that compile a kernel per activation: all on the CPU, one on a GPU
SOME_ACTIVATIONS = ACTIVATIONS[:1] if HAS_CUDA else ACTIVATIONS
GRAD_NAMES = ("dq", "dk", "dv", "drel_bias")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Float tensors from torch.empty / empty_like start as NaN while a test runs."""
    poison_empty(monkeypatch)


def _strided(t):
    """The same values as a non-contiguous view: a column slice of a wider tensor (how the modules split one
    projection into q, k, v) for 3-d tensors, batch-major strides swapped via a transposed copy otherwise."""
    if t.dim() != 3:
        return t
    wide = torch.nn.functional.pad(t, (2, 3))[..., 2:-3]
    return wide.transpose(0, 1).contiguous().transpose(0, 1) if t.shape[0] > 1 else wide


def check_case(case, activation, causal, mask, dtype=torch.float32, grads=True, label="", strided=False,
               nan_guard=False):
    """Output and (optionally) all four gradients of the triton backend vs the float64 reference, with the
    tolerance rule (the reference run in `dtype` gives the error budget). strided: q, k, v reach the kernels
    as non-contiguous views (`_strided`); nan_guard: q, k, v and rel_bias sit between NaNs (`guarded`)."""
    chunk = case[5]
    kw = dict(activation=activation, chunk_size=chunk, causal=causal)
    x64 = [t.requires_grad_() for t in attention_inputs(*case)]
    xlp = [t.detach().to(dtype).requires_grad_() for t in x64]
    xk = [t.detach().to(dtype).to(DEVICE).requires_grad_() for t in x64]
    mask_cpu = None if mask is None else mask.cpu()
    ref64 = reference(*x64, key_padding_mask=mask_cpu, **kw)
    reflp = reference(*xlp, key_padding_mask=mask_cpu, **kw)
    view = guarded if nan_guard else _strided if strided else (lambda t: t)
    out = ops.attention(*[view(t) for t in xk], key_padding_mask=mask, backend="triton", **kw)
    assert out.dtype == dtype
    name = f"{case} {activation} causal={causal} {label}"
    assert_close_to_reference(f"{name} out", out.cpu(), ref64, reflp)
    if not grads:
        return
    g = torch.randn_like(ref64)
    d64 = torch.autograd.grad(ref64, x64, g)
    dlp = torch.autograd.grad(reflp, xlp, g.to(dtype))
    dk = torch.autograd.grad(out, xk, g.to(dtype).to(DEVICE))
    for gname, a, r, lp in zip(GRAD_NAMES, dk, d64, dlp):
        assert a.dtype == dtype
        assert_close_to_reference(f"{name} {gname}", a.cpu(), r, lp)


# -- forward and gradients vs the float64 reference -------------------------------------------------------

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_float32(case, activation):
    """Every padding kind (none, right, left, a whole padded chunk), causal and not: non-causal with none /
    right / whole chunk, causal with left (rows with no visible key) and the whole chunk (or none)."""
    masks = padding_masks(case[0], case[2], case[5], device=DEVICE)
    whole = "whole_chunk" if "whole_chunk" in masks else None
    for causal, names in ((False, ("none", "right", whole)), (True, ("left", whole or "none"))):
        for mname in filter(None, names):
            check_case(case, activation, causal, masks[mname], label=mname)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", FP16_CASES, ids=str)
def test_matches_reference_16bit(case, activation, dtype):
    """float16 and bfloat16 (under the interpreter, whose bfloat16 dots and rounding mega_kernels/triton patches)."""
    masks = padding_masks(case[0], case[2], case[5], device=DEVICE)
    check_case(case, activation, True, masks["left"], dtype=dtype, label="left")
    check_case(case, activation, False, masks["right"], dtype=dtype, label="right")


@pytest.mark.parametrize("activation", SOME_ACTIVATIONS)
def test_dq_recompute_path_matches_reference(activation, monkeypatch):
    """dq without the stored dS tiles (the path long unchunked blocks take to keep memory linear in L)."""
    from mega_kernels.triton import attention_bwd as bwd

    monkeypatch.setattr(bwd, "DS_SCRATCH_LIMIT_BYTES", 0)
    case = (2, 37, 100, 16, 24, 32)
    masks = padding_masks(case[0], case[2], case[5], device=DEVICE)
    check_case(case, activation, True, masks["left"], label="left")
    check_case(case, activation, False, masks["whole_chunk"], label="whole_chunk")
    unmasked = (1, 70, 70, 24, 8, None)                    # unchunked, no padding: interior key tiles
    check_case(unmasked, activation, True, None, label="none")
    check_case(unmasked, activation, False, None, label="none")


@pytest.mark.parametrize("offsets, dtype", [(1, torch.float32), (3, torch.float32), (2, torch.bfloat16)], ids=str)
def test_bias_gradient_in_bands_matches_reference(offsets, dtype, monkeypatch):
    """Long blocks: the dK launches cover bands of `offsets` tile offsets each (their bias-gradient scratch would
    otherwise grow as L^2), dk summed over the bands in float32; all gradients stay the reference's."""
    from mega_kernels.triton import attention_bwd as bwd

    monkeypatch.setattr(bwd, "DS_SCRATCH_LIMIT_BYTES", 0)   # the path long blocks take
    seen, tiles = [], []
    real = bwd._bias_bands

    def spy(pb, t, n_tiles, single):
        tiles.append(t)
        seen.append(real(pb, t, n_tiles, single, budget=pb.bsz * n_tiles * t * 4 * (offsets + 1)))
        return seen[-1]

    monkeypatch.setattr(bwd, "_bias_bands", spy)
    unchunked = (1, 70, 70, 24, 8, None)
    for causal in (True, False):
        check_case(unchunked, "softmax", causal, None, label="bands", dtype=dtype)
    case = (2, 37, 100, 16, 24, 32)
    check_case(case, "laplace", True, padding_masks(case[0], case[2], case[5], device=DEVICE)["left"],
               label="bands", dtype=dtype)
    t = tiles[0]   # (32 under the interpreter and in float32; 64 in 16 bit on a GPU)
    reach = -(-69 // t)
    assert seen[0] == [(lo, min(lo + offsets - 1, 0)) for lo in range(-reach, 1, offsets)]   # causal: m <= 0
    assert seen[1] == [(lo, min(lo + offsets - 1, reach)) for lo in range(-reach, reach + 1, offsets)]
    assert len(seen) == 3 and len(seen[0]) > 1


@pytest.mark.parametrize("case", [(2, 100, 100, 64, 40, 32), (1, 70, 70, 24, 8, None), (2, 37, 100, 16, 24, 32),
                                  (3, 23, 23, 16, 8, 5), (2, 33, 33, 16, 300, None)], ids=str)
def test_softmax_lse_prepass(case, monkeypatch):
    """The wide-E softmax path (an lse pre-pass, then E tiles without online rescaling), forced on small shapes:
    every padding kind, causal and not, several E tiles (E 300)."""
    from mega_kernels.triton import attention_fwd as fwd

    monkeypatch.setattr(fwd, "PRE_LSE_MIN_E", 0)
    masks = padding_masks(case[0], case[2], case[5], device=DEVICE)
    for causal, names in ((False, ("none", "right", "whole_chunk")), (True, ("none", "left"))):
        for mname in names:
            if mname in masks:
                check_case(case, "softmax", causal, masks[mname], label=mname)


def _grads(backend, dtype, inputs, g, **kw):
    """out and (dq, dk, dv, d rel_bias) of ops.attention on float64 `inputs` cast to dtype (rel_bias float32)."""
    x = [t.to(DEVICE if backend == "triton" else "cpu", dtype if i < 3 or dtype == torch.float64 else torch.float32)
         .detach().requires_grad_() for i, t in enumerate(inputs)]
    out = ops.attention(*x, backend=backend, **kw)
    return [t.cpu() for t in (out, *torch.autograd.grad(out, x, g.to(out.device, out.dtype)))]


@pytest.mark.parametrize("lq", [24, 1], ids=["Lq24", "decode"])
@pytest.mark.parametrize("pre_lse", [False, True])
@pytest.mark.parametrize("scale", [3.0, 10.0, 30.0])
def test_softmax_at_large_scores(scale, pre_lse, lq, monkeypatch):
    """Scores of |s| ~ 1e2-1e3 (q, k scaled up; rows near one-hot) in float32: the backward recomputes each p from
    the forward's log2-domain scores and lse2 (a natural-log lse, converted twice, was off by ulp(|s|): 100x the
    reference's own error in dv), and the pre-pass forward divides by the row sum at the end (p = 2^(s - lse2)
    rounded lse2 to ulp(|s|)). A decoding step (Lq = 1) sums q.k as a vector in its forward, so its backward
    takes the statistics from the tiled pre-pass kernel. out and dv by the tolerance rule; dq, dk and d rel_bias
    are ~0 here by cancellation (delta = dO . out against sum_j p dP), which leaves them only the bare atol."""
    from mega_kernels.triton import attention_fwd as fwd

    monkeypatch.setattr(fwd, "PRE_LSE_MIN_E", 0 if pre_lse else 1 << 30)
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 24, 16, generator=gen, dtype=torch.float64) * scale for _ in range(2))
    v, g = (torch.randn(2, 24, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    q, g = q[:, -lq:], g[:, -lq:]
    inputs = (q, k, v, torch.randn(47, generator=gen, dtype=torch.float64))
    r64, r32, tri = (_grads(b, dt, inputs, g) for b, dt in
                     (("reference", torch.float64), ("reference", torch.float32), ("triton", torch.float32)))
    for i, name in ((0, "out"), (3, "dv")):
        assert_close_to_reference(f"scale {scale} {name}", tri[i], r64[i], r32[i])


def test_float16_dq_recompute_path_scales_before_rounding(monkeypatch):
    """The dq recompute path (long unchunked blocks) rounds c dS to float16, as the stored-dS path does: dS alone
    (relu2' ~ 10 times dP ~ 1e4) passes float16's range where c dS = dS / n and dq do not (it gave inf)."""
    from mega_kernels.triton import attention_bwd as bwd

    monkeypatch.setattr(bwd, "DS_SCRATCH_LIMIT_BYTES", 0)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 40, 16, generator=gen, dtype=torch.float64) * 0.1 for _ in range(2))
    v = torch.randn(1, 40, 20, generator=gen, dtype=torch.float64)
    g = torch.randn(1, 40, 20, generator=gen, dtype=torch.float64) * 2000
    inputs = (q, k, v, torch.full((79,), 5.0, dtype=torch.float64))
    r64, r16, tri = (_grads(b, dt, inputs, g, activation="relu2") for b, dt in
                     (("reference", torch.float64), ("reference", torch.float16), ("triton", torch.float16)))
    assert_close_to_reference("dq", tri[1], r64[1], r16[1])


@pytest.mark.parametrize("where", ["all", "one diagonal"])
def test_softmax_bias_beyond_the_log2_range(where):
    """rel_bias entries beyond FLT_MAX / log2(e) (~2.36e38): bias log2(e) overflowed to -inf (a row of them read
    as a row with no key: zeros where the reference averages) or +inf (NaN). They are clamped to 1e38."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 4, 8, generator=gen) for _ in range(2))
    v = torch.randn(1, 4, 4, generator=gen)
    bias = torch.full((7,), torch.finfo(torch.float32).min) if where == "all" else \
        torch.randn(7, generator=gen).index_fill_(0, torch.tensor([4]), 3e38)
    with torch.no_grad():
        out = ops.attention(*(t.to(DEVICE) for t in (q, k, v, bias)), backend="triton").cpu()
        r64 = reference(q.double(), k.double(), v.double(), bias.double())
        r32 = reference(q, k, v, bias)
    assert_close_to_reference(where, out, r64, r32)


@pytest.mark.parametrize("store_ds", [True, False])
def test_non_contiguous_inputs(store_ds, monkeypatch):
    """Gradients are written with their own strides, not the inputs' (both dq paths)."""
    from mega_kernels.triton import attention_bwd as bwd

    if not store_ds:
        monkeypatch.setattr(bwd, "DS_SCRATCH_LIMIT_BYTES", 0)
    case = (2, 21, 30, 16, 24, 8)
    masks = padding_masks(case[0], case[2], case[5], device=DEVICE)
    check_case(case, "softmax", True, masks["right"], label="strided", strided=True)


@pytest.mark.parametrize("activation", SOME_ACTIVATIONS)
@pytest.mark.parametrize("case", [ATTN_CASES[5], (2, 37, 100, 16, 24, 32), (3, 23, 23, 16, 8, 5)], ids=str)
def test_reads_stay_inside_the_inputs(case, activation):
    """No load outside q, k, v or rel_bias reaches a result: each sits between NaNs (one query against a
    chunked cache, queries not aligned to the chunks, many small chunks; causal with left padding)."""
    masks = padding_masks(case[0], case[2], case[5], device=DEVICE)
    check_case(case, activation, True, masks["left"], label="guarded", nan_guard=True)
    check_case(case, activation, False, masks["right"], label="guarded", nan_guard=True)


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the real autotuner runs (test_gpu_lm_tile_shape_bfloat16)")
@pytest.mark.parametrize("zdim", [16, 72, 136])
@pytest.mark.parametrize("pick", [0, 1, 2])
def test_gpu_tile_configs_and_autotune_plumbing(pick, zdim, monkeypatch):
    """The GPU path under the interpreter: GPU tile configs (BM 128 / BE 512 / T 64 ...) and the autotuned
    launches (grid from the chosen config), each candidate config in turn, against the reference; Z 16 and
    72 take the two tile shapes of "fwd_e256" (q tile up to 64 or 128 wide), Z 136 the wide-q tiles (q tile
    256: dK and dQ sweep E in smaller steps)."""
    from mega_kernels.triton import attention_common

    class PickOne:  # stands in for triton.autotune: runs candidate `pick` (no timing on the CPU)
        def __init__(self, configs, key):
            self.cfg = configs[min(pick, len(configs) - 1)]
            self.cache = {}

        def __call__(self, fn):
            self.fn = fn
            return self

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                meta = dict(kwargs, **self.cfg.kwargs)
                return self.fn[grid(meta)](*args, **meta, num_warps=self.cfg.num_warps)
            return run

    monkeypatch.setattr(attention_common, "interpreting", lambda: False)  # the tiles and may_autotune read it
    monkeypatch.setattr(attention_common.triton, "autotune", PickOne)
    monkeypatch.setattr(attention_common, "_TUNED", {})
    case = (1, 70, 70, zdim, 1040, 64)
    masks = padding_masks(case[0], case[2], case[5], device=DEVICE)
    check_case(case, "softmax", True, masks["left"], dtype=torch.float16, label="left")
    check_case(case, "relu2", False, masks["whole_chunk"], dtype=torch.float16, label="whole_chunk")


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the float32 tiles run compiled in the other float32 tests")
@pytest.mark.parametrize("activation,causal,mname", [("softmax", True, "left"), ("laplace", False, "whole_chunk")])
def test_float32_gpu_tiles(activation, causal, mname, monkeypatch):
    """The float32 GPU tiles under the interpreter (dV with 16 keys per tile against 32 queries, dK / dQ with 8
    warps), against the reference: key tiles shorter than query tiles, partial tiles at both ends."""
    from mega_kernels.triton import attention_common

    monkeypatch.setattr(attention_common, "interpreting", lambda: False)
    cfg = attention_common.config("dv", attention_common.Problem(1, 50, 50, 24, 40, 24, 24, 0, 1, 32, "ieee"),
                                  torch.float32)
    assert cfg["BLOCK_N"] < cfg["BLOCK_M"]  # the shape this test is for
    case = (2, 50, 50, 24, 40, 24)
    check_case(case, activation, causal, padding_masks(case[0], case[2], case[5], device=DEVICE)[mname], label=mname)


def test_one_autotuner_per_candidate_list(monkeypatch):
    """The GPU candidates of the wide-E forward depend on Z's width (BN 64 with 3 stages only for Z <= 64): a
    problem whose candidate list differs gets its own autotuner, whichever Z came first."""
    from mega_kernels.triton import attention_common, attention_fwd

    made = []
    monkeypatch.setattr(attention_common, "interpreting", lambda: False)
    monkeypatch.setattr(attention_common, "_TUNED", {})
    monkeypatch.setattr(attention_common.triton, "autotune",
                        lambda configs, key: lambda fn: made.append([c.kwargs for c in configs]) or object())

    def tuner(zdim):
        pb = attention_common.Problem(1, 64, 64, zdim, 1024, 64, 64, 0, 0, zdim, "tf32")
        return attention_common.autotuned(attention_fwd._fwd_kernel, ("fwd", "fwd_e256"), pb, torch.float16)

    narrow, mid, narrow_again = tuner(64), tuner(128), tuner(32)
    assert narrow is narrow_again and mid is not narrow and len(made) == 2
    assert made[0][1]["BLOCK_N"] == 64 and made[1][1]["BLOCK_N"] == 32


def test_empty_rows_give_zeros_and_finite_gradients():
    """Left padding + causal softmax: the first rows see no key (transformers gives NaN, spec 9.5)."""
    q, k, v, b = [t.float().to(DEVICE).requires_grad_() for t in attention_inputs(2, 9, 9, 16, 8, None)]
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    mask[0, :4] = False
    out = triton_attention(q, k, v, b, activation="softmax", causal=True, key_padding_mask=mask)
    assert torch.equal(out[0, :4], torch.zeros_like(out[0, :4]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, b))
    assert torch.equal(q.grad[0, :4], torch.zeros_like(q.grad[0, :4]))


@pytest.mark.parametrize("lq,edim", [(0, 8), (5, 0)])
def test_launcher_refuses_an_empty_output(lq, edim):
    """Lq = 0 or E = 0 is refused by name (at E = 0 the softmax backward read a row statistic no forward wrote);
    ops.attention answers those without a launch (test_ops)."""
    q, k, v, b = [t.float().to(DEVICE) for t in attention_inputs(2, lq, 5, 16, edim, None)]
    with pytest.raises(ValueError, match=r"need 1 <= Lq <= Lk and E >= 1, got Lq=%d, Lk=5, E=%d" % (lq, edim)):
        triton_attention(q, k, v, b)


def test_decoding_token_by_token_equals_full_pass():
    """Lq = 1 (the split-key decode kernel) at every position equals the rows of the full causal pass (without
    padding: with padding, softmax's whole-block rule looks at keys a step has not seen yet, and the models'
    decoding handles that), and with padding equals the reference on the same inputs."""
    for activation in ACTIVATIONS:
        q, k, v, b = [t.float().to(DEVICE) for t in attention_inputs(2, 11, 11, 16, 24, 4)]
        mask = torch.rand(2, 11, device=DEVICE) > 0.3
        mask[0, 4:6] = False
        kw = dict(activation=activation, chunk_size=4, causal=True)
        full = triton_attention(q, k, v, b, **kw)
        for t in range(11):
            x = (q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], b)
            torch.testing.assert_close(triton_attention(*x, **kw), full[:, t:t + 1], rtol=1e-5, atol=1e-6)
            want = reference(*[y.double() for y in x], key_padding_mask=mask[:, :t + 1], **kw)
            low = reference(*x, key_padding_mask=mask[:, :t + 1], **kw)
            got = triton_attention(*x, key_padding_mask=mask[:, :t + 1], **kw)
            assert_close_to_reference(f"{activation} step {t}", got.cpu(), want, low.cpu())


@pytest.mark.parametrize("activation", SOME_ACTIVATIONS)
def test_decoding_split_walks_several_key_tiles(activation, monkeypatch):
    """Lq = 1 with one key split per batch row (as a batch of 256 rows gets): that split walks all 100 keys tile
    by tile, so the online softmax rescales its running sums (small batches get one key tile per split, where
    no rescale happens)."""
    from mega_kernels.triton import attention_fwd as fwd

    monkeypatch.setattr(fwd, "DECODE_PROGRAMS", 1)
    case = (2, 1, 100, 16, 8, None)
    masks = padding_masks(case[0], case[2], None, device=DEVICE)
    for causal, mname in ((True, "none"), (False, "left")):
        check_case(case, activation, causal, masks[mname], label=mname)


def test_rel_bias_longer_than_the_block_and_its_gradient():
    """A rel_bias built for a longer block (W > S) is indexed from its centre; unused entries get gradient 0."""
    q, k, v, _ = attention_inputs(2, 10, 10, 16, 8, 4)
    bias = torch.randn(2 * 7 - 1, dtype=torch.float64) * 0.1
    x64 = [t.requires_grad_() for t in (q, k, v, bias)]
    xk = [t.detach().float().to(DEVICE).requires_grad_() for t in x64]
    x32 = [t.detach().float().requires_grad_() for t in x64]  # the reference in the kernel's dtype
    for activation in ACTIVATIONS:
        kw = dict(activation=activation, chunk_size=4, causal=False)
        ref, low = reference(*x64, **kw), reference(*x32, **kw)
        out = triton_attention(*xk, **kw)
        assert_close_to_reference(f"{activation} out", out.cpu(), ref, low)
        (gb,) = torch.autograd.grad(out.sum(), xk[3])
        (rb,) = torch.autograd.grad(ref.sum(), x64[3])
        (lb,) = torch.autograd.grad(low.sum(), x32[3])
        assert_close_to_reference(f"{activation} d rel_bias", gb.cpu(), rb, lb)
        assert torch.equal(gb[:3].cpu(), torch.zeros(3)) and torch.equal(gb[-3:].cpu(), torch.zeros(3))


def test_bias_gradient_is_deterministic():
    x = [t.float().to(DEVICE).requires_grad_() for t in attention_inputs(2, 70, 70, 16, 40, 32)]
    grads = []
    for _ in range(2):
        out = triton_attention(*x, activation="softmax", chunk_size=32, causal=True)
        grads.append(torch.autograd.grad(out, x, torch.ones_like(out)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@GPU_LEAN
@pytest.mark.filterwarnings("ignore:Input #")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation):
    """Finite differences on tiny float32 inputs (the kernels take no float64; eps and tolerances sized for
    float32): two blocks, the last partial, causal, a padded key."""
    torch.manual_seed(1)
    q, k, v, b = [t.float().to(DEVICE).requires_grad_() for t in attention_inputs(1, 6, 6, 16, 8, 4)]
    mask = torch.tensor([[True, True, False, True, True, True]], device=DEVICE)

    def fn(q, k, v, b):
        return triton_attention(q, k, v, b, activation=activation, chunk_size=4, causal=True,
                                key_padding_mask=mask)

    assert torch.autograd.gradcheck(fn, (q, k, v, b), eps=1e-3, atol=2e-3, rtol=2e-2, fast_mode=True)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_double_backward_matches_reference(activation):
    """create_graph=True (a gradient penalty): the second derivatives in q, k, v and rel_bias equal the reference's
    (the kernels' backward has no derivative; under create_graph it differentiates the reference instead)."""
    torch.manual_seed(2)
    leaves = [t.float().to(DEVICE).requires_grad_() for t in attention_inputs(2, 7, 7, 16, 8, 4)]
    mask = torch.tensor([[True] * 7, [False, True, True, True, True, True, False]], device=DEVICE)
    gy = torch.randn(2, 7, 8, device=DEVICE)
    second = []
    for fn in (triton_attention, reference):
        out = fn(*leaves, activation=activation, chunk_size=4, causal=True, key_padding_mask=mask)
        first = torch.autograd.grad((out * gy).sum(), leaves, create_graph=True)
        second.append(torch.autograd.grad(sum((g ** 2).sum() for g in first), leaves))
    for name, got, want in zip("q k v rel_bias".split(), *second):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)


def test_double_backward_of_one_tensor_passed_as_q_k_v():
    """attention(x, x, x, ...) (Z == E) under create_graph=True: each input gets its own share of x's gradient
    (recomputing from the saved inputs themselves summed the whole gradient once per input: 3x), and the second
    derivatives equal the reference's."""
    torch.manual_seed(3)
    x, _, _, b = [t.float().to(DEVICE).requires_grad_() for t in attention_inputs(2, 6, 6, 16, 16, None)]
    gy = torch.randn(2, 6, 16, device=DEVICE)
    results = []
    for fn in (triton_attention, reference):
        first = torch.autograd.grad((fn(x, x, x, b, causal=True) * gy).sum(), [x, b], create_graph=True)
        results.append(list(first) + list(torch.autograd.grad(sum((g ** 2).sum() for g in first), [x, b])))
    for name, got, want in zip(("dx", "dbias", "d2x", "d2bias"), *results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)


def test_first_order_backward_runs_the_kernel(monkeypatch):
    """Only create_graph=True takes the reference's backward: a plain backward runs the Triton kernels."""
    import sys

    monkeypatch.setattr(sys.modules["mega_kernels.ops.attention_triton"], "reference_grads",
                        lambda *a, **k: pytest.fail("the reference backward ran"))
    q, k, v, b = [t.float().to(DEVICE).requires_grad_() for t in attention_inputs(1, 5, 5, 16, 8, None)]
    triton_attention(q, k, v, b).sum().backward()
    assert all(t.grad is not None for t in (q, k, v, b))


# -- torch.library: opcheck and torch.compile ----------------------------------------------------------

def test_opcheck():
    x = [t.float().to(DEVICE) for t in attention_inputs(2, 7, 9, 16, 8, 4)]
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    mask[1, :3] = False
    for activation in ACTIVATIONS:
        args = (*[t.clone().requires_grad_() for t in x], activation, 4, True, mask)
        torch.library.opcheck(torch.ops.mega_kernels.attention_fwd_triton.default, args)
        out, stats = attention_fwd(*x, activation, 4, True, mask)
        bargs = (torch.randn_like(out), *x, out, stats, activation, 4, True, mask)
        torch.library.opcheck(torch.ops.mega_kernels.attention_bwd_triton.default, bargs)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed-views"])
def test_torch_compile_traces_without_graph_breaks(strided):
    """Also with q, k, v transposed views inside the compiled function (as from (B, Z, L) activations), under
    inductor, which holds each op's outputs to the strides of its fake: the fake backward must give the real
    one's contiguous gradients."""
    backend = "inductor" if HAS_CUDA or strided else "aot_eager"
    x = [t.float().to(DEVICE) for t in attention_inputs(2, 9, 9, 16, 8, 4)]
    if strided:
        x[:3] = [t.transpose(1, 2).contiguous() for t in x[:3]]  # (B, Z, L): fn transposes them back
    x = [t.requires_grad_() for t in x]

    def fn(q, k, v, b):
        if strided:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return ops.attention(q, k, v, b, activation="laplace", chunk_size=4, causal=True, backend="triton").sum()

    want = fn(*x)  # eager first: the backend registry imports the triton module lazily, which dynamo cannot trace
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    got = compiled(*x)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got, x)
    g2 = torch.autograd.grad(want, x)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# -- input checks ---------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    q, k, v, b = [t.float().to(DEVICE) for t in attention_inputs(1, 4, 4, 16, 8, None)]
    with pytest.raises(TypeError, match="float64"):
        attention_fwd(q.double(), k.double(), v.double(), b, "softmax", 0, False)
    wide = torch.randn(1, 4, 260, device=DEVICE)
    with pytest.raises(ValueError, match="Z = 260"):
        attention_fwd(wide, wide, v, b, "softmax", 0, False)
    with pytest.raises(ValueError, match="rel_bias"):
        attention_fwd(q, k, v, b[:5], "softmax", 0, False)
    with pytest.raises(ValueError, match="activation"):
        attention_fwd(q, k, v, b, "gelu", 0, False)
    with pytest.raises(ValueError, match="Lq"):
        attention_fwd(torch.randn(1, 5, 16, device=DEVICE), k, v, b, "softmax", 0, False)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention_fwd(q, k, v, b, "softmax", 0, False, torch.ones(1, 3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="rel_bias must be contiguous"):
        attention_fwd(q, k, v, torch.randn(2 * b.shape[0], device=DEVICE)[::2], "softmax", 0, False)
    out, stats = attention_fwd(q, k, v, b, "softmax", 0, False)
    with pytest.raises(ValueError, match="stats"):
        attention_bwd(out, q, k, v, b, out, stats[..., :2], "softmax", 0, False)
    with pytest.raises(ValueError, match="out must be"):
        attention_bwd(out, q, k, v, b, out[:, :2], stats, "softmax", 0, False)
    with pytest.raises(ValueError, match="grad_out must be .* on"):
        attention_bwd(out.to("meta"), q, k, v, b, out, stats, "softmax", 0, False)
    from mega_kernels.triton.attention_common import describe  # 32-bit in-batch offsets: sizes on meta tensors

    qk, wide_v = torch.empty(1, 2 ** 19 + 1, 16, device="meta"), torch.empty(1, 2 ** 19 + 1, 4096, device="meta")
    describe(qk, qk, torch.empty(1, 2 ** 19 + 1, 4095, device="meta"), torch.empty(127, device="meta"), "softmax", 64,
             False, None)
    with pytest.raises(ValueError, match="one batch row of v spans 2\\^31"):
        describe(qk, qk, wide_v, torch.empty(127, device="meta"), "softmax", 64, False, None)


# -- the models on the triton backend ----------------------------------------------------------------------

@pytest.mark.parametrize("head,overrides", [
    ("MegaModel", dict(attention_activation="softmax", use_chunking=True, chunk_size=4)),
    ("MegaForCausalLM", dict(is_decoder=True, bidirectional=False, attention_activation="laplace",
                             use_chunking=True, chunk_size=4)),
    ("MegaModel", dict(attention_activation="relu2")),
][:1 if HAS_CUDA else 3], ids=["model-softmax-chunk", "causal-laplace-chunk", "model-relu2"][:1 if HAS_CUDA else 3])
def test_models_on_triton_backend_equal_reference(head, overrides):
    from mega_kernels import models
    from mega_kernels.config import MegaConfig
    from mega_kernels.modules.attention import MegaMovingAverageGatedAttention

    cfg = MegaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, intermediate_size=24,
                     shared_representation_size=16, ema_projection_size=4, nffn_hidden_size=32,
                     max_positions=32, kernel_backend="reference", **overrides)
    torch.manual_seed(3)
    model = getattr(models, head)(cfg).to(DEVICE).eval()
    ids = torch.randint(3, 50, (2, 11), device=DEVICE)
    mask = torch.ones(2, 11, dtype=torch.long, device=DEVICE)
    mask[1, 8:] = 0
    results = []
    for backend in ("reference", "triton"):
        for m in model.modules():
            if isinstance(m, MegaMovingAverageGatedAttention):
                m.backend = backend
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask)
        hidden = out[0]
        hidden.float().pow(2).sum().backward()
        results.append((hidden.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}))
    (h_ref, g_ref), (h_tri, g_tri) = results
    torch.testing.assert_close(h_tri, h_ref, rtol=2e-5, atol=2e-5)  # model_helpers' OUT_RTOL / GRAD_RTOL
    assert g_ref.keys() == g_tri.keys()
    for n in g_ref:
        torch.testing.assert_close(g_tri[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")


# -- compiled for Hopper without a GPU: the GPU tile configs fit (ptxas, no register spills) ---------------

PTXAS = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "ptxas")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.exists(PTXAS) and not in_ci(), reason="this triton ships no ptxas")
@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels compile for real in the other tests (saves ~30 s)")
@pytest.mark.parametrize("shape", ["lm", "lra"])
def test_gpu_configs_compile_for_sm90(shape):
    """Compiles every kernel with its GPU tile config for sm_90 (in a subprocess without TRITON_INTERPRET):
    it must fit in shared memory (227 KiB on sm_90) and spill at most a few registers (<= 128 bytes per thread,
    L1-resident; 32 at most now, the LM shape's softmax forward)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_attention", "--compile-report", shape],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) == 20
    for row in rows:
        assert row["shared"] <= 227 * 1024, row
        assert row["spill_bytes"] <= 128, row


# -- GPU only --------------------------------------------------------------------------------------------

GPU_CASES = [(2, 300, 300, 64, 200, 128), (2, 1, 300, 64, 200, 128), (1, 257, 257, 24, 4100, None),
             (2, 1000, 1000, 256, 528, 512)]
# (case, dtype, activation): every activation on the first two cases in bfloat16, the others sampled; kept small
# because each new (Z, E, dtype, activation) compiles four kernels
GPU_MATRIX = ([(c, torch.bfloat16, a) for c in GPU_CASES[:2] for a in ACTIVATIONS]
              + [(GPU_CASES[2], torch.bfloat16, "softmax"), (GPU_CASES[3], torch.bfloat16, "laplace")]
              + [(GPU_CASES[0], dt, "softmax") for dt in (torch.float16, torch.float32)])


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype,activation", GPU_MATRIX, ids=str)
def test_gpu_matches_reference(case, dtype, activation):
    masks = padding_masks(case[0], case[2], case[5], device=DEVICE)
    check_case(case, activation, True, masks["left"], dtype=dtype, label="left")
    check_case(case, activation, False, masks.get("whole_chunk", masks["right"]), dtype=dtype, label="padded")


@pytest.mark.gpu
def test_gpu_lm_tile_shape_bfloat16():
    """The LM benchmark's Z / E / chunk (B1 L2048 Z256 E2048 C1024 causal) against the float64 reference."""
    check_case((1, 2048, 2048, 256, 2048, 1024), "softmax", True, None, dtype=torch.bfloat16, label="lm")
    check_case((1, 2048, 2048, 256, 2048, 1024), "relu2", True, None, dtype=torch.bfloat16, label="lm")


@pytest.mark.gpu
def test_gpu_bitwise_deterministic():
    x = [t.to(torch.bfloat16).cuda().requires_grad_() for t in attention_inputs(2, 1000, 1000, 64, 256, 256)]
    runs = []
    for _ in range(3):
        out = triton_attention(*x, activation="softmax", chunk_size=256, causal=True)
        runs.append((out, *torch.autograd.grad(out, x, torch.ones_like(out))))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[2]):
        assert torch.equal(a, b)


def test_launches_make_the_inputs_device_current(monkeypatch):
    """Triton launches on the current device: the forward and backward ops enter their inputs' device first (on a
    CPU tensor a no-op), so inputs on cuda:1 while cuda:0 is current run where they live."""
    import mega_kernels.triton as kernels

    seen, real = [], kernels.on_device_of
    monkeypatch.setattr(kernels, "on_device_of", lambda t: seen.append(t.device) or real(t))
    q, k, v, b = [t.float().to(DEVICE).requires_grad_() for t in attention_inputs(1, 5, 5, 16, 8, None)]
    triton_attention(q, k, v, b).sum().backward()
    assert seen == [q.device, q.device]


def test_batch_beyond_the_grid_is_refused():
    q, k, v, b = attention_inputs(65536, 1, 1, 16, 8, None, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch size 65536 exceeds 65535.*split the batch"):
        attention_fwd(q, k, v, b, "softmax", 0, False, None)


def test_deterministic_mode_uses_the_fixed_configs(monkeypatch):
    """Autotuning picks by timing, so another process may pick another config (another summation order): under
    torch.use_deterministic_algorithms(True) the launchers keep the fixed configs."""
    from mega_kernels.triton import attention_common

    monkeypatch.setattr(attention_common, "interpreting", lambda: False)  # as on a GPU
    assert attention_common.may_autotune(torch.bfloat16)
    assert not attention_common.may_autotune(torch.float32)
    try:
        torch.use_deterministic_algorithms(True)
        assert not attention_common.may_autotune(torch.bfloat16)
    finally:
        torch.use_deterministic_algorithms(False)
