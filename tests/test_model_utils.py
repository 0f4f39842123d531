"""Model utilities of transformers' PreTrainedModel: resize_token_embeddings (rows kept, added rows, ties,
config, checkpoints, refusals) and num_parameters."""
import pytest
import torch

from model_helpers import config_dict, perturb_

import mega_kernels
from mega_kernels import MegaConfig


def lm(head="MegaForCausalLM", **overrides):
    torch.manual_seed(0)
    model = getattr(mega_kernels, head)(MegaConfig(**config_dict(**overrides)))
    perturb_(model)
    return model.double().eval()


@pytest.mark.parametrize("head,tied", [("MegaForCausalLM", True), ("MegaForMaskedLM", True),
                                       ("MegaForCausalLM", False)])
def test_growing_keeps_old_rows_and_adds_the_mean(head, tied, tmp_path):
    model = lm(head, tie_word_embeddings=tied)
    ids = torch.randint(3, 50, (2, 6))
    before = model(ids).logits
    out = model.get_output_embeddings()
    old_w, old_out, old_b = model.get_input_embeddings().weight.clone(), out.weight.clone(), out.bias.clone()
    emb = model.resize_token_embeddings(53, pad_to_multiple_of=8)
    out = model.get_output_embeddings()
    assert emb is model.get_input_embeddings() and emb.weight.shape == (56, 16) and model.config.vocab_size == 56
    assert emb.padding_idx == 1 and (out.weight is emb.weight) == tied and out.weight.shape == (56, 16)
    assert torch.equal(emb.weight[:50], old_w) and torch.equal(out.weight[:50], old_out)
    assert torch.equal(out.bias[:50], old_b) and out.bias.shape == (56,)
    torch.testing.assert_close(emb.weight[50:], old_w.mean(0).expand(6, 16))
    torch.testing.assert_close(out.weight[50:], old_out.mean(0).expand(6, 16))
    torch.testing.assert_close(out.bias[50:], torch.zeros(6, dtype=old_b.dtype) if tied else old_b.mean().expand(6))
    after = model(ids).logits
    assert after.shape == (2, 6, 56)
    # the same float64 dot products; a wider output may change the BLAS kernel's summation order
    torch.testing.assert_close(after[..., :50], before, rtol=1e-13, atol=1e-13)
    new_ids = torch.tensor([[50, 55, 3]])  # the added ids are accepted
    model(new_ids)
    model.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path).double()
    assert back.config.vocab_size == 56 and torch.equal(back(new_ids).logits, model(new_ids).logits)
    assert (back.get_output_embeddings().weight is back.get_input_embeddings().weight) == tied


def test_shrinking_and_init_drawn_rows():
    model = lm()
    old = model.get_input_embeddings().weight.clone()
    model.resize_token_embeddings(40)
    assert torch.equal(model.get_input_embeddings().weight, old[:40]) and model.lm_head.bias.shape == (40,)
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[45]]))
    torch.manual_seed(1)
    model.resize_token_embeddings(3000, mean_resizing=False)
    added = model.get_input_embeddings().weight[40:]
    assert abs(added.std().item() - model.config.initializer_range) < 0.002 and abs(added.mean().item()) < 0.002
    assert (model.lm_head.bias[40:] == 0).all() and model.lm_head.weight is model.get_input_embeddings().weight
    assert model.resize_token_embeddings() is model.get_input_embeddings()  # None: unchanged


def test_a_model_without_output_projection_and_frozen_embeddings():
    model = lm("MegaForSequenceClassification")
    model.get_input_embeddings().weight.requires_grad_(False)
    emb = model.resize_token_embeddings(60)
    assert emb.weight.shape == (60, 16) and not emb.weight.requires_grad and model.config.vocab_size == 60
    model(torch.tensor([[59, 3]]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(new_num_tokens=0), "new_num_tokens must be an int >= 1"),
    (dict(new_num_tokens=2.0), "new_num_tokens must be an int >= 1"),
    (dict(new_num_tokens=60, pad_to_multiple_of=0), "pad_to_multiple_of must be an int >= 1"),
    (dict(new_num_tokens=1), "would drop the padding token"),
])
def test_resize_refuses(kwargs, match):
    model = lm()
    with pytest.raises(ValueError, match=match):
        model.resize_token_embeddings(**kwargs)
    assert model.config.vocab_size == 50 and model.get_input_embeddings().num_embeddings == 50


def test_num_parameters():
    model = lm()
    unique = {id(p): p for p in model.parameters()}
    assert model.num_parameters() == sum(p.numel() for p in unique.values())
    emb = model.get_input_embeddings().weight.numel()
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - emb  # tied: counted once
    model.mega.layers[0].requires_grad_(False)
    frozen = sum(p.numel() for p in model.mega.layers[0].parameters())
    assert model.num_parameters(only_trainable=True) == model.num_parameters() - frozen


@pytest.mark.parametrize("tied", [True, False])
def test_resizing_equals_transformers(tied):
    """Grown and shrunk on the same weights, ours and transformers' (float64) hold the same embedding and output
    projection: kept rows bit for bit; added rows to transformers' random spread around the mean (covariance
    1e-9 x the old rows', that is ~3e-5 standard deviations, which ours leaves out)."""
    from parity import hf, hf_config_mod

    ours = lm("MegaForMaskedLM", tie_word_embeddings=tied)
    theirs = hf.MegaForMaskedLM(hf_config_mod.MegaConfig(**config_dict(tie_word_embeddings=tied))).double().eval()
    theirs.load_state_dict(ours.state_dict(), strict=False)
    old = 50
    for n in (57, 40):
        ours.resize_token_embeddings(n)
        theirs.resize_token_embeddings(n)
        pairs = [(ours.get_input_embeddings().weight, theirs.get_input_embeddings().weight)]
        pairs += [(getattr(ours.get_output_embeddings(), k), getattr(theirs.get_output_embeddings(), k))
                  for k in ("weight", "bias")]
        for a, b in pairs:
            keep = min(old, n)
            assert a.shape == b.shape and torch.equal(a[:keep], b[:keep])
            spread = 10 * 1e-9 ** 0.5 * float(b[:keep].detach().std())
            torch.testing.assert_close(a[keep:], b[keep:], rtol=0, atol=spread)
        old = n
