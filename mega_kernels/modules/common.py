"""Shared pieces of the MEGA modules: activations, dropout (standard and featurewise) and the five norms.

All modules work batch-first: hidden states are (B, L, D). Norms (MEGA_SPEC.md section 5, eps 1e-5):

    scalenorm:  scalar * x * rsqrt(mean(x^2) + eps)        one (1,) parameter `scalar`
    rmsnorm:    weight * x * rsqrt(mean(x^2) + eps)        (D,) `weight`; transformers forgets the rsqrt (9.1)
    layernorm:  nn.LayerNorm;  batchnorm / syncbatchnorm: statistics over (B, L) per channel
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.attention import laplace, relu2

Tensor = torch.Tensor


def _gelu_new(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_python(x: Tensor) -> Tensor:  # the erf form written out
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_python_tanh(x: Tensor) -> Tensor:  # the tanh form written out (gelu_new's maths, another rounding order)
    return x * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# The same functions (and numerics) as transformers' ACT2FN entries of these names (all but the two with
# learnable parameters, prelu and xielu). tests/test_parity_modules.py compares each.
ACTIVATION_FUNCTIONS = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_new": _gelu_new, "gelu_fast": _gelu_fast,
    "gelu_accurate": _gelu_new, "gelu_python": _gelu_python, "gelu_python_tanh": _gelu_python_tanh,
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10.0, 10.0), "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "relu2": relu2,
    "relu6": F.relu6, "leaky_relu": F.leaky_relu, "mish": F.mish, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "linear": lambda x: x, "laplace": laplace,
}


def get_activation(name: str):
    try:
        return ACTIVATION_FUNCTIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; use one of {tuple(ACTIVATION_FUNCTIONS)}") from None


class MegaDropout(nn.Module):
    """Dropout; with `is_featurewise` whole channels are dropped per sequence (dropout2d over (B, D, L)).

    Input (B, ..., L, D) batch-first. (transformers applies dropout2d to 4-d chunked values, which drops whole
    chunks instead of channels; ours always drops channels.)
    """

    def __init__(self, p: float, is_featurewise: bool = False):
        super().__init__()
        self.p = p
        self.is_featurewise = is_featurewise

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.is_featurewise:
            flat = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)  # (B, D, positions)
            return F.dropout2d(flat.unsqueeze(-1), self.p, True).squeeze(-1).transpose(1, 2).reshape(x.shape)
        return F.dropout(x, self.p, True)

    def extra_repr(self) -> str:
        return f"p={self.p}, featurewise={self.is_featurewise}"


class MegaScaleNorm(nn.Module):
    """scalar * x * rsqrt(mean(x^2, dim) + eps)."""

    def __init__(self, dim: int = -1, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.dim, self.eps, self.affine = dim, eps, affine
        self.scalar = nn.Parameter(torch.ones(1)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        mean_square = torch.mean(torch.square(x), dim=self.dim, keepdim=True)
        if self.scalar is not None:
            x = self.scalar * x
        return x * torch.rsqrt(mean_square + self.eps)


class MegaRMSNorm(nn.Module):
    """weight * x * rsqrt(mean(x^2) + eps): a real RMSNorm (transformers' version skips the rsqrt, spec 9.1)."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_features, self.eps, self.affine = num_features, eps, affine
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        mean_square = torch.mean(torch.square(x), dim=-1, keepdim=True)
        if self.weight is not None:
            x = x * self.weight
        return x * torch.rsqrt(mean_square + self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class MegaSequenceNorm(nn.Module):
    """One of the five norms on batch-first (B, L, D) input; the norm lives in `.norm` (state_dict `norm.*`)."""

    def __init__(self, norm_type: str, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if norm_type == "layernorm":
            self.norm = nn.LayerNorm(dim, eps, elementwise_affine=affine)
        elif norm_type == "scalenorm":
            self.norm = MegaScaleNorm(-1, eps, affine)
        elif norm_type == "rmsnorm":
            self.norm = MegaRMSNorm(dim, eps, affine)
        elif norm_type == "batchnorm":
            self.norm = nn.BatchNorm1d(dim, eps, affine=affine)
        elif norm_type == "syncbatchnorm":
            self.norm = nn.SyncBatchNorm(dim, eps, affine=affine)
        else:
            raise ValueError(f"unknown normalization_type {norm_type!r}; use scalenorm, layernorm, rmsnorm, "
                             "batchnorm or syncbatchnorm")

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            if x.dim() != 3:
                raise ValueError(f"batchnorm input must be (B, L, D), got {tuple(x.shape)}")
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x)


def init_gated_attention(module: nn.Module, config) -> None:
    """What the gated self- and cross-attention layers share (spec sections 5-6): the activations, pre- or
    post-norm, the attention backend, the three dropouts and the sequence norm (in transformers' order)."""
    module.activation = get_activation(config.activation)
    module.attention_activation = config.attention_activation
    module.prenorm = config.normalize_before_mega
    module.backend = config.backend_for("attention")
    module.dropout = MegaDropout(config.dropout_prob, config.use_feature_dropout)
    module.hidden_dropout = MegaDropout(config.hidden_dropout_prob, config.use_feature_dropout)
    module.attention_dropout = MegaDropout(config.attention_probs_dropout_prob, False)
    module.norm = MegaSequenceNorm(config.normalization_type, config.hidden_size, affine=config.norm_affine)
