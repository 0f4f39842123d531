"""Bad input raises an error that names the problem (and usually the fix)."""
import pytest
import torch

from parity import config_dict

import mega_kernels
from mega_kernels import MegaConfig
from mega_kernels.modules import MegaMultiDimensionDampedEma

DEC = dict(is_decoder=True, bidirectional=False)


def model(head="MegaModel", **overrides):
    return getattr(mega_kernels, head)(MegaConfig(**config_dict(**overrides))).eval()


IDS = torch.randint(2, 50, (2, 7))


@pytest.mark.parametrize("ids, match", [
    (torch.tensor([[3, 50]]), r"input_ids out of range.*vocab_size is 50"),
    (torch.tensor([[-1, 3]]), "input_ids out of range"),
])
def test_token_ids_out_of_range(ids, match):
    with pytest.raises(ValueError, match=match):
        model()(ids)


def test_token_type_ids_out_of_range():
    with pytest.raises(ValueError, match="token_type_ids out of range"):
        model(add_token_type_embeddings=True)(IDS, token_type_ids=torch.full_like(IDS, 3))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input_ids=IDS.float()), TypeError, "input_ids must be a torch.long or torch.int"),
    (dict(input_ids=IDS.to(torch.uint8)), TypeError, r"input_ids must be a torch.long or torch.int .*ids.long\(\)"),
    (dict(input_ids=IDS[0]), ValueError, r"input_ids must be \(B, L\), got shape \(7,\); .*ids\[None\]"),
    (dict(inputs_embeds=torch.randn(2, 7, 16, dtype=torch.float64)), TypeError, r"inputs_embeds is torch.float64"),
    (dict(inputs_embeds=torch.randn(2, 7, 15)), ValueError, r"inputs_embeds must be \(B, L, 16\)"),
    (dict(), ValueError, "exactly one of input_ids and inputs_embeds"),
    (dict(input_ids=IDS, inputs_embeds=torch.randn(2, 7, 16)), ValueError, "exactly one"),
    (dict(input_ids=IDS, attention_mask=torch.ones(2, 6)), ValueError, r"attention_mask must be \(B, L\) = \(2, 7\)"),
    (dict(input_ids=IDS, attention_mask=torch.ones(7)), ValueError, "attention_mask must be"),
])
def test_wrong_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        model()(**kwargs)


def test_too_long_for_the_simple_bias():
    with pytest.raises(ValueError, match="exceeds the simple relative bias' maximum 32.*rotary"):
        model(relative_positional_bias="simple")(torch.randint(2, 50, (1, 33)))
    model(relative_positional_bias="simple", use_chunking=True, chunk_size=8)(torch.randint(2, 50, (1, 33)))


def test_cache_needs_a_unidirectional_decoder():
    with pytest.raises(ValueError, match="bidirectional EMA"):
        model()(IDS, use_cache=True)
    with pytest.raises(ValueError, match="is_decoder=True, bidirectional=False"):
        model(bidirectional=False)(IDS, past_key_values=((None,) * 4,) * 2)
    ema = MegaMultiDimensionDampedEma(MegaConfig(**config_dict()))
    with pytest.raises(ValueError, match="unidirectional EMA"):
        ema(torch.randn(1, 3, 16), use_cache=True)


def test_bad_cache_and_mask_with_cache():
    dec = model("MegaForCausalLM", **DEC)
    past = dec(IDS, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="past_key_values has 1 layers"):
        dec(IDS[:, :1], past_key_values=past[:1])
    as_transformers = tuple(layer[:3] for layer in past)  # transformers' layout: no position entry
    with pytest.raises(ValueError, match=r"got entries of \[3\] items .*transformers' MEGA cache"):
        dec(IDS[:, :1], past_key_values=as_transformers)
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, L\) = \(2, 8\)"):
        dec(IDS[:, :1], past_key_values=past, attention_mask=torch.ones(2, 1))
    cross = model("MegaForCausalLM", **DEC, add_cross_attention=True)
    enc = torch.randn(2, 3, 16)
    past = cross(IDS, encoder_hidden_states=enc, use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"got entries of \[4\] items"):  # the cross K, V dropped
        cross(IDS[:, :1], encoder_hidden_states=enc, past_key_values=tuple(layer[:4] for layer in past))


@pytest.mark.parametrize("shape", [(1, 3, 16), (2, 3, 8), (3, 16)], ids=["batch", "width", "2d"])
def test_encoder_states_must_have_a_row_per_input_row(shape):
    """transformers raises on these too; broadcasting one row would leave a cache that beam search cannot use."""
    cross = model("MegaForCausalLM", **DEC, add_cross_attention=True)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(B, S, D\) = \(2, S, 16\)"):
        cross(IDS, encoder_hidden_states=torch.randn(*shape))


@pytest.mark.parametrize("head,labels", [("MegaForCausalLM", IDS[:, :5]), ("MegaForCausalLM", IDS.reshape(-1)),
                                         ("MegaForMaskedLM", IDS[:, :5]), ("MegaForMaskedLM", IDS.float())])
def test_token_labels_must_match_the_tokens(head, labels):
    overrides = DEC if head == "MegaForCausalLM" else {}
    with pytest.raises(ValueError, match=r"labels must be integer ids of shape \(B, L\) = \(2, 7\)"):
        model(head, **overrides)(IDS, labels=labels)
    model("MegaForMaskedLM")(IDS, labels=IDS.reshape(-1))  # as transformers: any shape holding B * L ids


@pytest.mark.parametrize("head,kwargs,name", [
    ("MegaForTokenClassification", dict(labels=torch.full((2, 7), 1.7)), "labels"),
    ("MegaForTokenClassification", dict(labels=torch.ones(2, 5, dtype=torch.long)), "labels"),
    ("MegaForMultipleChoice", dict(labels=torch.tensor([1.7])), "labels"),
    ("MegaForSequenceClassification", dict(labels=torch.tensor([1.7, 0.0]),
                                           problem_type="single_label_classification"), "labels"),
    ("MegaForQuestionAnswering", dict(start_positions=torch.tensor([1.7, 2.0]), end_positions=torch.tensor([3, 2])),
     "start_positions"),
    ("MegaForQuestionAnswering", dict(start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3.5, 2])),
     "end_positions")], ids=["token-float", "token-shape", "choice", "sequence", "qa-start", "qa-end"])
def test_class_labels_must_be_integer_ids(head, kwargs, name):
    """Float class labels are refused, not truncated to ids (transformers' cross-entropy raises on them too); token
    classification labels must hold one id per token."""
    kwargs = dict(kwargs)
    problem = kwargs.pop("problem_type", None)
    net = model(head, num_labels=2 if "Question" in head else 3, problem_type=problem)
    with pytest.raises(ValueError, match=rf"^{name} must be integer"):
        net(IDS[None] if head == "MegaForMultipleChoice" else IDS, **kwargs)


@pytest.mark.parametrize("head", ["MegaForCausalLM", "MegaForMaskedLM", "MegaForSequenceClassification",
                                  "MegaForTokenClassification", "MegaForMultipleChoice", "MegaForQuestionAnswering"])
def test_int32_labels_give_the_long_labels_loss(head):
    """Integer labels of either width (int32 ids are taken as input_ids too): the same loss as torch.long labels."""
    net = model(head, **(DEC if head == "MegaForCausalLM" else {}), num_labels=3 if "Question" not in head else 2)
    ids = IDS[None] if head == "MegaForMultipleChoice" else IDS
    labels = {"MegaForSequenceClassification": dict(labels=torch.tensor([2, 0])),
              "MegaForTokenClassification": dict(labels=torch.randint(0, 3, (2, 7))),
              "MegaForMultipleChoice": dict(labels=torch.tensor([1])),
              "MegaForQuestionAnswering": dict(start_positions=torch.tensor([1, 9]), end_positions=torch.tensor([3, 2]))
              }.get(head, dict(labels=IDS))
    want = net(ids, **labels).loss
    got = net(ids, **{k: v.int() for k, v in labels.items()}).loss
    assert torch.isfinite(want) and torch.equal(got, want)


def test_cross_attention_inputs():
    dec = model(**DEC, add_cross_attention=True)
    with pytest.raises(ValueError, match="pass encoder_hidden_states"):
        dec(IDS)
    enc = torch.randn(2, 5, 16)
    with pytest.raises(TypeError, match="encoder_hidden_states is torch.float64"):
        dec(IDS, encoder_hidden_states=enc.double())
    with pytest.raises(ValueError, match=r"encoder_attention_mask must be \(B, L\) = \(2, 5\)"):
        dec(IDS, encoder_hidden_states=enc, encoder_attention_mask=torch.ones(2, 4))


def test_multiple_choice_needs_choices():
    with pytest.raises(ValueError, match="num_choices"):
        model("MegaForMultipleChoice")(IDS)


def test_config_of_the_wrong_type():
    with pytest.raises(TypeError, match="needs a mega_kernels.MegaConfig, got builtins.dict"):
        mega_kernels.MegaModel(dict(hidden_size=16))
    from parity import hf_config_mod  # transformers' own MegaConfig: named in full, with the conversion

    theirs = hf_config_mod.MegaConfig(hidden_size=16)
    with pytest.raises(TypeError, match=r"got transformers\..*MegaConfig; convert it with mega_kernels.MegaConfig"):
        mega_kernels.MegaModel(theirs)
    assert mega_kernels.MegaModel(mega_kernels.MegaConfig(**theirs.to_dict())).config.hidden_size == 16


def test_question_answering_needs_two_labels():
    with pytest.raises(ValueError, match="num_labels=3, but span extraction has two outputs.*set num_labels=2"):
        model("MegaForQuestionAnswering", num_labels=3)
