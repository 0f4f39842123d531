"""One MEGA layer and one cached decoding step, per kernel backend (ANCHORS.md "One moving-average gated
attention layer").

    python -m benchmarks.bench_layer            # GPU, bf16: the LM and LRA layer shapes + LM decode steps (~1 min)
    python -m benchmarks.bench_layer --tiny     # CPU: tiny shapes, checks the script end to end

Rows (benchmarks/results/layer-<device>.json): `MegaMovingAverageGatedAttention` (norm, projections, EMA,
attention, gates) fwd and fwd+bwd with kernel_backend "reference" (plain PyTorch, transformers' maths: the
anchors' eager baseline) and "auto" (the kernels), speedup vs reference in the same run, peak MiB; and the
latency of one cached token step of a 2-layer MegaForCausalLM after a prompt (decode mode "step").
The note of each auto row holds max |out - reference out| (same dtype).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.harness import Row, fill_speedups, measure, save_rows
from mega_kernels import MegaConfig, MegaForCausalLM
from mega_kernels.modules import MegaMovingAverageGatedAttention

NO_DROPOUT = dict(dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  nffn_activation_dropout_prob=0.0)
# name: (B, L, config)
LAYERS = {
    "LM": (4, 4096, dict(hidden_size=1024, shared_representation_size=256, intermediate_size=2048,
                         ema_projection_size=16, use_chunking=True, chunk_size=1024, bidirectional=False,
                         is_decoder=True)),
    "LRA": (32, 4096, dict(hidden_size=128, shared_representation_size=64, intermediate_size=256,
                           ema_projection_size=16, use_chunking=True, chunk_size=128, bidirectional=True)),
}
DECODE = {"LM decode": (8, 1000, LAYERS["LM"][2])}  # (B, prompt length, config)
TINY_LAYERS = {"tiny": (2, 64, dict(hidden_size=32, shared_representation_size=16, intermediate_size=48,
                                    ema_projection_size=4, use_chunking=True, chunk_size=16, bidirectional=False,
                                    is_decoder=True))}
TINY_DECODE = {"tiny decode": (2, 20, TINY_LAYERS["tiny"][2])}
BACKENDS = ("reference", "auto")


def shape_str(b, L, cfg):
    return (f"B{b} L{L} D{cfg['hidden_size']} Z{cfg['shared_representation_size']} E{cfg['intermediate_size']} "
            f"C{cfg['chunk_size']}" + (" causal" if cfg.get("is_decoder") else " bi"))


def bench_layer(rows, name, b, L, cfg, device, dtype):
    torch.manual_seed(0)
    base = MegaMovingAverageGatedAttention(MegaConfig(**cfg, **NO_DROPOUT, kernel_backend="reference"))
    state = base.state_dict()
    x = torch.randn(b, L, cfg["hidden_size"], device=device, dtype=dtype)
    causal = bool(cfg.get("is_decoder"))
    outs = {}
    for backend in BACKENDS:
        layer = MegaMovingAverageGatedAttention(MegaConfig(**cfg, **NO_DROPOUT, kernel_backend=backend))
        layer.load_state_dict(state)
        layer = layer.to(device, dtype)
        xg = x.clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return layer(x, None, causal)[0]

        def fwd_bwd():
            out = layer(xg, None, causal)[0]
            return torch.autograd.grad(out, [xg] + list(layer.parameters()), torch.ones_like(out))

        note = ""
        try:
            outs[backend] = fwd()
            if backend != "reference" and "reference" in outs:
                note = f"max|diff| {(outs[backend].float() - outs['reference'].float()).abs().max().item():.2e}"
        except Exception as exc:  # keep the other rows
            note = f"{type(exc).__name__}: {exc}"[:200]
        common = dict(op="layer", shape=shape_str(b, L, cfg), dtype=str(dtype).replace("torch.", ""),
                      backend=backend, note=note)
        measure(rows, fwd, device, mode="fwd", **common)
        measure(rows, fwd_bwd, device, mode="fwd+bwd", **common)


def bench_decode(rows, name, b, prompt, cfg, device, dtype):
    torch.manual_seed(0)
    model_cfg = dict(cfg, num_hidden_layers=2, vocab_size=1000, **NO_DROPOUT)
    base = MegaForCausalLM(MegaConfig(**model_cfg, kernel_backend="reference"))
    state = base.state_dict()
    ids = torch.randint(3, 1000, (b, prompt + 1), device=device)
    for backend in BACKENDS:
        model = MegaForCausalLM(MegaConfig(**model_cfg, kernel_backend=backend))
        model.load_state_dict(state)
        model = model.to(device, dtype).eval()
        with torch.no_grad():
            past = model(ids[:, :prompt], use_cache=True).past_key_values

        def step():
            with torch.no_grad():
                return model(ids[:, prompt:], past_key_values=past, use_cache=True).logits

        measure(rows, step, device, op="decode", mode="step", shape=f"B{b} ctx{prompt} 2 layers " +
                shape_str(b, 1, cfg).split(" ", 2)[2], dtype=str(dtype).replace("torch.", ""), backend=backend)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes (end-to-end check)")
    args = parser.parse_args(argv)
    if args.tiny or not torch.cuda.is_available():
        device, dtype, layers, decode = "cpu", torch.float32, TINY_LAYERS, TINY_DECODE
    else:
        device, dtype, layers, decode = "cuda", torch.bfloat16, LAYERS, DECODE
    rows: list[Row] = []
    for name, (b, L, cfg) in layers.items():
        bench_layer(rows, name, b, L, cfg, device, dtype)
    for name, (b, prompt, cfg) in decode.items():
        bench_decode(rows, name, b, prompt, cfg, device, dtype)
    fill_speedups(rows)
    save_rows(rows, "layer", device)


if __name__ == "__main__":
    main()
