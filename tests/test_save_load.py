"""Checkpoints in transformers' format: ours -> transformers -> ours round trips (safetensors and
pytorch_model.bin), tied output embeddings, strict key matching, config overrides on load."""
import os

import pytest
import torch

from parity import config_dict, hf, perturb_

import mega_kernels
from mega_kernels import MegaConfig


def _ours(head, **overrides):
    model = getattr(mega_kernels, head)(MegaConfig(**config_dict(**overrides)))
    perturb_(model)
    return model.eval()


@pytest.mark.parametrize("head, safe, overrides", [
    ("MegaForMaskedLM", True, dict(add_token_type_embeddings=True)),
    ("MegaForCausalLM", False, dict(is_decoder=True, bidirectional=False, relative_positional_bias="simple")),
    ("MegaForSequenceClassification", True, dict(num_labels=3, normalization_type="batchnorm")),
    ("MegaModel", False, dict(use_chunking=True, chunk_size=4)),
], ids=["mlm-safetensors", "causal-bin", "seqcls-safetensors", "model-bin"])
def test_round_trip_through_transformers(tmp_path, head, safe, overrides):
    ours = _ours(head, **overrides)
    ids = torch.randint(0, 50, (2, 8))
    first = ours(ids).to_tuple()[0]
    ours.save_pretrained(str(tmp_path / "ours"), safe_serialization=safe)
    expected_file = "model.safetensors" if safe else "pytorch_model.bin"
    assert os.path.isfile(tmp_path / "ours" / expected_file)

    theirs = getattr(hf, head).from_pretrained(str(tmp_path / "ours")).eval()
    kwargs = dict(use_cache=False) if overrides.get("is_decoder") else {}
    assert torch.allclose(theirs(ids, **kwargs)[0], first, atol=1e-5)
    theirs.save_pretrained(str(tmp_path / "theirs"), safe_serialization=safe)

    back = getattr(mega_kernels, head).from_pretrained(str(tmp_path / "theirs"))
    assert not back.training
    assert torch.equal(back(ids).to_tuple()[0], first)
    for (name, a), (_, b) in zip(back.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name


def test_tied_output_embeddings(tmp_path):
    ours = _ours("MegaForCausalLM", is_decoder=True, bidirectional=False)
    assert ours.lm_head.weight is ours.mega.embedding_layer.word_embeddings.weight
    ours.save_pretrained(str(tmp_path))
    back = mega_kernels.MegaForCausalLM.from_pretrained(str(tmp_path))
    assert back.lm_head.weight is back.mega.embedding_layer.word_embeddings.weight
    untied = _ours("MegaForMaskedLM", tie_word_embeddings=False)
    assert untied.mlm_head.weight is not untied.mega.embedding_layer.word_embeddings.weight


def test_strict_keys(tmp_path):
    ours = _ours("MegaForMaskedLM")
    ours.save_pretrained(str(tmp_path), safe_serialization=False)
    with pytest.raises(KeyError, match="with a head"):
        mega_kernels.MegaModel.from_pretrained(str(tmp_path))
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state.pop("mega.layers.0.mega_layer.qk_bias")
    state["mega.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(KeyError) as info:
        mega_kernels.MegaForMaskedLM.from_pretrained(str(tmp_path))
    assert "qk_bias" in str(info.value) and "mega.extra" in str(info.value)
    with pytest.raises(FileNotFoundError, match="config.json"):
        mega_kernels.MegaModel.from_pretrained(str(tmp_path / "missing"))


def test_load_with_overrides(tmp_path):
    _ours("MegaModel").save_pretrained(str(tmp_path))
    model = mega_kernels.MegaModel.from_pretrained(str(tmp_path), kernel_backend="reference",
                                                   torch_dtype=torch.float64)
    assert model.config.kernel_backend == "reference" and model.dtype == torch.float64
    assert model.layers[0].mega_layer.ema_gate.backend == "reference"
