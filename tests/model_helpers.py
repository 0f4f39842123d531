"""Model-test helpers that do not need transformers (the decoding and GPU model tests use these; the parity
helpers in tests/parity.py add transformers on top): small configs, weight perturbation, the recursive
float32-rounding comparison, and the GPU kernel backends to test."""
from __future__ import annotations

import math

import torch

# Small sizes so the whole parity suite runs in about a minute on 2 CPU cores.
SMALL = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, intermediate_size=24, ema_projection_size=3,
             shared_representation_size=8, nffn_hidden_size=20, max_positions=32, type_vocab_size=3)

# Outputs agree to float32 rounding: a few ulps of the value's magnitude, accumulated over two layers.
OUT_RTOL = 2e-5
GRAD_RTOL = 1e-4


def config_dict(**overrides) -> dict:
    d = dict(SMALL)
    d.update(overrides)
    return d


def perturb_(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Move every parameter and batchnorm statistic off its trivial init (zeros, ones) so a wrong bias or
    scale cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * scale)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)


def assert_close(name: str, ours, theirs, rtol: float = OUT_RTOL) -> None:
    """Recursive comparison of tensors / tuples / None: max |ours - theirs| <= rtol * (1 + max |theirs|)."""
    if theirs is None or ours is None:
        assert ours is None and theirs is None, f"{name}: one side is None ({type(ours)}, {type(theirs)})"
        return
    if isinstance(theirs, (tuple, list)):
        assert isinstance(ours, (tuple, list)) and len(ours) == len(theirs), \
            f"{name}: lengths {len(ours) if isinstance(ours, (tuple, list)) else type(ours)} != {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close(f"{name}[{i}]", a, b, rtol)
        return
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    assert torch.isfinite(theirs).all(), f"{name}: transformers gives non-finite values (a case it cannot do)"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if not ours.is_floating_point():
        assert torch.equal(ours, theirs), f"{name}: differs"
        return
    err = (ours.double() - theirs.double()).abs().max().item() if ours.numel() else 0.0
    bound = rtol * (1.0 + (theirs.abs().max().item() if theirs.numel() else 0.0))
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def assert_grads_close(hf_model, ours, rtol: float = GRAD_RTOL) -> None:
    """Every parameter's gradient equal to float32 rounding (relative to the largest gradient of the tensor)."""
    theirs = dict(hf_model.named_parameters())
    for name, p in ours.named_parameters():
        g_hf = theirs[name].grad
        if g_hf is None:
            assert p.grad is None or not p.grad.any(), f"grad of {name}: transformers has none, ours is nonzero"
            continue
        assert p.grad is not None, f"grad of {name}: missing"
        assert_close(f"grad of {name}", p.grad, g_hf, rtol)


def weighted_sum(t: torch.Tensor, seed: int) -> torch.Tensor:
    """A scalar depending on every entry of t with fixed random weights (same for both models)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
    return (t * w).sum() / math.sqrt(t.numel())


# a decoder without dropout (decoding and generate tests)
DEC = dict(is_decoder=True, bidirectional=False, dropout_prob=0.0, hidden_dropout_prob=0.0,
           attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0)


def decoder(weight_noise=0.1, **overrides):
    """A small float64 MegaForCausalLM in eval mode, its weights moved off the trivial init by normal noise
    (weight_noise 1: outputs that depend strongly on every input, varied greedy tokens)."""
    from mega_kernels import MegaConfig, MegaForCausalLM

    torch.manual_seed(0)
    model = MegaForCausalLM(MegaConfig(**config_dict(**DEC, **overrides)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * weight_noise)
    return model.double().eval()


def left_padded_ids(bsz, length, vocab):
    """(ids, mask) (bsz, length): random ids in [3, vocab), the second row left-padded by 3 (id 1)."""
    ids = torch.randint(3, vocab, (bsz, length))
    mask = torch.ones(bsz, length, dtype=torch.long)
    mask[1, :3] = 0
    ids[mask == 0] = 1
    return ids, mask


def gpu_backends():
    """kernel_backend settings that run MEGA's ops on this CUDA device through each GPU kernel backend: the name
    when it implements both ops, else a per-op dict (the other op on "auto"). At least one is required."""
    from mega_kernels import ops

    avail = {op: ops.available_backends(op, "cuda") for op in ("ema", "attention")}
    settings = []
    for name in ("triton", "cuda"):
        ops_with = [op for op in avail if op in avail and name in avail[op] and avail[op][name] is None]
        if len(ops_with) == 2:
            settings.append(name)
        elif ops_with:
            settings.append({ops_with[0]: name})
    assert settings, f"no kernel backend runs on this GPU: {avail}"
    return settings
