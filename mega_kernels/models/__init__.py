"""MegaModel, the six task heads and their outputs (MEGA_SPEC.md section 7)."""
from .heads import (MegaClassificationHead, MegaForCausalLM, MegaForMaskedLM, MegaForMultipleChoice,
                    MegaForQuestionAnswering, MegaForSequenceClassification, MegaForTokenClassification)
from .modeling import MegaModel, MegaPreTrainedModel

__all__ = [
    "MegaClassificationHead", "MegaForCausalLM", "MegaForMaskedLM", "MegaForMultipleChoice",
    "MegaForQuestionAnswering", "MegaForSequenceClassification", "MegaForTokenClassification", "MegaModel",
    "MegaPreTrainedModel",
]
