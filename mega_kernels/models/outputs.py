"""Model outputs with the fields, order and behaviour of transformers' output classes: an ordered dict of the
fields that are not None (`out["logits"]`, `keys()`, `values()`, `items()`, `"logits" in out`, iteration over
the keys, `isinstance(out, dict)`), attributes for every field (`out.logits`, None when unset) and tuple access
(`out[0]`, `out.to_tuple()`: the values that are not None, in field order, a field set later last). Every
class is a pytree node, so torch.export, torch.compile, torch.func and the distributed wrappers see the tensors
inside."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.utils._pytree as pytree

Tensor = torch.Tensor


class ModelOutput(OrderedDict):
    """Base of the dataclass outputs below. The dict and the attributes stay in step: setting a field (as an
    attribute or an item) sets both; removing entries is refused, as it would leave a stale attribute."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(cls, _flatten, lambda values, keys: cls(**dict(zip(keys, values))),
                                    serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __setattr__(self, name, value):
        if value is not None and name in self.__dataclass_fields__:  # (the dataclass __init__ comes here too)
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} does not remove or merge entries; build a new output or a dict")

    __delitem__ = pop = popitem = setdefault = update = clear = _refuse

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(self.values())


def _flatten(out: ModelOutput):
    return list(out.values()), list(out.keys())


@dataclass
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    last_hidden_state: Optional[Tensor] = None
    pooler_output: Optional[Tensor] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    past_key_values: Optional[Tuple[Tuple[Tensor, ...], ...]] = None
    attentions: Optional[Tuple[Tensor, ...]] = None
    cross_attentions: Optional[Tuple[Tensor, ...]] = None


@dataclass
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    past_key_values: Optional[Tuple[Tuple[Tensor, ...], ...]] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    attentions: Optional[Tuple[Tensor, ...]] = None
    cross_attentions: Optional[Tuple[Tensor, ...]] = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    attentions: Optional[Tuple[Tensor, ...]] = None


@dataclass
class SequenceClassifierOutput(MaskedLMOutput):
    pass


@dataclass
class MultipleChoiceModelOutput(MaskedLMOutput):
    pass


@dataclass
class TokenClassifierOutput(MaskedLMOutput):
    pass


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Optional[Tensor] = None
    start_logits: Optional[Tensor] = None
    end_logits: Optional[Tensor] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    attentions: Optional[Tuple[Tensor, ...]] = None


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)` without beams: sequences (B', L + n); per new token, the
    scores the next token was chosen from (B', vocab), after every rule (output_scores), and the raw logits
    (output_logits), float32."""
    sequences: Optional[Tensor] = None
    scores: Optional[Tuple[Tensor, ...]] = None
    logits: Optional[Tuple[Tensor, ...]] = None


@dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """The same for beam search, per step over the B * num_beams running beams: scores are the log-probabilities
    after the rules; sequences_scores (B'), each returned hypothesis' final score (with output_scores)."""
    sequences: Optional[Tensor] = None
    sequences_scores: Optional[Tensor] = None
    scores: Optional[Tuple[Tensor, ...]] = None
    logits: Optional[Tuple[Tensor, ...]] = None
