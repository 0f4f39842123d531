"""MegaModel forward and forward+backward on the CPU, ours against transformers 4.57.6 in the same run.

    python -m pytest benchmarks/bench_model_cpu.py --benchmark-only --benchmark-group-by=param:mode

transformers is the comparison only (it is not a dependency of the package). Same config, same weights,
same inputs; ours runs with backend "auto" (the C++ cpu EMA when built) and with "reference".
"""
import pytest
import torch

transformers_mega = pytest.importorskip("transformers.models.deprecated.mega")

import mega_kernels  # noqa: E402
from mega_kernels import MegaConfig, MegaModel  # noqa: E402

CONFIG = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, intermediate_size=256,
              shared_representation_size=64, ema_projection_size=16, nffn_hidden_size=256,
              bidirectional=True, use_chunking=False, max_positions=1024, dropout_prob=0.0,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0)
BATCH, LENGTH = 4, 1024


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    theirs = transformers_mega.MegaModel(transformers_mega.MegaConfig(**CONFIG)).eval()
    ours = {}
    for backend in ("auto", "reference"):
        m = MegaModel(MegaConfig(**CONFIG, kernel_backend=backend)).eval()
        m.load_state_dict(theirs.state_dict(), strict=True)
        ours[backend] = m
    ids = torch.randint(3, CONFIG["vocab_size"], (BATCH, LENGTH))
    return {"transformers": theirs, "ours-auto": ours["auto"], "ours-reference": ours["reference"]}, ids


@pytest.mark.parametrize("impl", ["transformers", "ours-auto", "ours-reference"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_model_cpu(benchmark, models, impl, mode):
    table, ids = models
    model = table[impl]
    benchmark.group = f"MegaModel {mode} B{BATCH} L{LENGTH} D{CONFIG['hidden_size']}"

    # fwd: eval mode, no grad (inference; transformers may reuse its cached EMA kernel there).
    # fwd+bwd: train mode (every dropout is 0 in CONFIG, so the maths is eval's): transformers' eval-mode
    # kernel cache would otherwise keep the EMA parameters out of the graph after a no-grad call.
    model.train(mode == "fwd+bwd")

    def run():
        if mode == "fwd":
            with torch.no_grad():
                return model(ids)[0]
        out = model(ids)[0]
        out.square().mean().backward()
        return out

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


DECODER = dict(CONFIG, is_decoder=True, bidirectional=False)
CONTEXT = 1024  # cached tokens before the timed step


@pytest.fixture(scope="module")
def decoders():
    torch.manual_seed(0)
    theirs = transformers_mega.MegaForCausalLM(transformers_mega.MegaConfig(**DECODER)).eval()
    table = {"transformers": theirs}
    for backend in ("auto", "reference"):
        m = mega_kernels.MegaForCausalLM(MegaConfig(**DECODER, kernel_backend=backend)).eval()
        m.load_state_dict(theirs.state_dict(), strict=True)
        table[f"ours-{backend}"] = m
    prompt = torch.randint(3, CONFIG["vocab_size"], (1, CONTEXT))
    with torch.no_grad():
        past = {name: m(prompt, use_cache=True).past_key_values for name, m in table.items()}
    return table, past


@pytest.mark.parametrize("impl", ["transformers", "ours-auto", "ours-reference"])
def test_decode_step_cpu(benchmark, decoders, impl):
    """One cached greedy step of MegaForCausalLM after CONTEXT tokens (B1, unchunked softmax)."""
    table, past = decoders
    benchmark.group = f"MegaForCausalLM decode step B1 context {CONTEXT} D{CONFIG['hidden_size']}"
    token = torch.tensor([[5]])
    mask = torch.ones(1, CONTEXT + 1, dtype=torch.long)

    def run():
        with torch.no_grad():
            return table[impl](token, past_key_values=past[impl], attention_mask=mask, use_cache=True).logits

    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
