"""Pieces shared by the Triton chunked-attention kernels: masks, activations, block configs, input checks.

Notation (all kernels): query row r of q (B, Lq, Z) sits at absolute position P = Lk - Lq + r; positions are
cut into blocks of S = the block length (chunk_size when it cuts the keys, else Lk); a query at P sees the
keys of its block [cs, ce) with cs = (P // S) * S, ce = min(cs + S, Lk), further restricted to j <= P when
causal and to non-padded keys (softmax: unless every key of the block is padding; `cnt` = the number of
non-padded keys of the block, precomputed per (batch, block) in `block_counts`). The Toeplitz bias of a
pair is rel_bias[W - 1 + j - P] (j, P absolute: within a block the difference is the in-block one).

    softmax:          s = (q . k) * Z^-0.5 + bias,      p = exp(s - lse) on visible pairs
    laplace / relu2:  s = (q . k) / n + bias,           p = act(s) on visible pairs (no normalisation)
                      n = P - cs + 1 when causal, else max(cnt, 1)

Interior tiles. Most (query tile, key tile) pairs of a long block need no mask: every row is a query, every
key exists and lies in every row's block, is visible (causal: below the diagonal) and no padding mask is given.
The loops visit those first-class (`interior_range`, `interior_query_range`, `pair_interior`) without the
per-score mask logic and with an unmasked bias gather: at the LM shape that halves (forward) to thirds (dV)
the instructions per tile in the sm_90 SASS; the masked tiles (diagonal, block edges, padding, partial
tiles) keep the full path.

The maths of each kernel and its backward is at the top of attention_fwd.py and attention_bwd.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference.attention import LAPLACE_MU, LAPLACE_SIGMA
from . import interpreting  # noqa: F401  (re-exported to the attention kernels)

ACT_CODES = {"softmax": 0, "laplace": 1, "relu2": 2}
LOG2E = 1.4426950408889634
LAPLACE_C = 1.0 / (LAPLACE_SIGMA * math.sqrt(2.0))           # erf argument scale
LAPLACE_D = 1.0 / (LAPLACE_SIGMA * math.sqrt(2.0 * math.pi))  # derivative's Gaussian height
MAX_Z = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# `interpreting` and the NumPy >= 2.4 interpreter patch live in the package __init__ (imported first).


# -- device-side helpers --------------------------------------------------------------------------------

# `causal` and `has_mask` are runtime ints (0 / 1), not constexpr: they cost a few integer ops per score and
# divide the number of compiled variants by four (compile time dominates short test and benchmark runs).

@triton.jit
def row_info(pos, row_ok, Lk, S, cnt_ptr, has_mask):
    """Per query row: its block [cs, ce) and the block's count of non-padded keys."""
    cs = (pos // S) * S
    ce = tl.minimum(cs + S, Lk)
    cnt = tl.load(cnt_ptr + pos // S, mask=row_ok & (has_mask != 0), other=0)
    cnt = tl.where(has_mask != 0, cnt, ce - cs)
    return cs, ce, cnt


@triton.jit
def visible(pos, row_ok, cs, ce, cnt, offs_n, kp, causal, ACT: tl.constexpr):
    """(BM, BN) bool: query row sees key column (same block, causal, padding rules of the activation)."""
    n2 = offs_n[None, :]
    vis = row_ok[:, None] & (n2 >= cs[:, None]) & (n2 < ce[:, None])
    vis = vis & ((n2 <= pos[:, None]) | (causal == 0))
    key_ok = kp[None, :] != 0
    if ACT == 0:  # softmax ignores the padding of a block whose keys are all padding
        key_ok = key_ok | (cnt[:, None] == 0)
    return vis & key_ok


@triton.jit
def load_key_pad(kpm_ptr, offs_n, Lk, has_mask):
    """Key padding row (1 = token) for key columns offs_n; all ones without a mask."""
    return tl.load(kpm_ptr + offs_n, mask=(offs_n < Lk) & (has_mask != 0), other=1)


@triton.jit
def load_row_stats(STATS, b, Lq, offs_m, row_ok, pos, ACT: tl.constexpr):
    """A query tile's softmax row statistics from stats (B, 2, Lq): the row max m of the log2-domain scores and
    log2 of the row sum (0 and +inf for a row with no visible key, so every p = 2^((s - m) - log2 l) is 0);
    placeholders for laplace / relu2, which have none."""
    if ACT == 0:
        m = tl.load(STATS + b * 2 * Lq + offs_m, mask=row_ok, other=0.0)
        ll = tl.load(STATS + b * 2 * Lq + Lq + offs_m, mask=row_ok, other=float("inf"))
    else:
        m = pos.to(tl.float32)
        ll = m
    return m, ll


@triton.jit
def load_bias(bias_ptr, pos, offs_n, W, vis):
    """The Toeplitz bias tile rel_bias[W - 1 + j - P] in float32 (0 where not visible)."""
    idx = W - 1 + offs_n[None, :] - pos[:, None]
    return tl.load(bias_ptr + idx, mask=vis, other=0.0).to(tl.float32)


@triton.jit
def inv_count(pos, cs, cnt, causal):
    """1 / n of laplace / relu2 per row (float32)."""
    n = tl.where(causal != 0, pos - cs + 1, tl.maximum(cnt, 1))
    return 1.0 / n.to(tl.float32)


@triton.jit
def block_key_range(first, last, Lk, S, causal):
    """Keys seen by query positions first..last: from first's block start to last's block end (last + 1
    when causal)."""
    lo = (first // S) * S
    hi = tl.where(causal != 0, last + 1, tl.minimum((last // S) * S + S, Lk))
    return lo, hi


@triton.jit
def interior_range(lo, hi, first, last, all_rows, Lk, S, causal, has_mask, BLOCK_N: tl.constexpr):
    """Key tiles lo + k BLOCK_N of a query tile (positions first..last) split as [lo, int_lo) masked,
    [int_lo, int_hi) interior, [int_hi, hi) masked. An interior tile needs no mask at all: every key is in the
    block of every row, visible to it (causal: key <= first) and not padding (no mask given); `all_rows`: the
    tile has no row past Lq. Returns (int_lo, int_hi), tile-aligned, int_lo <= int_hi."""
    k_lo = tl.minimum(tl.cdiv(tl.maximum((last // S) * S - lo, 0), BLOCK_N), tl.cdiv(hi - lo, BLOCK_N))
    int_lo = lo + k_lo * BLOCK_N                             # may pass hi by less than a tile (then no interior)
    lim = tl.minimum(tl.minimum((first // S) * S + S, Lk), hi)
    lim = tl.where(causal != 0, tl.minimum(lim, first + 1), lim)
    n_int = tl.maximum(lim - int_lo, 0) // BLOCK_N
    n_int = tl.where(all_rows & (has_mask == 0), n_int, 0)
    return int_lo, int_lo + n_int * BLOCK_N


@triton.jit
def interior_query_range(start, hi, k_first, k_last, Lq, Lk, S, causal, has_mask, BLOCK_M: tl.constexpr):
    """The transpose of `interior_range`: query tiles start + k BLOCK_M (positions, up to hi) seen by the keys
    k_first..k_last, split as [start, int_lo) masked, [int_lo, int_hi) interior (`pair_interior` holds for
    each), [int_hi, hi) masked. Returns (int_lo, int_hi), tile-aligned, int_lo <= int_hi."""
    blk = (k_first // S) * S
    keys_ok = (k_last < Lk) & (k_last < blk + S) & (has_mask == 0)
    low = tl.maximum(blk, Lk - Lq)
    low = tl.where(causal != 0, tl.maximum(low, k_last), low)
    k_lo = tl.minimum(tl.cdiv(tl.maximum(low - start, 0), BLOCK_M), tl.cdiv(hi - start, BLOCK_M))
    int_lo = start + k_lo * BLOCK_M
    lim = tl.minimum(tl.minimum(blk + S, Lk), hi)
    n_int = tl.where(keys_ok, tl.maximum(lim - int_lo, 0) // BLOCK_M, 0)
    return int_lo, int_lo + n_int * BLOCK_M


@triton.jit
def pair_interior(p_first, p_last, k_first, k_last, Lq, Lk, S, causal, has_mask):
    """Whether the tile of query positions p_first..p_last and keys k_first..k_last needs no mask: all rows are
    queries (>= Lk - Lq), all keys exist, all share one block, every key is visible to every row (causal:
    k_last <= p_first) and no padding mask is given (the per-iteration form of `interior_range`)."""
    blk = k_first // S
    same = (p_first // S == blk) & (p_last // S == blk) & (k_last // S == blk)
    ok = same & (p_first >= Lk - Lq) & (p_last < Lk) & (k_last < Lk) & (has_mask == 0)
    return ok & ((causal == 0) | (k_last <= p_first))


@triton.jit
def query_tile(Q, CNT, b, pid_m, s_qb, s_qm, s_qz, s_cb, Lq, Lk, Z, S, causal, has_mask,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Z: tl.constexpr):
    """Rows, q tile and key ranges of query tile pid_m: (offs_m, row_ok, pos, cs, ce, cnt, q, lo, hi, int_lo,
    int_hi, n_masked) (masked key tiles: `masked_tile_start`; interior ones: [int_lo, int_hi))."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_z = tl.arange(0, BLOCK_Z)
    row_ok = offs_m < Lq
    pos = Lk - Lq + offs_m
    cs, ce, cnt = row_info(pos, row_ok, Lk, S, CNT + b * s_cb, has_mask)
    q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qm + offs_z[None, :] * s_qz,
                mask=row_ok[:, None] & (offs_z[None, :] < Z), other=0.0)
    first = Lk - Lq + pid_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, Lk) - 1
    lo, hi = block_key_range(first, last, Lk, S, causal)
    int_lo, int_hi = interior_range(lo, hi, first, last, pid_m * BLOCK_M + BLOCK_M <= Lq, Lk, S, causal,
                                    has_mask, BLOCK_N)
    n_masked = (int_lo - lo) // BLOCK_N + tl.cdiv(tl.maximum(hi - int_hi, 0), BLOCK_N)
    return offs_m, row_ok, pos, cs, ce, cnt, q, lo, hi, int_lo, int_hi, n_masked


@triton.jit
def masked_tile_start(t, lo, int_lo, int_hi, BLOCK_N: tl.constexpr):
    """Start of the t-th masked key tile: those before the interior range, then those after it (there are
    (int_lo - lo) // BLOCK_N + cdiv(max(hi - int_hi, 0), BLOCK_N) of them)."""
    n_before = (int_lo - lo) // BLOCK_N
    return tl.where(t < n_before, lo + t * BLOCK_N, int_hi + (t - n_before) * BLOCK_N)


@triton.jit
def element_act(s, ACT: tl.constexpr, LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr):
    """laplace (ACT 1) or relu2 (ACT 2) of the float32 scores."""
    if ACT == 1:
        out = 0.5 * (1.0 + tl.math.erf((s - LAPLACE_MU) * LAPLACE_C))
    else:
        r = tl.maximum(s, 0.0)
        out = r * r
    return out


@triton.jit
def element_act_grad(s, ACT: tl.constexpr, LAPLACE_MU: tl.constexpr, LAPLACE_C: tl.constexpr,
                     LAPLACE_D: tl.constexpr):
    """d act / d s: laplace' = Gaussian density N(mu, sigma); relu2' = 2 relu(s)."""
    if ACT == 1:
        t = (s - LAPLACE_MU) * LAPLACE_C
        out = LAPLACE_D * tl.exp(-t * t)
    else:
        out = 2.0 * tl.maximum(s, 0.0)
    return out


# -- host-side helpers ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """Sizes and flags of one attention call, resolved once by `describe`."""
    bsz: int
    lq: int
    lk: int
    zdim: int
    edim: int
    size: int        # block length S
    width: int       # W, rel_bias has 2W - 1 entries
    act: int
    causal: int
    block_z: int
    dot_precision: str


MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2 (the kernels put the batch on one of them)
# Softmax scores are taken in the log2 domain, bias log2(e) in float32, which overflows beyond +-2.36e38.
BIAS_LIMIT = 1e38


def kernel_bias(rel_bias: torch.Tensor, pb: "Problem") -> torch.Tensor:
    """rel_bias as the kernels read it: for softmax, entries beyond +-BIAS_LIMIT (+-inf included) are clamped
    there (one small launch), so bias log2(e) stays finite. An entry that large already takes all or none of its
    row's softmax weight at any score a float32 dot can give; two such entries in one row tie where they would
    not, and a row whose visible entries are all -inf averages them where the reference gives NaN."""
    if pb.act != 0 or rel_bias.dtype == torch.float16:   # float16 cannot hold such values
        return rel_bias
    return rel_bias.clamp(-BIAS_LIMIT, BIAS_LIMIT)


def describe(q, k, v, rel_bias, activation, chunk_size, causal, key_padding_mask) -> Problem:
    """Check the inputs a Triton launcher gets (naming the argument and the fix) and resolve sizes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"triton attention: {name} must be (B, L, X), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"triton attention: {name} has dtype {t.dtype}; the triton backend takes float32, "
                            f"float16 or bfloat16 (use backend='reference' for float64)")
        if t.device != q.device:
            raise ValueError(f"triton attention: {name} is on {t.device} but q is on {q.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"triton attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    bsz, lq, zdim = q.shape
    lk, edim = v.shape[1], v.shape[2]
    if tuple(k.shape) != (bsz, lk, zdim) or v.shape[0] != bsz:
        raise ValueError(f"triton attention: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (want q (B, Lq, Z), k (B, Lk, Z), v (B, Lk, E))")
    if not 1 <= lq <= lk or edim < 1:
        raise ValueError(f"triton attention: need 1 <= Lq <= Lk and E >= 1, got Lq={lq}, Lk={lk}, E={edim} "
                         "(ops.attention returns an empty output without a launch)")
    if bsz > MAX_GRID_YZ:
        raise ValueError(f"triton attention: batch size {bsz} exceeds {MAX_GRID_YZ}, the GPU grid axis the kernels "
                         "launch the batch on; split the batch into parts of at most that many rows")
    if zdim > MAX_Z:
        raise ValueError(f"triton attention: Z = {zdim} exceeds the kernel's limit of {MAX_Z}; "
                         f"use backend='reference' for wider q/k")
    if activation not in ACT_CODES:
        raise ValueError(f"triton attention: activation must be one of {tuple(ACT_CODES)}, got {activation!r}")
    if chunk_size < 0:
        raise ValueError(f"triton attention: chunk_size must be >= 0 (0 = no chunking), got {chunk_size}")
    size = chunk_size if 0 < chunk_size < lk else lk
    if rel_bias.dim() != 1 or rel_bias.shape[0] % 2 != 1 or (rel_bias.shape[0] + 1) // 2 < size:
        raise ValueError(f"triton attention: rel_bias must be a (2W - 1,) vector with W >= the block length "
                         f"{size}; got shape {tuple(rel_bias.shape)}")
    if rel_bias.device != q.device:
        raise ValueError(f"triton attention: rel_bias is on {rel_bias.device} but q is on {q.device}")
    if rel_bias.shape[0] > 1 and rel_bias.stride(0) != 1:
        raise ValueError("triton attention: rel_bias must be contiguous (the kernels read it as a flat vector); "
                         "pass rel_bias.contiguous()")
    for name, t in (("q", q), ("k", k), ("v", v)):  # the kernels' in-batch offsets are 32-bit
        if max(t.shape[1] - 1, 0) * abs(t.stride(1)) + max(t.shape[2] - 1, 0) * abs(t.stride(2)) >= 2 ** 31:
            raise ValueError(f"triton attention: one batch row of {name} spans 2^31 elements or more (shape "
                             f"{tuple(t.shape)}, strides {t.stride()}); pass {name}.contiguous() or split the sequence")
    if key_padding_mask is not None and (tuple(key_padding_mask.shape) != (bsz, lk)
                                         or key_padding_mask.device != q.device):
        raise ValueError(f"triton attention: key_padding_mask must be (B, Lk) = ({bsz}, {lk}) on {q.device}, "
                         f"got {tuple(key_padding_mask.shape)} on {key_padding_mask.device}")
    return Problem(bsz, lq, lk, zdim, edim, size, (rel_bias.shape[0] + 1) // 2, ACT_CODES[activation],
                   int(bool(causal)), max(16, triton.next_power_of_2(zdim)),
                   "ieee" if q.dtype == torch.float32 else "tf32")


def mask_args(key_padding_mask, pb: Problem, device):
    """(int8 mask (B, Lk), int32 per-block counts of non-padded keys (B, nblocks), has_mask 0 / 1); dummies
    if None."""
    if key_padding_mask is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        return dummy, dummy, 0
    kpm = key_padding_mask.to(torch.int8).contiguous()
    nblocks = -(-pb.lk // pb.size)
    padded = torch.nn.functional.pad(kpm.to(torch.int32), (0, nblocks * pb.size - pb.lk))
    counts = padded.view(pb.bsz, nblocks, pb.size).sum(-1, dtype=torch.int32).contiguous()
    return kpm, counts, 1


# size arguments that only bound loops and row masks: not specialised by Triton (fewer compiled variants);
# Z, E and the strides stay specialised (their divisibility lets the loads vectorise)
NO_SPECIALIZE = ["Lq", "Lk", "S", "W", "causal", "has_mask", "BAND_LO", "BAND_HI", "keys_per_split", "n_split"]


def constants():
    """Compile-time constants every kernel takes."""
    return dict(LAPLACE_MU=LAPLACE_MU, LAPLACE_C=LAPLACE_C, LAPLACE_D=LAPLACE_D)


_TUNED = {}


def may_autotune(dtype: torch.dtype) -> bool:
    """Whether a launch may time candidate configs (16-bit, compiled). Not under
    torch.use_deterministic_algorithms(True): the timing can pick another config in another process, and with it
    another summation order (the last bits of out, lse and every gradient); the fixed configs give the same bits
    in every run."""
    return dtype != torch.float32 and not interpreting() and not torch.are_deterministic_algorithms_enabled()


def autotuned(fn, kinds, pb: Problem, dtype: torch.dtype):
    """`fn` autotuned (by timing, once per Z, E, causal) over the configs of `kinds` (16-bit, GPU only). One
    autotuner per (kernel, candidate list): the candidates depend on the problem (Z's width), so a problem whose
    list differs never shares an autotuner with another."""
    chosen = [dict(config(kind, pb, dtype)) for kind in kinds]
    key = (getattr(fn, "__name__", str(id(fn))), tuple(tuple(sorted(cfg.items())) for cfg in chosen))
    if key not in _TUNED:
        configs = []
        for cfg in chosen:
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            configs.append(triton.Config(cfg, num_warps=warps, num_stages=stages))
        _TUNED[key] = triton.autotune(configs, key=["Z", "E", "causal"])(fn)
    return _TUNED[key]


def tuned_configs():
    """{kernel and (Z, E, causal, ...): chosen config} of the autotuned kernels so far (benchmark notes)."""
    return {f"{key[0]} {args}": str(cfg) for key, tuner in _TUNED.items() for args, cfg in tuner.cache.items()}


def config(kind: str, pb: Problem, dtype: torch.dtype) -> dict:
    """Block sizes and launch options of one kernel kind. Fixed configs, except that for E >= 256 (forward) or
    E >= 1024 (dV) in 16-bit on a GPU `autotuned` times the "fwd" / "fwd_e256" / "fwd_e512" and "dv" /
    "dv_e512" candidates (the dK tile stays fixed: the bias-gradient scratch depends on it). The GPU configs
    were checked by compiling for sm_90 (`python -m benchmarks.bench_attention --compile-report lm`): they fit
    in shared memory and spill at most 32 bytes per thread (the softmax forward at Z = 256). float32 (exact
    "ieee" dots, a correctness path, not a fast one) uses small tiles."""
    np2e = triton.next_power_of_2(pb.edim)
    if kind == "lse":       # softmax pre-pass for wide E (attention_fwd.PRE_LSE_MIN_E): program = query tile
        if interpreting() or dtype == torch.float32:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
        # sm_90 at Z 256: 174 registers and no spill (BN 64: 255 registers, 432 bytes spilled)
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)
    if kind == "decode":    # program = (batch, key split, E tile), vector maths
        return dict(BLOCK_M=1, BLOCK_N=32, BLOCK_E=max(16, min(128, np2e)), num_warps=4, num_stages=2)
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_E=max(16, min(128, np2e)), num_warps=4, num_stages=1)
    if dtype == torch.float32:  # exact dots on the FMA units, whose operand layouts hold more per thread than MMA's:
        # at Z 256 the 4-warp 32 x 32 tiles spilled 2.4-3 KB per thread in dV, dK and dQ (sm_90). dV with 16 keys
        # per tile and dK / dQ with 8 warps spill nothing (benchmarks/NOTES.md, session 16).
        if kind == "dv":
            return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_E=max(16, min(32, np2e)), num_warps=4, num_stages=1)
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_E=max(16, min(64, np2e)), num_warps=8 if kind in ("dk", "dq") else 4,
                    num_stages=1)
    wide = pb.block_z > 128
    if kind == "fwd":       # program = (query tile, E tile): acc (BM, BE), q (BM, BZ), scores (BM, BN)
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_E=max(16, min(128, np2e)), num_warps=8,
                    num_stages=2 if wide else 3)
    # The wide-E candidates ("fwd_e256", "fwd_e512", "dv_e512") were chosen from their sm_90 code
    # (`--compile-report`): fewest instructions per key tile x warps / (BM x BN x BE), and no spill inside the
    # key loop (the 16-warp tiles of run 2 spilled there; benchmarks/NOTES.md, session 4).
    if kind == "fwd_e256":  # candidate for E >= 256 (autotuned against "fwd"): half the score recompute, 128
        if pb.block_z <= 64:  # query rows per K / V tile; BN 64 and 3 stages fit only with a narrow q tile
            return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_E=256, num_warps=8, num_stages=3)
        return dict(BLOCK_M=128, BLOCK_N=32, BLOCK_E=256, num_warps=8, num_stages=2)
    if kind == "fwd_e512":  # third candidate for E >= 1024: a quarter of the recompute
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_E=512, num_warps=8, num_stages=2)
    if kind == "dv":        # program = (key tile, E tile): acc (BN, BE); BE 256 halves the score recompute; BM 32
        # keeps laplace's erf from serialising the wgmma chain (BM 64: 40-72 waits per query tile at Z >= 128)
        return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_E=max(16, min(256, np2e)), num_warps=8, num_stages=2)
    if kind == "dv_e512":   # autotuned against "dv" for E >= 1024: half again the recompute
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_E=512, num_warps=8, num_stages=2)
    if kind == "dk":        # program = key tile, square T x T tiles (bias diagonals), acc dk (T, BZ)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_E=max(16, min(64 if wide else 128, np2e)), num_warps=8,
                    num_stages=2)
    if kind == "dq":        # program = query tile, acc dq (BM, BZ)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_E=max(16, min(64 if wide else 128, np2e)), num_warps=8,
                    num_stages=2)
    raise ValueError(f"unknown kernel kind {kind!r}")
