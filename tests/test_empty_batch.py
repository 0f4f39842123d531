"""Empty inputs through the models: an empty batch (B = 0) runs forward and backward through every head on every
CPU backend (transformers fails there, in its FFT), with empty outputs and zero parameter gradients; generate
returns an empty batch; a sequence of no tokens is refused by name. The ops' own empty cases are in
test_ema_backends (test_empty_inputs), test_ops and test_reference."""
import pytest
import torch

from model_helpers import config_dict

import mega_kernels
from mega_kernels import MegaConfig

HEADS = [
    ("MegaModel", dict(use_chunking=True, chunk_size=4)),
    ("MegaForCausalLM", dict(is_decoder=True, bidirectional=False, add_cross_attention=True)),
    ("MegaForMaskedLM", dict(attention_activation="laplace")),
    ("MegaForSequenceClassification", dict(normalization_type="batchnorm", truncation=3)),
    ("MegaForMultipleChoice", dict(attention_activation="relu2")),
    ("MegaForTokenClassification", dict(bidirectional=False)),
    ("MegaForQuestionAnswering", dict(relative_positional_bias="simple")),
]


def _tensors(tree):
    for t in tree:
        if isinstance(t, torch.Tensor):
            yield t
        elif t is not None:
            yield from _tensors(t)


@pytest.mark.parametrize("backend", ["reference", "triton", {"ema": "cpu"}], ids=str)
@pytest.mark.parametrize("head,overrides", HEADS, ids=[h for h, _ in HEADS])
def test_empty_batch_forward_and_backward(head, overrides, backend):
    model = getattr(mega_kernels, head)(MegaConfig(**config_dict(**overrides, kernel_backend=backend))).train()
    ids = torch.randint(3, 50, (0, 3, 9) if head == "MegaForMultipleChoice" else (0, 9))
    extra = dict(encoder_hidden_states=torch.randn(0, 5, 16)) if overrides.get("add_cross_attention") else {}
    out = model(ids, output_attentions=True, output_hidden_states=True, **extra)
    tensors = list(_tensors(out.to_tuple()))
    assert all(t.shape[0] == 0 for t in tensors) and len(tensors) > 3
    sum(t.sum() for t in tensors if t.requires_grad).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


def test_generate_an_empty_batch():
    model = mega_kernels.MegaForCausalLM(MegaConfig(**config_dict(is_decoder=True, bidirectional=False))).eval()
    assert model.generate(torch.zeros(0, 4, dtype=torch.long), max_new_tokens=3).shape == (0, 7)


@pytest.mark.parametrize("inputs", [dict(input_ids=torch.zeros(2, 0, dtype=torch.long)),
                                    dict(inputs_embeds=torch.zeros(2, 0, 16))], ids=["ids", "embeds"])
def test_a_sequence_of_no_tokens_is_refused(inputs):
    model = mega_kernels.MegaModel(MegaConfig(**config_dict())).eval()
    with pytest.raises(ValueError, match="no tokens .sequence length 0.; pass at least one token"):
        model(**inputs)
