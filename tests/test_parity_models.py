"""Parity with transformers 4.57.6 for MegaModel and every head: same state_dict (loaded strictly), eval mode,
outputs (all hidden states, attentions, losses, tuple layout) and every parameter's gradient equal to float32
rounding.

The cases form a covering set over: head x activation x attention activation x chunking x bidirectional x norm
type x norm_affine x bias type x token types x NFFN x pre/post norm x cross-attention x truncation x padding
(none / right / left) x odd lengths. Excluded, because transformers is wrong there (tested in
test_fixed_bugs / test_decoding instead): left padding with causal softmax (NaN), decoder + chunking with
L < C or L not a multiple of C, RMSNorm's missing rsqrt (transformers' RMSNorm is patched to the correct formula
here so the rest of the model is still compared).
"""
import pytest
import torch

from parity import (assert_close, assert_grads_close, build_pair, config_dict, fixed_hf_rmsnorm, gpu_backends,
                    weighted_sum)

DEC = dict(is_decoder=True, bidirectional=False)
CASES = [
    # id, head, length, padding, config overrides
    ("model-default", "MegaModel", 7, "right", {}),
    ("model-laplace-simple-postnorm", "MegaModel", 13, "left",
     dict(attention_activation="laplace", relative_positional_bias="simple", normalization_type="layernorm",
          normalize_before_mega=False, normalize_before_ffn=False, activation="gelu", add_token_type_embeddings=True)),
    ("model-relu2-chunk-trunc", "MegaModel", 8, "right",
     dict(attention_activation="relu2", use_chunking=True, chunk_size=4, bidirectional=False, truncation=5,
          normalization_type="rmsnorm", norm_affine=False)),
    ("model-L1-batchnorm-noffn", "MegaModel", 1, "none",
     dict(normalization_type="batchnorm", use_normalized_ffn=False, relative_positional_bias="simple")),
    ("model-chunk-whole-padded-chunk", "MegaModel", 12, "chunk",
     dict(use_chunking=True, chunk_size=4, normalization_type="syncbatchnorm", activation="tanh")),
    ("causal-softmax", "MegaForCausalLM", 7, "right",
     dict(DEC, normalization_type="layernorm", add_lm_hidden_dense_layer=False)),
    ("causal-laplace-chunk-trunc-left", "MegaForCausalLM", 8, "left",
     dict(DEC, attention_activation="laplace", use_chunking=True, chunk_size=4, truncation=3)),
    ("causal-relu2-cross-simple", "MegaForCausalLM", 7, "right",
     dict(DEC, attention_activation="relu2", add_cross_attention=True, relative_positional_bias="simple",
          activation="relu")),
    ("causal-cross-softmax-postnorm-rms", "MegaForCausalLM", 13, "none",
     dict(DEC, add_cross_attention=True, normalize_before_mega=False, normalization_type="rmsnorm",
          add_token_type_embeddings=True)),
    ("causal-cross-laplace-batchnorm", "MegaForCausalLM", 1, "right",
     dict(DEC, add_cross_attention=True, attention_activation="laplace", normalization_type="batchnorm",
          norm_affine=False, truncation=2)),
    ("mlm-relu2-chunk-LltC", "MegaForMaskedLM", 13, "right",
     dict(attention_activation="relu2", use_chunking=True, chunk_size=16, add_token_type_embeddings=True,
          normalization_type="syncbatchnorm")),
    ("mlm-nodense-gelu-trunc", "MegaForMaskedLM", 7, "left",
     dict(add_lm_hidden_dense_layer=False, activation="gelu_new", truncation=4, normalize_before_ffn=False)),
    ("seqcls-laplace-simple", "MegaForSequenceClassification", 7, "left",
     dict(attention_activation="laplace", relative_positional_bias="simple", num_labels=3,
          normalization_type="scalenorm", norm_affine=False, use_normalized_ffn=False)),
    ("seqcls-regression-chunk", "MegaForSequenceClassification", 8, "right",
     dict(num_labels=1, use_chunking=True, chunk_size=4, bidirectional=False, classifier_dropout=0.3)),
    ("seqcls-multilabel-relu2", "MegaForSequenceClassification", 13, "none",
     dict(num_labels=4, problem_type="multi_label_classification", attention_activation="relu2",
          normalize_before_mega=False, normalization_type="rmsnorm")),
    ("choice-softmax-tokentypes", "MegaForMultipleChoice", 7, "right",
     dict(add_token_type_embeddings=True, normalization_type="layernorm", activation="silu")),
    ("token-relu2-trunc-postnorm", "MegaForTokenClassification", 13, "left",
     dict(attention_activation="relu2", truncation=4, normalize_before_mega=False, normalize_before_ffn=False,
          num_labels=5, relative_positional_bias="simple")),
    ("qa-chunk-batchnorm", "MegaForQuestionAnswering", 8, "right",
     dict(use_chunking=True, chunk_size=4, normalization_type="batchnorm", norm_affine=False)),
    ("qa-laplace-unidirectional", "MegaForQuestionAnswering", 7, "left",
     dict(attention_activation="laplace", bidirectional=False, add_token_type_embeddings=True)),
]


def make_mask(bsz, length, kind):
    mask = torch.ones(bsz, length, dtype=torch.long)
    if kind == "right":
        mask[-1, length - max(1, length // 3):] = 0
    elif kind == "left":
        mask[0, : max(1, length // 3)] = 0
    elif kind == "chunk":   # a wholly padded chunk (chunk_size 4) in the first row, right padding in the second
        mask[0, 4:8] = 0
        mask[1, -2:] = 0
    return None if kind == "none" else mask


def make_inputs(head, cfg, length, padding):
    bsz = 3
    ids = torch.randint(0, cfg["vocab_size"], (bsz, length))
    inputs = dict(input_ids=ids, attention_mask=make_mask(bsz, length, padding))
    if cfg.get("add_token_type_embeddings"):
        inputs["token_type_ids"] = torch.randint(0, cfg["type_vocab_size"], (bsz, length))
    if cfg.get("add_cross_attention"):
        inputs["encoder_hidden_states"] = torch.randn(bsz, 5, cfg["hidden_size"])
        enc_mask = torch.ones(bsz, 5, dtype=torch.long)
        enc_mask[1, 3:] = 0
        inputs["encoder_attention_mask"] = enc_mask
    if cfg.get("is_decoder"):
        inputs["use_cache"] = False  # compared separately in test_decoding (transformers ignores truncation there)
    n = cfg.get("num_labels", 2)
    if head == "MegaForMaskedLM" or (head == "MegaForCausalLM" and length > 1):  # L = 1 has no next token
        inputs["labels"] = torch.randint(0, cfg["vocab_size"], (bsz, length))
    elif head == "MegaForSequenceClassification":
        if n == 1:
            inputs["labels"] = torch.randn(bsz)
        elif cfg.get("problem_type") == "multi_label_classification":
            inputs["labels"] = torch.randint(0, 2, (bsz, n)).float()
        else:
            inputs["labels"] = torch.randint(0, n, (bsz,))
    elif head == "MegaForTokenClassification":
        inputs["labels"] = torch.randint(0, n, (bsz, length))
    elif head == "MegaForQuestionAnswering":
        inputs["start_positions"] = torch.tensor([0, length - 1, length + 3])  # the last one is clamped + ignored
        inputs["end_positions"] = torch.tensor([length - 1, 1, 0])
    elif head == "MegaForMultipleChoice":
        inputs = {k: (v.view(1, bsz, *v.shape[1:]) if k in ("input_ids", "attention_mask", "token_type_ids")
                      and v is not None else v) for k, v in inputs.items()}
        inputs["labels"] = torch.tensor([2])
    return inputs


def scalar_loss(out, seed=1):
    """The head's own loss when it has one, plus a weighted sum of every floating output tensor."""
    total = 0.0
    for i, t in enumerate(out.to_tuple()):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            total = total + (t if t.dim() == 0 else weighted_sum(t, seed + i))
    return total


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parity(case):
    _, head, length, padding, overrides = case
    cfg = config_dict(**overrides)
    with fixed_hf_rmsnorm():
        hf_model, ours = build_pair(head, cfg)
        inputs = make_inputs(head, cfg, length, padding)
        flags = dict(output_attentions=True, output_hidden_states=True)
        theirs = hf_model(**inputs, **flags)
        mine = ours(**inputs, **flags)
        for key in theirs.keys():
            assert_close(key, getattr(mine, key), getattr(theirs, key))
        assert list(mine) == list(theirs) and isinstance(mine, dict) and "nonsense" not in mine  # keys, in order
        assert [k for k, _ in mine.items()] == list(mine.keys()) and len(mine) == len(theirs)
        assert all(a is b is mine[i] for i, (a, b) in enumerate(zip(mine.values(), mine.to_tuple())))
        # the tuple layout (return_dict=False) matches too
        as_tuples = [m(**inputs, **flags, return_dict=False) for m in (ours, hf_model)]
        assert_close("tuple", *as_tuples)
        scalar_loss(theirs).backward()
        scalar_loss(mine).backward()
    assert_grads_close(hf_model, ours)


GPU_CASES = ("model-default", "model-relu2-chunk-trunc", "model-chunk-whole-padded-chunk",
             "causal-laplace-chunk-trunc-left", "causal-relu2-cross-simple", "seqcls-laplace-simple",
             "qa-chunk-batchnorm")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in GPU_CASES], ids=lambda c: c[0])
def test_parity_on_gpu(case):
    """The same parity on CUDA in float32 through each GPU kernel backend."""
    _, head, length, padding, overrides = case
    for backend in gpu_backends():
        torch.manual_seed(0)
        cfg = config_dict(**overrides, kernel_backend=backend)
        with fixed_hf_rmsnorm():
            hf_model, ours = build_pair(head, cfg)
            hf_model, ours = hf_model.cuda(), ours.cuda()
            inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v)
                      for k, v in make_inputs(head, cfg, length, padding).items()}
            theirs, mine = hf_model(**inputs), ours(**inputs)
            for key in theirs.keys():
                assert_close(f"{backend} {key}", getattr(mine, key), getattr(theirs, key))
            scalar_loss(theirs).backward()
            scalar_loss(mine).backward()
        assert_grads_close(hf_model, ours)


def test_cache_layout_and_values_match_transformers():
    """Where transformers' cache is right (softmax, no chunking, no truncation, no padding), our cache holds the
    same self K, V and EMA state (plus the position entry) and steps give the same logits."""
    cfg = config_dict(**DEC, dropout_prob=0.0)
    hf_model, ours = build_pair("MegaForCausalLM", cfg)
    ids = torch.randint(0, 50, (2, 6))
    theirs = hf_model(ids, use_cache=True)
    mine = ours(ids, use_cache=True)
    for layer_h, layer_o in zip(theirs.past_key_values, mine.past_key_values):
        assert len(layer_o) == 4
        for a, b in zip(layer_o[:3], layer_h[:3]):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        assert layer_o[3].tolist() == [6, 6]
    nxt = torch.randint(0, 50, (2, 1))
    step_h = hf_model(nxt, past_key_values=theirs.past_key_values, use_cache=True).logits
    step_o = ours(nxt, past_key_values=mine.past_key_values, use_cache=True).logits
    assert torch.allclose(step_o, step_h, atol=1e-5, rtol=1e-5)


def test_training_cross_attention_cache_holds_values_before_dropout():
    """A decoder in train() mode with hidden dropout returns transformers' cross K, V cache: the values as
    projected, not with this step's dropout already applied (a later step applies its own)."""
    cfg = config_dict(**DEC, add_cross_attention=True, hidden_dropout_prob=0.5)
    hf_model, ours = build_pair("MegaForCausalLM", cfg)
    hf_model.train(), ours.train()
    ids, enc = torch.randint(0, 50, (2, 5)), torch.randn(2, 4, cfg["hidden_size"])
    theirs = hf_model(ids, encoder_hidden_states=enc, use_cache=True).past_key_values
    mine = ours(ids, encoder_hidden_states=enc, use_cache=True).past_key_values
    for layer_h, layer_o in zip(theirs, mine):
        for a, b in zip(layer_o[4:], layer_h[3:]):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def _flat(out):
    """The floating tensors of a model output, in order (nested tuples flattened)."""
    items = out.to_tuple() if hasattr(out, "to_tuple") else out
    flat = []
    for t in items:
        if isinstance(t, (tuple, list)):
            flat += _flat(t)
        elif isinstance(t, torch.Tensor) and t.is_floating_point():
            flat.append(t)
    return flat


AUTOCAST_CASES = ("model-chunk-whole-padded-chunk", "model-relu2-chunk-trunc", "causal-laplace-chunk-trunc-left",
                  "causal-relu2-cross-simple", "seqcls-laplace-simple")  # (softmax: its unfused 16-bit path)


@pytest.mark.parametrize("backend", ["reference", "triton", {"ema": "cpu"}], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in AUTOCAST_CASES], ids=lambda c: c[0])
def test_autocast_bfloat16(case, backend):
    """Under torch.autocast (CPU, bfloat16) forward and backward run on every backend, and each output and
    parameter gradient is as close to transformers in float32 as transformers under the same autocast is: the
    tolerance rule of DESIGN.md (at most 3x that error, plus the bfloat16 atol), with transformers' autocast run
    as the low-precision reference. The atol is bfloat16's for every tensor, float32 ones too (the loss, the
    gradients of the float32 parameters): under autocast each of them comes out of bfloat16 matmuls."""
    import copy

    from mega_kernels.testing import ATOL, error_and_bound

    _, head, length, padding, overrides = case
    cfg = config_dict(**overrides, kernel_backend=backend)
    with fixed_hf_rmsnorm():
        hf_model, ours = build_pair(head, cfg)
        hf_low = copy.deepcopy(hf_model)  # transformers keeps tensors of a call's graph for the next call
        inputs = make_inputs(head, cfg, length, padding)
        ref = hf_model(**inputs)
        scalar_loss(ref).backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, mine = hf_low(**inputs), ours(**inputs)
        scalar_loss(low).backward()  # after the autocast region, as torch advises
        scalar_loss(mine).backward()
    assert any(t.dtype == torch.bfloat16 for t in _flat(mine)), "autocast did not reach the model"
    assert len(_flat(mine)) == len(_flat(ref)) == len(_flat(low))
    pairs = list(zip(_flat(mine), _flat(ref), _flat(low)))
    ref_params, low_params = dict(hf_model.named_parameters()), dict(hf_low.named_parameters())
    pairs += [(p.grad, ref_params[n].grad, low_params[n].grad) for n, p in ours.named_parameters()
              if ref_params[n].grad is not None]
    assert all(p.grad is None for n, p in ours.named_parameters() if ref_params[n].grad is None)
    for i, (out, r32, rlow) in enumerate(pairs):
        assert out is not None and torch.isfinite(out).all(), f"tensor {i}: missing or non-finite"
        err, _, base = error_and_bound(out, r32, rlow)
        bound = 3.0 * base + ATOL[torch.bfloat16] * (1.0 + r32.abs().max().item())
        assert err <= bound, f"tensor {i}: max error {err:.3e} > bound {bound:.3e} (transformers' own {base:.3e})"


@pytest.mark.parametrize("num_labels,labels", [(1, torch.randn(2)), (3, torch.tensor([0, 2])),
                                               (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))],
                         ids=["regression", "single_label", "multi_label"])
def test_inferred_problem_type_is_kept_like_transformers(num_labels, labels):
    """The first labelled call writes the problem type it inferred into the config (transformers does), so a
    saved model records its task and later calls keep the same loss."""
    hf_model, ours = build_pair("MegaForSequenceClassification", config_dict(num_labels=num_labels))
    ids = torch.randint(2, 50, (2, 6))
    for m in (hf_model, ours):
        assert m.config.problem_type is None
        m(ids, labels=labels)
    assert ours.config.problem_type == hf_model.config.problem_type is not None
