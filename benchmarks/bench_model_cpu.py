"""MegaModel forward and forward+backward on the CPU, ours against transformers 4.57.6 in the same run.

    python -m pytest benchmarks/bench_model_cpu.py --benchmark-only --benchmark-group-by=param:mode

transformers is the comparison only (it is not a dependency of the package). Same config, same weights,
same inputs; ours runs with backend "auto" (the C++ cpu EMA when built) and with "reference".
"""
import pytest
import torch

transformers_mega = pytest.importorskip("transformers.models.deprecated.mega")

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
