"""`MegaConfig`: every argument and default of MEGA_SPEC.md section 1, compatible with transformers' config.json.

A dict saved by transformers (`config.json`) loads unchanged: unknown keys are kept as attributes and written
back by `to_dict`. One extra attribute, `kernel_backend`, picks the kernels the model's modules call: "auto" or a
backend name of `mega_kernels.ops` that both ops implement, or a dict {"ema": ..., "attention": ...} (a missing
op is "auto"); transformers ignores it. `validate()` runs on construction and
again when a model is built (attributes may be changed in between); every error names the argument and the fix.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Dict, Optional

import torch

from .hub import CONFIG_NAME, resolve, split_hub_options

logger = logging.getLogger("mega_kernels")

ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_fast", "gelu_accurate", "gelu_python", "gelu_python_tanh",
               "gelu_10", "quick_gelu", "gelu_pytorch_tanh", "relu", "relu2", "relu6", "leaky_relu", "mish",
               "sigmoid", "tanh", "linear", "laplace")
ATTENTION_ACTIVATIONS = ("softmax", "laplace", "relu2")
NORM_TYPES = ("scalenorm", "layernorm", "rmsnorm", "batchnorm", "syncbatchnorm")
BIAS_TYPES = ("rotary", "simple")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
KERNEL_BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")


# (name, default) of every MEGA argument, in transformers' order (spec section 1).
MEGA_DEFAULTS = (
    ("vocab_size", 30522), ("hidden_size", 128), ("num_hidden_layers", 4), ("intermediate_size", 256),
    ("ema_projection_size", 16), ("bidirectional", True), ("shared_representation_size", 64),
    ("use_chunking", False), ("chunk_size", -1), ("truncation", None), ("normalize_before_mega", True),
    ("normalization_type", "scalenorm"), ("norm_affine", True), ("activation", "silu"),
    ("attention_activation", "softmax"), ("dropout_prob", 0.1), ("hidden_dropout_prob", 0.1),
    ("attention_probs_dropout_prob", 0.1), ("use_feature_dropout", False), ("use_normalized_ffn", True),
    ("nffn_hidden_size", 256), ("normalize_before_ffn", True), ("nffn_activation_dropout_prob", 0.1),
    ("max_positions", 2048), ("add_token_type_embeddings", False), ("type_vocab_size", 2),
    ("initializer_range", 0.02), ("ema_delta_alpha_range", 0.2), ("ema_beta_range", 0.02),
    ("ema_gamma_omega_range", 1.0), ("pad_token_id", 1), ("bos_token_id", 0), ("eos_token_id", 2),
    ("relative_positional_bias", "rotary"), ("classifier_dropout", None), ("use_cache", True),
    ("add_lm_hidden_dense_layer", True),
)
# The on / off arguments: True or False (a string such as "False" would read as true).
FLAGS = ("bidirectional", "use_chunking", "normalize_before_mega", "norm_affine", "use_feature_dropout",
         "use_normalized_ffn", "normalize_before_ffn", "add_token_type_embeddings", "use_cache",
         "add_lm_hidden_dense_layer", "is_decoder", "add_cross_attention", "tie_word_embeddings",
         "output_attentions", "output_hidden_states", "return_dict")
# Generic attributes of a transformers PretrainedConfig that the models read.
GENERIC_DEFAULTS = (
    ("is_decoder", False), ("add_cross_attention", False), ("tie_word_embeddings", True),
    ("problem_type", None), ("output_attentions", False), ("output_hidden_states", False),
    ("return_dict", True), ("kernel_backend", "auto"),
)


def read_config_dict(path: str, **hub_options: Any) -> Dict[str, Any]:
    """The saved config as a plain dict, unchecked: `path/config.json`, `path` itself when it is a file, or a Hub
    id's config.json (`hub.py`)."""
    file = path if os.path.isfile(path) else os.path.join(resolve(path, weights=False, **hub_options), CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"MegaConfig.from_pretrained: no {CONFIG_NAME} at {path!r}; "
                                "pass a folder written by save_pretrained (ours or transformers')")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


class MegaConfig:
    """Configuration of a MEGA model (transformers-compatible; see MEGA_SPEC.md section 1 for each argument).

    `num_labels` (default 2) is stored as `id2label` / `label2id`, as transformers does.
    """

    model_type = "mega"

    def __init__(self, **kwargs: Any):
        for name, default in MEGA_DEFAULTS + GENERIC_DEFAULTS:
            setattr(self, name, kwargs.pop(name, default))
        num_labels = kwargs.pop("num_labels", None)
        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        kwargs.pop("model_type", None)
        if id2label is None and label2id is not None:
            self.label2id = label2id
        elif id2label is not None:  # as transformers: the map wins over a num_labels of another size
            self.id2label = {int(k): v for k, v in id2label.items()}
            if num_labels is not None and num_labels != len(self.id2label):
                logger.warning("MegaConfig: num_labels=%s does not match id2label's %s labels; id2label is kept",
                               num_labels, len(self.id2label))
        else:
            self.num_labels = 2 if num_labels is None else num_labels
        for name, value in kwargs.items():  # unknown keys are kept unchanged
            setattr(self, name, value)
        self.validate()

    # -- labels ---------------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_labels must be a positive int, got {n!r}")
        self.id2label = {i: f"LABEL_{i}" for i in range(n)}

    @property
    def label2id(self) -> Dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    @label2id.setter
    def label2id(self, mapping: Dict[str, int]) -> None:
        """Set the labels from name -> id (fine-tuning scripts assign it); id2label becomes its inverse."""
        if not isinstance(mapping, dict):
            raise ValueError(f"label2id must be a dict of label name -> id, got {type(mapping).__name__}")
        self.id2label = {int(i): name for name, i in mapping.items()}

    @property
    def use_return_dict(self) -> bool:
        return bool(self.return_dict)

    # -- validation -----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the bad argument and the fix."""
        def bad(name, why, fix):
            raise ValueError(f"MegaConfig: {name}={getattr(self, name)!r} {why}; {fix}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "ema_projection_size",
                     "shared_representation_size", "nffn_hidden_size", "max_positions", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, "must be a positive int", f"set {name} to a positive integer")
        pad = self.pad_token_id
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < self.vocab_size):
            bad("pad_token_id", f"must be None or a token id in [0, vocab_size={self.vocab_size})",
                "use the tokenizer's pad id (or None), and a vocab_size above it")
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False", f"pass {name}=True or {name}=False (a bool, not a string)")
        for name, allowed in (("activation", ACTIVATIONS), ("attention_activation", ATTENTION_ACTIVATIONS),
                              ("normalization_type", NORM_TYPES), ("relative_positional_bias", BIAS_TYPES),
                              ("problem_type", PROBLEM_TYPES)):
            if getattr(self, name) not in allowed:
                bad(name, "is not supported", f"use one of {allowed}")
        backends = self.kernel_backend if isinstance(self.kernel_backend, dict) else {"ema": self.kernel_backend}
        if not set(backends) <= {"ema", "attention"} or not all(v in KERNEL_BACKENDS for v in backends.values()):
            bad("kernel_backend", "is not supported",
                f"use one of {KERNEL_BACKENDS}, or a dict {{'ema': ..., 'attention': ...}} of them")
        from .ops import backends as registry

        if isinstance(self.kernel_backend, str):  # one name for both ops: both must have it
            lacking = [op for op in ("ema", "attention") if self.kernel_backend not in registry.implemented(op)]
            if self.kernel_backend != "auto" and lacking:
                bad("kernel_backend", f"names no kernels for {' or '.join(lacking)}",
                    f"name it per op, e.g. {{'ema': {self.kernel_backend!r}}} (a missing op is 'auto')")
        for op, name in backends.items() if isinstance(self.kernel_backend, dict) else ():
            if name != "auto" and name not in registry.implemented(op):
                bad("kernel_backend", f"names {name!r} for {op}, which has no such kernels",
                    f"use one of {('auto',) + tuple(registry.implemented(op))} for {op!r}")
        for name in ("dropout_prob", "hidden_dropout_prob", "attention_probs_dropout_prob",
                     "nffn_activation_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and 0.0 <= value <= 1.0):
                bad(name, "must be a probability", "use a number in [0, 1]")
        if self.use_chunking and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            bad("chunk_size", "must be a positive int when use_chunking=True",
                "set chunk_size to the attention block length (e.g. 128) or use_chunking=False")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or \
                (self.chunk_size < 1 and self.chunk_size != -1):
            bad("chunk_size", "must be -1 (no chunking) or a positive int (not a bool)",
                "use -1 or a positive block length")
        if self.truncation is not None and (not isinstance(self.truncation, int) or isinstance(self.truncation, bool)
                                            or self.truncation < 1):
            bad("truncation", "must be None or a positive int", "use None (full EMA) or a positive kernel length")
        if self.relative_positional_bias == "rotary" and self.shared_representation_size % 2:
            bad("shared_representation_size", "must be even with the rotary relative bias (it rotates halves)",
                "use an even shared_representation_size or relative_positional_bias='simple'")
        if self.relative_positional_bias == "simple" and self.chunk_size > self.max_positions:
            bad("chunk_size", f"exceeds max_positions={self.max_positions}, which sizes the simple bias",
                "raise max_positions to at least chunk_size or use a smaller chunk_size")
        if self.is_decoder and self.bidirectional:
            bad("bidirectional", "with is_decoder=True: a bidirectional EMA sees future tokens",
                "set bidirectional=False for a decoder (or is_decoder=False)")
        if self.add_cross_attention and not self.is_decoder:
            bad("add_cross_attention", "needs is_decoder=True", "set is_decoder=True (and bidirectional=False)")
        if not all(isinstance(k, int) and k >= 0 for k in self.id2label) or not self.id2label:
            bad("id2label", "must map label ids 0..n-1 to names", "pass num_labels or a proper id2label")

    # -- (de)serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """All attributes (unknown keys included) as a JSON-serialisable dict, transformers' layout."""
        out = {k: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else copy.deepcopy(v)
               for k, v in self.__dict__.items()}  # a torch.dtype (dtype=torch.float16) by name, as transformers
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = self.label2id
        out["model_type"] = self.model_type
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], **overrides: Any) -> "MegaConfig":
        model_type = config_dict.get("model_type", "mega")
        if model_type != "mega":
            raise ValueError(f"MegaConfig.from_dict: model_type is {model_type!r}, expected 'mega'")
        if ("num_labels" in overrides or "label2id" in overrides) and "id2label" not in overrides:
            config_dict = {k: v for k, v in config_dict.items() if k not in ("id2label", "label2id")}
        return cls(**{**config_dict, **overrides})  # (an override wins over the saved labels)

    @classmethod
    def from_json_file(cls, path: str) -> "MegaConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_pretrained(cls, path: str, **overrides: Any) -> "MegaConfig":
        """Read `path/config.json`, `path` itself when it is a file, or a Hugging Face Hub id's config.json
        (options revision, cache_dir, local_files_only, token, force_download, subfolder: `hub.py`); other
        keywords override the config's attributes (checked after they apply)."""
        hub_options, overrides = split_hub_options(overrides)
        return cls.from_dict(read_config_dict(path, **hub_options), **overrides)

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.to_json_file(os.path.join(folder, CONFIG_NAME))

    def copy(self, **overrides: Any) -> "MegaConfig":
        return type(self).from_dict(self.to_dict(), **overrides)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MegaConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"MegaConfig {self.to_json_string()}"

    def backend_for(self, op: str) -> str:
        """The kernel backend requested for `op` ("ema" or "attention")."""
        if isinstance(self.kernel_backend, dict):
            return self.kernel_backend.get(op, "auto")
        return self.kernel_backend

    def get(self, name: str, default: Optional[Any] = None) -> Any:
        return getattr(self, name, default)
