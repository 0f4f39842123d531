"""torch.compile of whole models: fullgraph (no graph break) with dynamic shapes, on every CPU backend, gives the
eager outputs and gradients for two sequence lengths. A backend's module is loaded by `backends.preload(device,
config.kernel_backend)` (the reference's always is), since torch.compile cannot trace an import."""
import pytest
import torch

from model_helpers import config_dict

import mega_kernels
from mega_kernels import MegaConfig
from mega_kernels.ops import backends

CASES = [
    ("MegaForCausalLM", dict(is_decoder=True, bidirectional=False, use_chunking=True, chunk_size=4, truncation=5)),
    ("MegaForSequenceClassification", dict(attention_activation="laplace", normalization_type="layernorm")),
]


@pytest.mark.parametrize("backend", ["reference", "triton", {"ema": "cpu"}], ids=str)
@pytest.mark.parametrize("head,overrides", CASES, ids=[c[0] for c in CASES])
def test_fullgraph_dynamic_compile_equals_eager(head, overrides, backend, monkeypatch):
    for op_entries in backends._REGISTRY.values():  # as in a fresh process: only the reference is loaded
        for name, entry in op_entries.items():
            if name != "reference":
                monkeypatch.setattr(entry, "_impl", None)
    if backend != "reference":
        backends.preload("cpu", backend)
    model = getattr(mega_kernels, head)(MegaConfig(**config_dict(**overrides, kernel_backend=backend))).eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for length in (7, 12):
        ids = torch.randint(3, 50, (2, length))
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, :2] = 0
        outs = []
        for m in (compiled, model):
            model.zero_grad()
            logits = m(ids, attention_mask=mask).logits
            (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
            outs.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
        for got, want in zip(*outs):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [{"ema": "cpu"}, "auto"], ids=str)
@pytest.mark.parametrize("extension_probed", [True, False], ids=["extension-probed", "fresh-process"])
def test_compiling_before_loading_a_backend_says_what_to_call(monkeypatch, backend, extension_probed):
    """Fresh process: the extension not even probed (its probe would load it under a lock, which tracing cannot
    enter); auto must say the same, not fall back to the reference."""
    from mega_kernels import _ext

    monkeypatch.setattr(backends._REGISTRY["ema"]["cpu"], "_impl", None)
    if extension_probed:
        _ext.load()
    else:
        monkeypatch.setattr(_ext, "_STATE", None)
    model = mega_kernels.MegaModel(MegaConfig(**config_dict(kernel_backend=backend))).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"preload\(device, 'cpu'\) \(a model: preload\(device, model.config."):
        compiled(torch.randint(3, 50, (2, 7)))
