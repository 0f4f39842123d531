"""nn.Modules of MEGA with transformers' parameter names (MEGA_SPEC.md sections 2-6), batch-first."""
from .attention import MegaMovingAverageGatedAttention
from .block import MegaBlock, MegaNormalizedFeedForwardNetwork, MegaPooler
from .common import MegaDropout, MegaRMSNorm, MegaScaleNorm, MegaSequenceNorm, get_activation
from .cross_attention import MegaGatedCrossAttention
from .ema import MegaMultiDimensionDampedEma
from .embeddings import MegaEmbeddings, MegaRotaryRelativePositionalBias, MegaSimpleRelativePositionalBias

__all__ = [
    "MegaBlock", "MegaDropout", "MegaEmbeddings", "MegaGatedCrossAttention", "MegaMovingAverageGatedAttention",
    "MegaMultiDimensionDampedEma", "MegaNormalizedFeedForwardNetwork", "MegaPooler", "MegaRMSNorm",
    "MegaRotaryRelativePositionalBias", "MegaScaleNorm", "MegaSequenceNorm", "MegaSimpleRelativePositionalBias",
    "get_activation",
]
