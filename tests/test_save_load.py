"""Checkpoints in transformers' format: ours -> transformers -> ours round trips (safetensors and
pytorch_model.bin), tied output embeddings, the body's strict key matching, a body under another head, weights
of another shape, config overrides and loading options."""
import json
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
    assert list(back.state_dict()) == list(ours.state_dict())
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


def test_the_body_loads_strictly(tmp_path):
    ours = _ours("MegaForMaskedLM")
    ours.save_pretrained(str(tmp_path), safe_serialization=False)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state.pop("mega.layers.0.mega_layer.qk_bias")
    state["mega.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    for cls in (mega_kernels.MegaForMaskedLM, mega_kernels.MegaModel, mega_kernels.MegaForSequenceClassification):
        with pytest.raises(KeyError) as info:
            cls.from_pretrained(str(tmp_path))
        assert "qk_bias" in str(info.value) and "extra" in str(info.value)
    with pytest.raises(FileNotFoundError, match="config.json"):
        mega_kernels.MegaModel.from_pretrained(str(tmp_path / "missing"))


def _body(model):
    base = model.base_model
    return {k: v for k, v in base.state_dict().items() if not k.startswith("pooler.")}


@pytest.mark.parametrize("source,target,fresh,ignored", [
    ("MegaForMaskedLM", "MegaForSequenceClassification", ["classifier.dense.bias", "classifier.out_proj.weight"],
     ["mlm_head.bias", "dense.weight"]),
    ("MegaForMaskedLM", "MegaModel", ["pooler.dense.weight"], ["mlm_head.bias"]),
    ("MegaModel", "MegaForCausalLM", ["lm_head.bias", "dense.weight"], ["mega.pooler.dense.weight"]),
    ("MegaForSequenceClassification", "MegaForMultipleChoice", ["classifier.weight"], ["classifier.dense.weight"]),
], ids=["mlm-to-classifier", "mlm-to-body", "body-to-causal", "classifier-to-choice"])
def test_a_body_loads_under_another_head(tmp_path, caplog, source, target, fresh, ignored):
    """The fine-tuning path: the body's weights load exactly; the new head keeps its init and is logged, as are
    the checkpoint's weights the model does not use."""
    dec = dict(is_decoder=True, bidirectional=False)
    ours = _ours(source, **dec)
    ours.save_pretrained(str(tmp_path))
    with caplog.at_level("WARNING", logger="mega_kernels"):
        back = getattr(mega_kernels, target).from_pretrained(str(tmp_path))
    want, got = _body(ours), _body(back)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    new, unused = [r.getMessage() for r in caplog.records if "newly initialized" in r.getMessage()], \
        [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(new) == 1 and all(k in new[0] for k in fresh) and "mega.layers" not in new[0]
    assert len(unused) == 1 and all(k in unused[0] for k in ignored)
    ids = torch.randint(3, 50, (1, 2, 6) if target == "MegaForMultipleChoice" else (2, 6))
    back(ids)


def test_weights_of_another_shape(tmp_path, caplog):
    ours = _ours("MegaForSequenceClassification")
    ours.save_pretrained(str(tmp_path))
    cls = mega_kernels.MegaForSequenceClassification
    with pytest.raises(ValueError, match=r"classifier.out_proj.weight: checkpoint \(2, 16\), model \(5, 16\).*"
                                         r"ignore_mismatched_sizes=True"):
        cls.from_pretrained(str(tmp_path), num_labels=5)
    with caplog.at_level("WARNING", logger="mega_kernels"):
        back = cls.from_pretrained(str(tmp_path), num_labels=5, ignore_mismatched_sizes=True)
    assert back.config.num_labels == 5 and back.classifier.out_proj.weight.shape == (5, 16)
    assert torch.equal(back.classifier.dense.weight, ours.classifier.dense.weight)
    assert "classifier.out_proj.bias" in caplog.text and "classifier.dense" not in caplog.text


def test_load_with_overrides(tmp_path):
    _ours("MegaModel").save_pretrained(str(tmp_path))
    model = mega_kernels.MegaModel.from_pretrained(str(tmp_path), kernel_backend="reference",
                                                   torch_dtype=torch.float64)
    assert model.config.kernel_backend == "reference" and model.dtype == torch.float64
    assert model.layers[0].mega_layer.ema_gate.backend == "reference"


def test_load_options_and_unknown_overrides(tmp_path):
    """num_labels overrides; a misspelt option raises instead of landing in the config; dtype by name, by
    "auto" (the saved dtype, which save_pretrained writes as transformers does) and by its older name;
    device_map as one device."""
    ours = _ours("MegaForSequenceClassification").to(torch.bfloat16)
    ours.save_pretrained(str(tmp_path))
    cls = mega_kernels.MegaForSequenceClassification
    assert MegaConfig.from_pretrained(str(tmp_path)).dtype == "bfloat16"  # the key transformers 4.57 writes
    assert cls.from_pretrained(str(tmp_path)).dtype == torch.float32  # default: float32, as transformers
    assert cls.from_pretrained(str(tmp_path), dtype="auto").dtype == torch.bfloat16
    assert cls.from_pretrained(str(tmp_path), torch_dtype="float64").dtype == torch.float64
    hf.MegaForSequenceClassification.from_pretrained(str(tmp_path), dtype=torch.bfloat16).save_pretrained(
        str(tmp_path / "hf"))
    assert cls.from_pretrained(str(tmp_path / "hf"), dtype="auto").dtype == torch.bfloat16  # transformers' too
    for device_map in ("cpu", {"": "cpu"}, torch.device("cpu"), "auto" if not torch.cuda.is_available() else "cpu"):
        assert cls.from_pretrained(str(tmp_path), device_map=device_map).device == torch.device("cpu")
    with pytest.raises(TypeError, match="unknown argument.*kernel_bakend"):
        cls.from_pretrained(str(tmp_path), kernel_bakend="reference")
    with pytest.raises(ValueError, match="loads on one device"):
        cls.from_pretrained(str(tmp_path), device_map={"mega": "cpu", "classifier": "cpu"})
    with pytest.raises(ValueError, match="pass a floating torch.dtype"):
        cls.from_pretrained(str(tmp_path), dtype="int8")
    with pytest.raises(ValueError, match="is not a device"):
        cls.from_pretrained(str(tmp_path), device_map="gpu0")
    for bad in (torch.int32, torch.complex64):  # a torch.dtype is checked too (complex loaded silently before)
        with pytest.raises(ValueError, match="pass a floating torch.dtype"):
            cls.from_pretrained(str(tmp_path), dtype=bad)
    cuda = f"cuda:{torch.cuda.device_count()}"  # a device this machine lacks: refused before the model is built
    with pytest.raises(ValueError, match=f"device_map '{cuda}': this machine has"):
        cls.from_pretrained(str(tmp_path), device_map=cuda)


def test_overrides_apply_before_the_saved_config_is_checked(tmp_path):
    """transformers saves a causal LM with is_decoder=True and bidirectional=True (it trains it with
    use_cache=False); ours refuses that config, and is_decoder=False given to from_pretrained repairs it before
    the check: the outputs of transformers' model loaded with the same keyword."""
    from parity import hf_config_mod

    theirs = hf.MegaForCausalLM(hf_config_mod.MegaConfig(**config_dict(is_decoder=True, bidirectional=True))).eval()
    perturb_(theirs)
    theirs.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="bidirectional=True with is_decoder=True"):
        mega_kernels.MegaForCausalLM.from_pretrained(str(tmp_path))
    ours = mega_kernels.MegaForCausalLM.from_pretrained(str(tmp_path), is_decoder=False)
    theirs = hf.MegaForCausalLM.from_pretrained(str(tmp_path), is_decoder=False).eval()
    ids = torch.randint(3, 50, (2, 6))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_sharded_checkpoints_written_by_transformers(tmp_path, safe):
    ours = _ours("MegaForMaskedLM", tie_word_embeddings=False)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs = hf.MegaForMaskedLM.from_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "sharded"), max_shard_size="5KB", safe_serialization=safe)
    files = os.listdir(tmp_path / "sharded")
    index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    assert index in files and sum(f.endswith(".safetensors" if safe else ".bin") for f in files) >= 3
    back = mega_kernels.MegaForMaskedLM.from_pretrained(str(tmp_path / "sharded"))
    assert back.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items())
    with open(tmp_path / "sharded" / index) as f:
        meta = json.load(f)
    key, shard = next(iter(meta["weight_map"].items()))
    meta["weight_map"][key] = next(s for s in meta["weight_map"].values() if s != shard)  # the wrong shard
    with open(tmp_path / "sharded" / index, "w") as f:
        json.dump(meta, f)
    with pytest.raises(KeyError, match="lists weights its shards do not hold"):
        mega_kernels.MegaForMaskedLM.from_pretrained(str(tmp_path / "sharded"))
