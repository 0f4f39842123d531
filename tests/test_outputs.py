"""Model outputs behave as transformers' ModelOutput: an ordered dict of the fields that are set, kept in step
with the attributes, tuple access, pickling; and they are pytree nodes, so torch.export and torch.jit.trace
(strict=False) return them. Field names and order against transformers are checked in test_parity_models."""
import copy
import pickle

import pytest
import torch
import torch.utils._pytree as pytree

from model_helpers import config_dict, decoder

import mega_kernels
from mega_kernels import MegaConfig
from mega_kernels.models.outputs import CausalLMOutputWithCrossAttentions


def causal_output(labels=True):
    """With labels: loss, logits, hidden_states (a loss turns the cache off); without: logits, the cache and
    hidden_states."""
    ids = torch.randint(3, 50, (2, 5))
    return decoder()(ids, labels=ids if labels else None, use_cache=True, output_hidden_states=True)


def test_a_dict_of_the_fields_that_are_set():
    out = causal_output()
    assert isinstance(out, CausalLMOutputWithCrossAttentions) and isinstance(out, dict)
    assert list(out) == ["loss", "logits", "hidden_states"] and len(out) == 3
    assert out.attentions is None and "attentions" not in out and out.past_key_values is None
    assert out[0] is out["loss"] is out.loss and out[1] is out.logits and out.to_tuple()[-1] is out.hidden_states
    assert dict(out)["logits"] is out.logits and {**out}.keys() == out.keys()


def test_attributes_and_items_stay_in_step():
    out = causal_output()
    attn = (torch.zeros(1),)
    out.attentions = attn
    assert out["attentions"] is attn and list(out)[-1] == "attentions" and out[-1] is attn
    logits = torch.ones(1)
    out["logits"] = logits
    assert out.logits is logits
    for refused in (lambda: out.pop("loss"), lambda: out.update(loss=None), lambda: out.__delitem__("loss"),
                    lambda: out.setdefault("x", 1), out.clear, out.popitem):
        with pytest.raises(TypeError, match="does not remove or merge entries"):
            refused()
    assert list(out) == ["loss", "logits", "hidden_states", "attentions"]


@pytest.mark.parametrize("roundtrip", [lambda o: pickle.loads(pickle.dumps(o)), copy.deepcopy],
                         ids=["pickle", "deepcopy"])
def test_pickle_and_deepcopy(roundtrip):
    with torch.no_grad():  # (tensors inside an autograd graph refuse deepcopy, in transformers too)
        out = causal_output()
    back = roundtrip(out)
    assert type(back) is type(out) and list(back) == list(out) and back.attentions is None
    assert torch.equal(back.logits, out.logits) and torch.equal(back["hidden_states"][1], out.hidden_states[1])


def test_a_pytree_node():
    out = causal_output(labels=False)
    leaves, spec = pytree.tree_flatten(out)
    n_cache = sum(len(layer) for layer in out.past_key_values)
    assert len(leaves) == 1 + n_cache + len(out.hidden_states) and all(isinstance(t, torch.Tensor) for t in leaves)
    doubled = pytree.tree_map(lambda t: t * 2, out)
    assert type(doubled) is type(out) and list(doubled) == ["logits", "past_key_values", "hidden_states"]
    assert torch.equal(doubled.logits, out.logits * 2) and torch.equal(doubled["hidden_states"][1], out[2][1] * 2)
    assert pytree.tree_unflatten(leaves, spec).keys() == out.keys()


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["reference", {"ema": "cpu"}], ids=str)
def test_export_and_trace_return_the_outputs(backend):
    model = mega_kernels.MegaForSequenceClassification(MegaConfig(**config_dict(kernel_backend=backend))).eval()
    mega_kernels.ops.backends.preload("cpu", backend)
    ids, other = torch.randint(3, 50, (2, 7)), torch.randint(3, 50, (2, 7))
    exported = torch.export.export(model, (ids,)).module()
    got = exported(other)
    assert type(got).__name__ == "SequenceClassifierOutput" and list(got) == ["logits"]
    torch.testing.assert_close(got.logits, model(other).logits, rtol=1e-6, atol=1e-7)
    with pytest.warns(torch.jit.TracerWarning):  # shape-dependent branches: the trace holds for this shape
        traced = torch.jit.trace(model, (ids,), strict=False)
    torch.testing.assert_close(traced(other)["logits"], model(other).logits, rtol=1e-6, atol=1e-7)
