"""Shared helpers for the transformers parity tests: build transformers' MEGA model and ours from one config
dict, copy the state_dict strictly, run both, and compare (recursively) to float32 rounding.

transformers is imported plainly: the parity tests must fail, not skip, when it is missing.
"""
from __future__ import annotations

import contextlib

import torch
import transformers  # noqa: F401  (a hard dependency of the parity tests)
from transformers.models.deprecated.mega import configuration_mega as hf_config_mod
from transformers.models.deprecated.mega import modeling_mega as hf

import mega_kernels
from mega_kernels import MegaConfig
from mega_kernels.modules.common import MegaRMSNorm
from model_helpers import (GRAD_RTOL, OUT_RTOL, SMALL, assert_close, assert_grads_close,  # noqa: F401
                           config_dict, gpu_backends, perturb_, weighted_sum)


@contextlib.contextmanager
def fixed_hf_rmsnorm():
    """transformers' RMSNorm skips the normalisation (spec 9.1); patch in the correct maths while comparing the
    rest of the model (the fix itself is tested against the formula in test_fixed_bugs)."""
    original = hf.MegaRMSNorm.forward
    hf.MegaRMSNorm.forward = MegaRMSNorm.forward  # same attribute names (weight, eps)
    try:
        yield
    finally:
        hf.MegaRMSNorm.forward = original


def build_pair(head: str, cfg: dict, dtype=torch.float32):
    """(transformers model, our model), both in eval mode, ours holding transformers' (perturbed) weights,
    loaded with strict=True."""
    hf_model = getattr(hf, head)(hf_config_mod.MegaConfig(**cfg))
    perturb_(hf_model)
    ours = getattr(mega_kernels, head)(MegaConfig(**cfg))
    ours.load_state_dict(hf_model.state_dict(), strict=True)
    return hf_model.to(dtype).eval(), ours.to(dtype).eval()
