"""Gradient checkpointing (`gradient_checkpointing_enable`): in training with dropout, the same outputs, loss,
parameter gradients and batchnorm statistics as without it, on every CPU backend, with the cache and attention
weights returned too; it keeps far fewer activations; it is off in eval mode; refused settings name the fix."""
import pytest
import torch

from model_helpers import config_dict, perturb_

import mega_kernels
from mega_kernels import MegaConfig

CASES = [
    ("MegaForCausalLM", dict(is_decoder=True, bidirectional=False, use_chunking=True, chunk_size=4, truncation=5)),
    ("MegaForSequenceClassification", dict(normalization_type="batchnorm", use_feature_dropout=True,
                                           attention_activation="laplace")),
    ("MegaForCausalLM", dict(is_decoder=True, bidirectional=False, add_cross_attention=True,
                             normalization_type="layernorm")),
]


def build(head, overrides, backend):
    model = getattr(mega_kernels, head)(MegaConfig(**config_dict(**overrides, kernel_backend=backend)))
    perturb_(model)
    return model.train()


def run(model, inputs, seed):
    """One training step's forward (dropout drawn from `seed`) and backward: outputs, gradients, buffers."""
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(**inputs)
    flat = [t for t in torch.utils._pytree.tree_leaves(out) if t.is_floating_point()]
    sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in flat).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [t.detach() for t in flat], grads, {n: b.clone() for n, b in model.named_buffers()}


def inputs_for(head, overrides):
    ids = torch.randint(3, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids if head == "MegaForCausalLM" else torch.tensor([0, 1]))
    if overrides.get("add_cross_attention"):
        inputs.update(encoder_hidden_states=torch.randn(2, 5, 16), labels=None, use_cache=True,
                      output_attentions=True)
    return inputs


@pytest.mark.parametrize("backend", ["reference", "triton", {"ema": "cpu"}], ids=str)
@pytest.mark.parametrize("head,overrides", CASES, ids=["causal-chunked", "classifier-batchnorm", "cross-cache"])
def test_checkpointing_gives_the_same_step(head, overrides, backend):
    model = build(head, overrides, backend)
    inputs = inputs_for(head, overrides)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = run(model, inputs, seed=7)
    model.load_state_dict(state)  # the batchnorm statistics as before the plain step
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.mega.is_gradient_checkpointing
    ckpt = run(model, inputs, seed=7)
    assert len(plain[0]) == len(ckpt[0]) > 1 and plain[1].keys() == ckpt[1].keys()
    for got, want in zip(ckpt[0], plain[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for name in plain[1]:
        torch.testing.assert_close(ckpt[1][name], plain[1][name], rtol=1e-5, atol=1e-7, msg=name)
    for name in plain[2]:  # batchnorm running statistics: one update, as without checkpointing
        assert torch.equal(ckpt[2][name], plain[2][name]), name


def saved_bytes(model, inputs):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs).loss.backward()
    return total


def test_checkpointing_keeps_fewer_activations():
    head, overrides = CASES[0]
    model = build(head, dict(overrides, num_hidden_layers=4), "reference")
    inputs = inputs_for(head, overrides)
    plain = saved_bytes(model, inputs)
    model.gradient_checkpointing_enable()
    ckpt = saved_bytes(model, inputs)
    assert ckpt < 0.25 * plain, (ckpt, plain)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing and saved_bytes(model, inputs) == plain
    model.eval()  # no recomputation outside training
    eval_plain = saved_bytes(model, inputs)
    model.gradient_checkpointing_enable()
    assert saved_bytes(model, inputs) == eval_plain


@pytest.mark.parametrize("kwargs,match", [
    (dict(use_reentrant=True), "use_reentrant=False only"),
    (dict(context_fn=lambda: None), "context_fn is set by the model"),
])
def test_refused_checkpoint_settings(kwargs, match):
    model = mega_kernels.MegaModel(MegaConfig(**config_dict()))
    with pytest.raises(ValueError, match=match):
        model.gradient_checkpointing_enable(kwargs)
    assert not model.is_gradient_checkpointing
