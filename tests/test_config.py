"""MegaConfig: the spec's defaults, transformers' config dicts loaded unchanged (unknown keys kept), to_dict /
JSON round trips in both directions, and validation errors that name the argument and the fix."""
import json

import pytest

from parity import hf_config_mod

from mega_kernels import MegaConfig
from mega_kernels.config import MEGA_DEFAULTS

SPEC_DEFAULTS = dict(
    vocab_size=30522, hidden_size=128, num_hidden_layers=4, intermediate_size=256, ema_projection_size=16,
    bidirectional=True, shared_representation_size=64, use_chunking=False, chunk_size=-1, truncation=None,
    normalize_before_mega=True, normalization_type="scalenorm", norm_affine=True, activation="silu",
    attention_activation="softmax", dropout_prob=0.1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    use_feature_dropout=False, use_normalized_ffn=True, nffn_hidden_size=256, normalize_before_ffn=True,
    nffn_activation_dropout_prob=0.1, max_positions=2048, add_token_type_embeddings=False, type_vocab_size=2,
    initializer_range=0.02, ema_delta_alpha_range=0.2, ema_beta_range=0.02, ema_gamma_omega_range=1.0,
    pad_token_id=1, bos_token_id=0, eos_token_id=2, relative_positional_bias="rotary", classifier_dropout=None,
    use_cache=True, add_lm_hidden_dense_layer=True, is_decoder=False, add_cross_attention=False,
    tie_word_embeddings=True, num_labels=2, problem_type=None, kernel_backend="auto")


def test_defaults_are_the_spec_and_transformers_defaults():
    cfg = MegaConfig()
    for name, value in SPEC_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    theirs = hf_config_mod.MegaConfig()
    for name, _ in MEGA_DEFAULTS:
        assert getattr(cfg, name) == getattr(theirs, name), name


def test_transformers_config_json_loads_unchanged_and_round_trips(tmp_path):
    theirs = hf_config_mod.MegaConfig(hidden_size=32, use_chunking=True, chunk_size=16, num_labels=3,
                                      custom_key={"kept": [1, 2]}, architectures=["MegaForMaskedLM"])
    theirs.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    ours = MegaConfig.from_pretrained(str(tmp_path))
    assert ours.num_labels == 3 and ours.custom_key == {"kept": [1, 2]}
    mine = ours.to_dict()
    for key, value in raw.items():  # every key of transformers' file survives with its value
        assert mine[key] == value, key
    ours.save_pretrained(str(tmp_path / "back"))
    again = hf_config_mod.MegaConfig.from_pretrained(str(tmp_path / "back"))
    assert again.num_labels == 3 and again.chunk_size == 16 and again.kernel_backend == "auto"
    assert MegaConfig.from_json_file(str(tmp_path / "back" / "config.json")) == ours


def test_unknown_and_private_keys_are_kept():
    raw = {"model_type": "mega", "_name_or_path": "mnaylor/mega-base-wikitext", "torch_dtype": "float32",
           "architectures": ["MegaForMaskedLM"], "hidden_size": 32}
    d = MegaConfig.from_dict(raw).to_dict()
    assert {k: d[k] for k in raw} == raw


def test_to_dict_and_copy():
    cfg = MegaConfig(hidden_size=24, kernel_backend="reference", id2label={"0": "neg", "1": "pos"})
    d = cfg.to_dict()
    assert d["model_type"] == "mega" and d["kernel_backend"] == "reference"
    assert d["id2label"] == {"0": "neg", "1": "pos"} and d["label2id"] == {"neg": 0, "pos": 1}
    assert MegaConfig.from_dict(d) == cfg
    per_op = MegaConfig(kernel_backend={"ema": "cpu"})
    assert per_op.backend_for("ema") == "cpu" and per_op.backend_for("attention") == "auto"
    assert cfg.copy(hidden_size=32).hidden_size == 32 and cfg.hidden_size == 24


def test_labels_as_transformers(caplog):
    """id2label wins over a num_labels of another size (logged), as in transformers' constructor; an override
    (copy, from_dict, from_pretrained keywords) wins over saved labels; label2id can be assigned, as fine-tuning
    scripts do, and sets id2label to its inverse."""
    theirs = hf_config_mod.MegaConfig(id2label={0: "a", 1: "b"}, num_labels=3)
    with caplog.at_level("WARNING", logger="mega_kernels"):
        ours = MegaConfig(id2label={0: "a", 1: "b"}, num_labels=3)
    assert ours.num_labels == theirs.num_labels == 2 and ours.id2label == theirs.id2label
    assert "num_labels=3 does not match" in caplog.text
    assert ours.copy(num_labels=5).num_labels == 5
    assert MegaConfig.from_dict(ours.to_dict(), num_labels=4).num_labels == 4
    ours.label2id = {"neg": 0, "mid": 1, "pos": 2}
    assert ours.id2label == {0: "neg", 1: "mid", 2: "pos"} and ours.num_labels == 3
    assert MegaConfig(label2id={"x": 1, "y": 0}).id2label == {0: "y", 1: "x"}


def test_a_torch_dtype_attribute_serialises_by_name(tmp_path):
    import torch

    cfg = MegaConfig(torch_dtype=torch.float16, dtype=torch.bfloat16)
    assert cfg.to_dict()["torch_dtype"] == "float16" and "bfloat16" in repr(cfg)
    cfg.save_pretrained(str(tmp_path))
    assert MegaConfig.from_pretrained(str(tmp_path)).dtype == "bfloat16"


@pytest.mark.parametrize("kwargs, names", [
    (dict(activation="swishy"), ["activation", "use one of"]),
    (dict(attention_activation="sparsemax"), ["attention_activation", "softmax"]),
    (dict(normalization_type="groupnorm"), ["normalization_type", "scalenorm"]),
    (dict(relative_positional_bias="alibi"), ["relative_positional_bias", "rotary"]),
    (dict(is_decoder=True), ["bidirectional", "bidirectional=False"]),
    (dict(shared_representation_size=63), ["shared_representation_size", "even"]),
    (dict(use_chunking=True), ["chunk_size", "positive"]),
    (dict(use_chunking=True, chunk_size=0), ["chunk_size", "positive"]),
    (dict(truncation=0), ["truncation", "positive"]),
    (dict(truncation=True), ["truncation", "positive"]),
    (dict(add_cross_attention=True), ["add_cross_attention", "is_decoder=True"]),
    (dict(hidden_size=0), ["hidden_size", "positive"]),
    (dict(vocab_size=1), ["pad_token_id=1 must be None or a token id in [0, vocab_size=1)"]),
    (dict(pad_token_id="1"), ["pad_token_id='1' must be None or a token id"]),
    (dict(pad_token_id=-1), ["pad_token_id=-1"]),
    (dict(dropout_prob=1.5), ["dropout_prob", "[0, 1]"]),
    (dict(kernel_backend="cudnn"), ["kernel_backend", "auto"]),
    (dict(kernel_backend={"ema": "cuda", "attn": "triton"}), ["kernel_backend", "'attention'"]),
    (dict(kernel_backend="cpu"), ["kernel_backend='cpu' names no kernels for attention", "{'ema': 'cpu'}"]),
    (dict(kernel_backend="cuda"), ["kernel_backend='cuda' names no kernels for attention", "{'ema': 'cuda'}"]),
    (dict(kernel_backend={"attention": "cpu"}), ["names 'cpu' for attention, which has no such kernels",
                                                 "'reference'"]),
    (dict(kernel_backend={"ema": "reference", "attention": "cuda"}), ["'cuda' for attention"]),
    (dict(relative_positional_bias="simple", chunk_size=64, max_positions=32), ["chunk_size", "max_positions"]),
    (dict(problem_type="ranking"), ["problem_type", "regression"]),
    (dict(use_chunking="False", chunk_size=4), ["use_chunking", "a bool, not a string"]),
    (dict(bidirectional="false"), ["bidirectional", "True or False"]),
    (dict(norm_affine="no"), ["norm_affine", "True or False"]),
    (dict(chunk_size=True), ["chunk_size", "not a bool"]),
    (dict(chunk_size=True, use_chunking=True), ["chunk_size", "not a bool"]),
    (dict(dropout_prob=True), ["dropout_prob", "[0, 1]"]),
])
def test_validation_names_the_argument_and_the_fix(kwargs, names):
    with pytest.raises(ValueError) as info:
        MegaConfig(**kwargs)
    for name in names:
        assert name in str(info.value)


def test_models_revalidate_a_changed_config():
    import mega_kernels

    cfg = MegaConfig(hidden_size=16, shared_representation_size=8, intermediate_size=8, nffn_hidden_size=8,
                     num_hidden_layers=1, vocab_size=20)
    cfg.is_decoder = True  # bidirectional is still True
    with pytest.raises(ValueError, match="bidirectional"):
        mega_kernels.MegaModel(cfg)


def test_modules_pass_the_configured_backend_to_the_ops(monkeypatch):
    """config.kernel_backend reaches every ops call; set_kernel_backend switches it ("auto" leaves the choice,
    including MEGA_KERNELS_BACKEND, to the ops)."""
    import torch

    import mega_kernels
    from mega_kernels import ops

    seen = []
    for name in ("ema", "ema_step", "attention"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: (seen.append((_name, k["backend"])),
                                                                                  _real(*a, **k))[1])
    cfg = MegaConfig(vocab_size=20, hidden_size=16, shared_representation_size=8, intermediate_size=8,
                     nffn_hidden_size=8, num_hidden_layers=2, is_decoder=True, bidirectional=False,
                     kernel_backend={"ema": "reference"})
    model = mega_kernels.MegaForCausalLM(cfg).eval()
    out = model(torch.randint(0, 20, (1, 3)), use_cache=True)
    model(torch.randint(0, 20, (1, 1)), past_key_values=out.past_key_values)
    assert set(seen) == {("ema", "reference"), ("ema_step", "reference"), ("attention", "auto")}
    seen.clear()
    model.set_kernel_backend("reference")
    model(torch.randint(0, 20, (1, 3)), use_cache=False)
    assert set(seen) == {("ema", "reference"), ("attention", "reference")}
    with pytest.raises(ValueError, match="kernel_backend"):
        model.set_kernel_backend("fast")
    assert model.config.kernel_backend == "reference"
    seen.clear()
    model.config.kernel_backend = {"attention": "reference"}  # assigned after building: the next call applies it
    model(torch.randint(0, 20, (1, 3)))
    assert set(seen) == {("ema", "auto"), ("attention", "reference")}
    model.config.kernel_backend["ema"] = "reference"  # changed in place
    seen.clear()
    model(torch.randint(0, 20, (1, 3)))
    assert set(seen) == {("ema", "reference"), ("attention", "reference")}
    model.config.kernel_backend = {"attention": "cpu"}
    with pytest.raises(ValueError, match="'cpu' for attention"):
        model(torch.randint(0, 20, (1, 3)))


def test_preload_refuses_a_per_op_backend_the_op_lacks():
    from mega_kernels.ops import backends

    with pytest.raises(ValueError, match=r"\{'attention': 'cpu'\} names no kernels of attention"):
        backends.preload("cpu", {"attention": "cpu"})
    assert backends.preload("cpu", "cpu")["attention"] == "reference"  # one name: the ops that lack it take auto


def test_set_kernel_backend_reaches_cross_attention():
    import mega_kernels
    from mega_kernels.modules.cross_attention import MegaGatedCrossAttention

    cfg = MegaConfig(vocab_size=20, hidden_size=16, shared_representation_size=8, intermediate_size=8,
                     nffn_hidden_size=8, num_hidden_layers=2, is_decoder=True, bidirectional=False,
                     add_cross_attention=True)
    model = mega_kernels.MegaForCausalLM(cfg)
    cross = [m for m in model.modules() if isinstance(m, MegaGatedCrossAttention)]
    assert len(cross) == 2
    model.set_kernel_backend({"attention": "triton"})
    assert all(m.backend == "triton" for m in cross)
