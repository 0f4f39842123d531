"""The six task heads of MEGA_SPEC.md section 7 (state_dict prefix `mega.`), with transformers' losses and
outputs. With return_dict=False each returns transformers' tuple: (loss?,) + (logits...) + the base model's
tuple from index 2 (hidden_states, [past_key_values,] attentions, [cross_attentions])."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .generation import GenerationMixin
from .modeling import MegaModel, MegaPreTrainedModel
from .outputs import (CausalLMOutputWithCrossAttentions, MaskedLMOutput, MultipleChoiceModelOutput,
                      QuestionAnsweringModelOutput, SequenceClassifierOutput, TokenClassifierOutput)

Tensor = torch.Tensor


def _head_tuple(loss, logits, out):
    """transformers' tuple layout: (loss?,) + logits + base tuple[2:] = (hidden_states, past_key_values,
    attentions, cross_attentions), Nones included."""
    rest = (out.hidden_states, out.past_key_values, out.attentions, out.cross_attentions)
    return ((loss,) if loss is not None else ()) + tuple(logits) + rest


def _logits_output(cls, loss, logits, out, return_dict):
    """A single-logits head's return: `cls` (loss, logits, hidden_states, attentions), or transformers' tuple."""
    if not return_dict:
        return _head_tuple(loss, (logits,), out)
    return cls(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class _LMHeadModel(MegaPreTrainedModel):
    """Shared body of the two LM heads: mega -> [dense + tanh] -> output projection tied to the embeddings."""

    def __init__(self, config, head_name: str):
        super().__init__(config)
        self._output_embedding_name = head_name
        self.mega = MegaModel(config, add_pooling_layer=False)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size) if config.add_lm_hidden_dense_layer else None
        setattr(self, head_name, nn.Linear(config.hidden_size, config.vocab_size))
        self.post_init()

    def _logits(self, hidden: Tensor) -> Tensor:
        if self.dense is not None:
            hidden = torch.tanh(self.dense(hidden))
        return self.get_output_embeddings()(hidden)


class MegaForCausalLM(_LMHeadModel, GenerationMixin):
    """Next-token LM: loss = cross-entropy of logits[:, :-1] against labels[:, 1:] (-100 ignored)."""

    def __init__(self, config):
        super().__init__(config, "lm_head")

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, labels=None, past_key_values=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None):
        """Inputs as `MegaModel.forward`; labels (B, L). Returns CausalLMOutputWithCrossAttentions
        (logits (B, L, vocab))."""
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        if labels is not None:
            use_cache = False
        out = self.mega(input_ids, attention_mask, token_type_ids, inputs_embeds, encoder_hidden_states,
                        encoder_attention_mask, past_key_values, use_cache, output_attentions, output_hidden_states,
                        return_dict=True)
        logits = self._logits(out.last_hidden_state)
        loss = None
        if labels is not None:
            _check_token_labels(labels, logits, shifted=True)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).long())
        if not return_dict:
            return _head_tuple(loss, (logits,), out)
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                                 hidden_states=out.hidden_states, attentions=out.attentions,
                                                 cross_attentions=out.cross_attentions)


class MegaForMaskedLM(_LMHeadModel):
    """Masked LM: plain cross-entropy of logits against labels (-100 ignored)."""

    def __init__(self, config):
        super().__init__(config, "mlm_head")

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        out = self.mega(input_ids, attention_mask, token_type_ids, inputs_embeds, encoder_hidden_states,
                        encoder_attention_mask, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states, return_dict=True)
        logits = self._logits(out.last_hidden_state)
        loss = None
        if labels is not None:
            _check_token_labels(labels, logits, shifted=False)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long())
        return _logits_output(MaskedLMOutput, loss, logits, out, return_dict)


class MegaClassificationHead(nn.Module):
    """First token -> dropout -> dense -> tanh -> dropout -> out_proj: (B, L, D) -> (B, num_labels)."""

    def __init__(self, config):
        super().__init__()
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(p)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, features: Tensor) -> Tensor:
        x = self.dropout(features[:, 0])
        return self.out_proj(self.dropout(torch.tanh(self.dense(x))))


def _check_token_labels(labels: Tensor, logits: Tensor, shifted: bool) -> None:
    """labels of a token-level head: integer ids, one per token of the (B, L) input (shifted: in that shape; else,
    as transformers, any shape holding B * L ids)."""
    shape = tuple(logits.shape[:2])
    fits = tuple(labels.shape) == shape if shifted else labels.numel() == shape[0] * shape[1]
    if not fits or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer ids of shape (B, L) = {shape}, one per token, got "
                         f"{labels.dtype} {tuple(labels.shape)}; use -100 where no loss is wanted")


def _class_ids(name: str, labels: Tensor, what: str) -> Tensor:
    """Integer class ids as int64 for cross-entropy; floating labels are refused (transformers' loss raises on
    them too) rather than truncated."""
    if labels.dtype.is_floating_point or labels.is_complex():
        raise ValueError(f"{name} must be integer {what}, got {labels.dtype}; pass a torch.long tensor")
    return labels.long()


def _classification_loss(config, logits: Tensor, labels: Tensor) -> Tensor:
    n = config.num_labels
    problem = config.problem_type
    if problem is None:
        if n == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
        config.problem_type = problem  # kept, as transformers does: later calls and save_pretrained see it
    if problem == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(logits, labels)
    if problem == "single_label_classification":
        ids = _class_ids("labels", labels, "class ids for problem_type='single_label_classification' (float "
                                           "targets: problem_type='multi_label_classification' or 'regression')")
        return F.cross_entropy(logits.view(-1, n), ids.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


class MegaForSequenceClassification(MegaPreTrainedModel):
    """Classification / regression on the first token; loss by config.problem_type (MSE, CE or BCE)."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mega = MegaModel(config, add_pooling_layer=False)
        self.classifier = MegaClassificationHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        out = self.mega(input_ids, attention_mask, token_type_ids, inputs_embeds, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(out.last_hidden_state)
        loss = None if labels is None else _classification_loss(self.config, logits, labels)
        return _logits_output(SequenceClassifierOutput, loss, logits, out, return_dict)


class MegaForMultipleChoice(MegaPreTrainedModel):
    """Inputs (B, num_choices, L): pooler -> dropout -> classifier (D -> 1); cross-entropy over the choices."""

    def __init__(self, config):
        super().__init__(config)
        self.mega = MegaModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, token_type_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        source = input_ids if input_ids is not None else inputs_embeds
        if source is None or source.dim() != (3 if input_ids is not None else 4):
            raise ValueError("MegaForMultipleChoice: input_ids must be (B, num_choices, L) "
                             "(or inputs_embeds (B, num_choices, L, D))")
        num_choices = source.shape[1]

        def flat(t, keep):
            return None if t is None else t.reshape(-1, *t.shape[-keep:])

        out = self.mega(flat(input_ids, 1), flat(attention_mask, 1), flat(token_type_ids, 1), flat(inputs_embeds, 2),
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                        return_dict=True)
        logits = self.classifier(self.dropout(out.pooler_output)).view(-1, num_choices)
        loss = None if labels is None else F.cross_entropy(logits, _class_ids("labels", labels, "choice indices (B,)"))
        return _logits_output(MultipleChoiceModelOutput, loss, logits, out, return_dict)


class MegaForTokenClassification(MegaPreTrainedModel):
    """Per-token dropout -> classifier (D -> num_labels); cross-entropy."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mega = MegaModel(config, add_pooling_layer=False)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        out = self.mega(input_ids, attention_mask, token_type_ids, inputs_embeds, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            _check_token_labels(labels, logits, shifted=False)
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.reshape(-1).long())
        return _logits_output(TokenClassifierOutput, loss, logits, out, return_dict)


class MegaForQuestionAnswering(MegaPreTrainedModel):
    """Span extraction: qa_outputs (D -> num_labels = 2) split into start / end logits (B, L); the loss averages
    the two cross-entropies, positions clamped to [0, L] and L ignored."""

    def __init__(self, config):
        super().__init__(config)
        if config.num_labels != 2:
            raise ValueError(f"MegaForQuestionAnswering: num_labels={config.num_labels}, but span extraction has "
                             "two outputs per token (start and end logits); set num_labels=2")
        self.num_labels = config.num_labels
        self.mega = MegaModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                start_positions: Optional[Tensor] = None, end_positions: Optional[Tensor] = None,
                output_attentions=None, output_hidden_states=None, return_dict=None):
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        out = self.mega(input_ids, attention_mask, token_type_ids, inputs_embeds, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states, return_dict=True)
        start, end = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)
        start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start.size(1)
            sp = _class_ids("start_positions", start_positions, "token positions").reshape(-1).clamp(0, ignored)
            ep = _class_ids("end_positions", end_positions, "token positions").reshape(-1).clamp(0, ignored)
            loss = (F.cross_entropy(start, sp, ignore_index=ignored)
                    + F.cross_entropy(end, ep, ignore_index=ignored)) / 2
        if not return_dict:
            return _head_tuple(loss, (start, end), out)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end,
                                            hidden_states=out.hidden_states, attentions=out.attentions)
