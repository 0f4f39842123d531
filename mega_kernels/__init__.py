"""mega-kernels: fast, faithful MEGA (Moving Average Equipped Gated Attention) for PyTorch."""
__version__ = "0.1.0"

from . import ops  # noqa: E402
from .config import MegaConfig  # noqa: E402
from .models import (MegaForCausalLM, MegaForMaskedLM, MegaForMultipleChoice,  # noqa: E402
                     MegaForQuestionAnswering, MegaForSequenceClassification, MegaForTokenClassification,
                     MegaModel, MegaPreTrainedModel)
from .modules import (MegaBlock, MegaEmbeddings, MegaGatedCrossAttention,  # noqa: E402
                      MegaMovingAverageGatedAttention, MegaMultiDimensionDampedEma,
                      MegaNormalizedFeedForwardNetwork, MegaRotaryRelativePositionalBias,
                      MegaSimpleRelativePositionalBias)

__all__ = [
    "ops", "__version__", "MegaConfig", "MegaModel", "MegaPreTrainedModel", "MegaForCausalLM", "MegaForMaskedLM",
    "MegaForSequenceClassification", "MegaForMultipleChoice", "MegaForTokenClassification",
    "MegaForQuestionAnswering", "MegaBlock", "MegaEmbeddings", "MegaGatedCrossAttention",
    "MegaMovingAverageGatedAttention", "MegaMultiDimensionDampedEma", "MegaNormalizedFeedForwardNetwork",
    "MegaRotaryRelativePositionalBias", "MegaSimpleRelativePositionalBias",
]
