"""`MegaPreTrainedModel` (init, checkpoints in transformers' format) and `MegaModel` (MEGA_SPEC.md section 7).

Checkpoints: `save_pretrained(folder)` writes config.json and model.safetensors (pytorch_model.bin when
safetensors is not importable) with transformers' key names, so transformers' `from_pretrained` reads it;
`from_pretrained(folder)` reads either file; the MEGA body's keys must match exactly, a head's may be new
(`loading.py`), and the tied output embedding may be absent, as transformers leaves it out. No import of
transformers anywhere in this package.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
from typing import Optional, Tuple

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import MegaConfig, read_config_dict
from ..hub import HUB_OPTIONS, resolve, split_hub_options
from ..modules import (MegaBlock, MegaEmbeddings, MegaMultiDimensionDampedEma, MegaPooler, MegaRMSNorm,
                       MegaRotaryRelativePositionalBias, MegaScaleNorm, MegaSimpleRelativePositionalBias)
from ..modules.attention import MegaMovingAverageGatedAttention
from ..modules.cross_attention import MegaGatedCrossAttention
from .loading import (SAFE_WEIGHTS_NAME, WEIGHTS_NAME, load_device, load_dtype, match_checkpoint, read_weights,
                      safetensors_module)
from .outputs import BaseModelOutputWithPoolingAndCrossAttentions

Tensor = torch.Tensor


def _compiling() -> bool:
    return hasattr(torch, "compiler") and torch.compiler.is_compiling()


class MegaPreTrainedModel(nn.Module):
    """Base class: weight init of spec section 8, output-embedding tying, from_pretrained / save_pretrained."""

    config_class = MegaConfig
    base_model_prefix = "mega"
    _output_embedding_name: Optional[str] = None  # "lm_head" / "mlm_head" in the LM heads

    def __init__(self, config: MegaConfig):
        super().__init__()
        if not isinstance(config, MegaConfig):
            kind = f"{type(config).__module__}.{type(config).__qualname__}"
            fix = "; convert it with mega_kernels.MegaConfig(**config.to_dict())" if hasattr(config, "to_dict") else ""
            raise TypeError(f"{type(self).__name__} needs a mega_kernels.MegaConfig, got {kind}{fix}")
        config.validate()
        self.config = config

    # -- init and tying -------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        c = self.config
        if isinstance(module, MegaMultiDimensionDampedEma):
            nn.init.normal_(module.damping_factor, 0.0, c.ema_delta_alpha_range)
            nn.init.normal_(module.decay_factor, 0.0, c.ema_delta_alpha_range)
            sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(c.ema_projection_size)])
            module.ema_expansion_matrix.normal_(0.0, c.ema_beta_range).add_(sign.view(-1, 1))
            nn.init.normal_(module.kernel_projection_matrix, 0.0, c.ema_gamma_omega_range)
            nn.init.normal_(module.residual_weight, 0.0, c.ema_gamma_omega_range)
        elif isinstance(module, MegaSimpleRelativePositionalBias):
            nn.init.normal_(module.rel_pos_bias, 0.0, c.initializer_range)
        elif isinstance(module, MegaRotaryRelativePositionalBias):
            nn.init.normal_(module.alpha, 0.0, c.initializer_range)
            nn.init.normal_(module.b_param, 0.0, c.initializer_range)
        elif isinstance(module, MegaScaleNorm) and module.scalar is not None:
            nn.init.constant_(module.scalar, 1.0)
        elif isinstance(module, MegaRMSNorm) and module.weight is not None:
            nn.init.constant_(module.weight, 1.0)
        elif isinstance(module, MegaMovingAverageGatedAttention):
            nn.init.normal_(module.qk_weight, 0.0, c.initializer_range)
            nn.init.constant_(module.qk_bias, 0.0)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, c.initializer_range)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, c.initializer_range)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.weight.fill_(1.0)
            module.bias.zero_()

    def post_init(self) -> None:
        self.apply(self._init_weights)
        self.tie_weights()

    @property
    def base_model(self) -> "MegaModel":
        """The MEGA body (a property, as transformers')."""
        return getattr(self, self.base_model_prefix, self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embedding_layer.word_embeddings

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        return None if self._output_embedding_name is None else getattr(self, self._output_embedding_name)

    def _tied_keys(self):
        if self._output_embedding_name is None or not self.config.tie_word_embeddings:
            return set()
        return {f"{self._output_embedding_name}.weight"}

    def tie_weights(self) -> None:
        out = self.get_output_embeddings()
        if out is not None and self.config.tie_word_embeddings:
            out.weight = self.get_input_embeddings().weight

    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Give the vocabulary new_num_tokens entries (rounded up to a multiple of pad_to_multiple_of; None: the
        present size) and return the new word embedding. The word embedding and an LM head's output projection
        (weight and bias) keep their first rows; added rows take the mean of the old rows (mean_resizing, as
        transformers, without its spread of 1e-9 standard deviations around it) or are drawn as at init
        (N(0, initializer_range), bias 0). config.vocab_size follows; a tied output projection stays tied, and
        its bias grows by zeros, as transformers' tying does."""
        old = self.get_input_embeddings()
        n = old.num_embeddings if new_num_tokens is None else new_num_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"new_num_tokens must be an int >= 1, got {new_num_tokens!r}")
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be an int >= 1, got {pad_to_multiple_of!r}")
            n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        if old.padding_idx is not None and old.padding_idx >= n:
            raise ValueError(f"new_num_tokens={n} would drop the padding token (pad_token_id {old.padding_idx}); "
                             f"keep at least {old.padding_idx + 1} tokens")
        if n == old.num_embeddings:
            return old
        std = self.config.initializer_range
        new = nn.Embedding(n, old.embedding_dim, padding_idx=old.padding_idx, device=old.weight.device,
                           dtype=old.weight.dtype)
        new.weight = _resized(old.weight, n, mean_resizing, std)
        self.base_model.set_input_embeddings(new)
        out = self.get_output_embeddings()
        if out is not None:
            head = nn.Linear(out.in_features, n, bias=out.bias is not None, device=out.weight.device,
                             dtype=out.weight.dtype)
            head.weight = _resized(out.weight, n, mean_resizing, std)  # replaced by the embedding's when tied
            if out.bias is not None:  # (tied, transformers pads the bias with zeros instead: so do we)
                head.bias = _resized(out.bias, n, mean_resizing and not self.config.tie_word_embeddings, 0.0)
            setattr(self, self._output_embedding_name, head)
        self.config.vocab_size = n
        self.tie_weights()
        return new

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameter elements, a tied weight counted once; optionally only those with requires_grad,
        or without the embeddings' weights (and so without a tied output projection's)."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    def set_kernel_backend(self, backend) -> None:
        """Switch the kernels of every module: "auto", a backend name, or {"ema": ..., "attention": ...}."""
        previous = self.config.kernel_backend
        self.config.kernel_backend = backend
        try:
            self.config.validate()
        except ValueError:
            self.config.kernel_backend = previous
            raise
        for module in self.modules():
            if isinstance(module, MegaMultiDimensionDampedEma):
                module.backend = self.config.backend_for("ema")
            elif isinstance(module, (MegaMovingAverageGatedAttention, MegaGatedCrossAttention)):
                module.backend = self.config.backend_for("attention")
        self.base_model._applied_backend = copy.deepcopy(self.config.kernel_backend)

    # -- gradient checkpointing -------------------------------------------------------------------------
    supports_gradient_checkpointing = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Keep only each MEGA block's inputs in training and recompute the block in the backward pass
        (torch.utils.checkpoint, use_reentrant=False: any outputs, the cache included, and the RNG state kept,
        so the dropout masks are the same). Gradients are those without checkpointing; batchnorm running
        statistics are updated once per step, as without (the recomputation puts them back). In eval mode or
        without grad the blocks run plainly. `gradient_checkpointing_kwargs` go to torch.utils.checkpoint
        (e.g. {"determinism_check": "none"})."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False):
            raise ValueError("gradient checkpointing runs with use_reentrant=False only (the reentrant variant "
                             "cannot return the blocks' cache and would update batchnorm statistics twice); "
                             "leave use_reentrant out")
        if "context_fn" in kwargs:
            raise ValueError("gradient_checkpointing_kwargs: context_fn is set by the model (it restores batchnorm "
                             "statistics in the recomputation); leave it out")
        self.base_model._checkpoint_kwargs = kwargs

    def gradient_checkpointing_disable(self) -> None:
        self.base_model._checkpoint_kwargs = None

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.base_model._checkpoint_kwargs is not None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str, safe_serialization: Optional[bool] = None) -> None:
        """Write config.json + model.safetensors (or pytorch_model.bin) in transformers' format."""
        os.makedirs(folder, exist_ok=True)
        config = self.config.copy()
        config.architectures = [type(self).__name__]
        config.dtype = str(self.dtype).replace("torch.", "")  # as transformers 4.57 writes it
        config.save_pretrained(folder)
        st = safetensors_module()
        if safe_serialization is None:
            safe_serialization = st is not None
        if safe_serialization and st is None:
            raise ImportError("save_pretrained(safe_serialization=True) needs the safetensors package; "
                              "pip install safetensors or pass safe_serialization=False")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in self._tied_keys()}
        if safe_serialization:
            st.save_file(state, os.path.join(folder, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            torch.save(state, os.path.join(folder, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, folder: str, config: Optional[MegaConfig] = None, torch_dtype=None,
                        device_map=None, *, dtype=None, ignore_mismatched_sizes: bool = False, **overrides):
        """Load a transformers-format checkpoint (config.json + model.safetensors or pytorch_model.bin, single or
        sharded): a local folder, or a Hugging Face Hub id fetched into the Hub cache (`mega_kernels/hub.py`;
        keywords revision, cache_dir, local_files_only, token, force_download, subfolder). The MEGA body loads
        strictly, the head as transformers does (a new head keeps its fresh init; `loading.py` has the rules;
        ignore_mismatched_sizes=True re-initializes weights of another shape instead of raising).

        Other `overrides` change config attributes (e.g. kernel_backend="triton", num_labels=5); a name that is
        not one raises TypeError. dtype (or its older name torch_dtype): a torch.dtype, its name ("bfloat16"),
        or "auto" for the saved dtype (config.dtype). device_map: one device for the whole model ("cuda", 0,
        torch.device, {"": device}; "auto": the current CUDA device if there is one, else the CPU). Returns the
        model in eval mode."""
        hub_options, overrides = split_hub_options(overrides)
        unknown = set(overrides) - set(MegaConfig().to_dict()) - {"num_labels"}

        def unknown_error(names):
            return TypeError(f"{cls.__name__}.from_pretrained got unknown argument(s) {', '.join(sorted(names))}: "
                             "not a MegaConfig attribute nor a loading option (dtype / torch_dtype, device_map, "
                             f"ignore_mismatched_sizes, {', '.join(HUB_OPTIONS)})")
        try:
            folder = resolve(folder, weights=True, **hub_options)
        except OSError:
            if unknown:  # a misspelt option (cache_dri=...) is the likelier cause
                raise unknown_error(unknown) from None
            raise
        saved = read_config_dict(folder) if config is None else config.to_dict()
        unknown -= set(saved)  # (a saved config may carry attributes of its own)
        if unknown:
            raise unknown_error(unknown)
        config_class = cls.config_class if config is None else type(config)
        config = config_class.from_dict(saved, **overrides)  # checked with the overrides applied
        device = load_device(device_map)
        asked = dtype if dtype is not None else torch_dtype
        if asked != "auto":  # checked before the weights are read; "auto" needs them
            dtype = load_dtype(asked, config, {})
        model = cls(config)
        state = read_weights(folder)
        if asked == "auto":
            dtype = load_dtype(asked, config, state)
        model.load_checkpoint_state(state, ignore_mismatched_sizes)
        return model.to(device=device, dtype=dtype).eval()

    def load_checkpoint_state(self, state: dict, ignore_mismatched_sizes: bool = False) -> None:
        """Load a checkpoint's state_dict by the rules of `loading.match_checkpoint` (the MEGA body strictly;
        head weights may be missing or another head's), then tie the output embedding."""
        self.load_state_dict(match_checkpoint(self, state, ignore_mismatched_sizes), strict=False)
        self.tie_weights()


@torch.no_grad()
def _resized(old: nn.Parameter, n: int, mean_resizing: bool, std: float) -> nn.Parameter:
    """old (V, ...) -> (n, ...): the first min(V, n) rows kept; added rows the mean of the old rows (computed in
    float32), or N(0, std) (std 0: zeros)."""
    new = old.new_empty((n,) + tuple(old.shape[1:]))
    keep = min(n, old.shape[0])
    new[:keep] = old[:keep]
    if n > keep:
        if mean_resizing:
            new[keep:] = old.float().mean(0).to(old.dtype)
        elif std > 0:
            new[keep:].normal_(0.0, std)
        else:
            new[keep:].zero_()
    return nn.Parameter(new, requires_grad=old.requires_grad)


@contextlib.contextmanager
def _keeping_norm_statistics(module: nn.Module):
    """Put the batchnorm buffers of `module` back on exit (the recomputation of a checkpointed block)."""
    saved = [(b, b.clone()) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _checkpoint_contexts(module: nn.Module):
    return contextlib.nullcontext(), _keeping_norm_statistics(module)


class MegaModel(MegaPreTrainedModel):
    """Embeddings -> MEGA blocks -> (pooler). Inputs batch-first; see `forward`."""

    def __init__(self, config: MegaConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embedding_layer = MegaEmbeddings(config)
        self.layers = nn.ModuleList([MegaBlock(config) for _ in range(config.num_hidden_layers)])
        self.pooler = MegaPooler(config) if add_pooling_layer else None
        self._checkpoint_kwargs: Optional[dict] = None  # gradient_checkpointing_enable
        # the kernel_backend the modules hold: forward applies a config.kernel_backend assigned since
        self._applied_backend = copy.deepcopy(config.kernel_backend)
        self.post_init()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding_layer.word_embeddings = value

    def _check_inputs(self, input_ids, inputs_embeds):
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MegaModel: pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dtype not in (torch.long, torch.int):
                raise TypeError(f"input_ids must be a torch.long or torch.int (B, L) tensor, got {input_ids.dtype} "
                                f"{tuple(input_ids.shape)}; pass token ids (e.g. ids.long())")
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}"
                                 f"{'; add the batch dimension: ids[None]' if input_ids.dim() == 1 else ''}")
            if input_ids.numel() and not _compiling():
                lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one device sync
                if lo < 0 or hi >= c.vocab_size:
                    raise ValueError(f"input_ids out of range: values span [{lo}, {hi}] but vocab_size is "
                                     f"{c.vocab_size}; ids must be in [0, {c.vocab_size - 1}]")
            shape = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != c.hidden_size:
                raise ValueError(f"inputs_embeds must be (B, L, {c.hidden_size}), got {tuple(inputs_embeds.shape)}")
            if inputs_embeds.dtype != self.dtype:
                raise TypeError(f"inputs_embeds is {inputs_embeds.dtype} but the model is {self.dtype}; "
                                f"convert with inputs_embeds.to({self.dtype})")
            shape = inputs_embeds.shape[:2]
        if shape[1] == 0:
            raise ValueError("MegaModel: the input has no tokens (sequence length 0); pass at least one token per "
                             "sequence (an empty batch, B = 0, is fine)")
        return shape

    def _check_token_types(self, token_type_ids, shape):
        c = self.config
        if token_type_ids is None or not c.add_token_type_embeddings:
            return
        if tuple(token_type_ids.shape) != tuple(shape) or token_type_ids.dtype.is_floating_point:
            raise ValueError(f"token_type_ids must be an integer (B, L) = {tuple(shape)} tensor, got "
                             f"{token_type_ids.dtype} {tuple(token_type_ids.shape)}")
        if token_type_ids.numel() and not _compiling():
            lo, hi = int(token_type_ids.min()), int(token_type_ids.max())
            if lo < 0 or hi >= c.type_vocab_size:
                raise ValueError(f"token_type_ids out of range [{lo}, {hi}]; type_vocab_size is {c.type_vocab_size}")

    @staticmethod
    def _bool_mask(name: str, mask: Optional[Tensor], shape: Tuple[int, int]) -> Optional[Tensor]:
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"{name} must be (B, L) = {tuple(shape)} (1 = token, 0 = padding), got "
                             f"{tuple(mask.shape)}")
        if mask.is_complex():
            raise TypeError(f"{name} must be bool, integer or float 0/1, got {mask.dtype}")
        return mask != 0

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None,
                past_key_values: Optional[Tuple[Tuple[Tensor, ...], ...]] = None, use_cache: Optional[bool] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None):
        """input_ids (B, L) or inputs_embeds (B, L, D); attention_mask (B, past + L), 1 = token;
        token_type_ids (B, L); encoder_hidden_states (B, S, D) + encoder_attention_mask (B, S) for
        cross-attention; past_key_values: one tuple per layer (layout in `mega_kernels.modules.block`).

        Returns BaseModelOutputWithPoolingAndCrossAttentions (last_hidden_state (B, L, D), pooler_output (B, D),
        hidden_states, past_key_values, attentions, cross_attentions), or with return_dict=False the tuple
        (last_hidden_state, pooler_output, hidden_states, past_key_values, attentions, cross_attentions).
        """
        c = self.config
        if c.kernel_backend != self._applied_backend:  # model.config.kernel_backend = ... after building
            self.set_kernel_backend(c.kernel_backend)
        output_attentions = c.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = c.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = c.use_return_dict if return_dict is None else return_dict
        bsz, length = self._check_inputs(input_ids, inputs_embeds)
        self._check_token_types(token_type_ids, (bsz, length))
        if c.is_decoder:
            use_cache = c.use_cache if use_cache is None else use_cache
        elif use_cache or past_key_values is not None:
            raise ValueError("use_cache / past_key_values need a decoder: this model has is_decoder=False"
                             f"{' and a bidirectional EMA (no incremental state)' if c.bidirectional else ''}; "
                             "build it with is_decoder=True, bidirectional=False")
        past = 0
        if past_key_values is not None:
            if len(past_key_values) != c.num_hidden_layers:
                raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model has "
                                 f"{c.num_hidden_layers}; pass the past_key_values returned by this model")
            want = 6 if c.add_cross_attention else 4
            sizes = sorted({len(layer) if isinstance(layer, (tuple, list)) else -1 for layer in past_key_values})
            if sizes != [want]:
                raise ValueError("past_key_values: each layer's entry must be the (self_k, self_v, ema_cache, "
                                 f"position[, cross_k, cross_v]) tuple this model returns, got entries of {sizes} "
                                 "items (-1: not a tuple); transformers' MEGA cache (no position entry: README "
                                 "difference 7) cannot be continued, so run the prompt through this model with "
                                 "use_cache=True")
            past = int(past_key_values[0][3].max()) if past_key_values[0][3].numel() else 0
        padding_mask = self._bool_mask("attention_mask", attention_mask, (bsz, past + length))
        if padding_mask is not None and not _compiling() and bool(padding_mask.all()):
            padding_mask = None  # the same maths without a mask, and the kernels' faster path
        if c.add_cross_attention:
            if encoder_hidden_states is None and past_key_values is None:
                raise ValueError("this decoder has cross-attention: pass encoder_hidden_states (B, S, D)")
            if encoder_hidden_states is not None and encoder_hidden_states.dtype != self.dtype:
                raise TypeError(f"encoder_hidden_states is {encoder_hidden_states.dtype} but the model is "
                                f"{self.dtype}; convert it with .to({self.dtype})")
            if encoder_hidden_states is not None and (
                    encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != bsz
                    or encoder_hidden_states.shape[2] != c.hidden_size):
                raise ValueError(f"encoder_hidden_states must be (B, S, D) = ({bsz}, S, {c.hidden_size}), one "
                                 f"row per input row, got {tuple(encoder_hidden_states.shape)}; repeat it per "
                                 "row (expand) where one source serves several rows")
            if encoder_attention_mask is not None:
                src = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else \
                    past_key_values[0][4].shape[1]
                encoder_attention_mask = self._bool_mask("encoder_attention_mask", encoder_attention_mask,
                                                         (bsz, src))

        hidden = self.embedding_layer(input_ids, token_type_ids, inputs_embeds)
        all_hidden = (hidden,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        all_cross = () if output_attentions and c.add_cross_attention else None
        next_cache = () if use_cache else None
        checkpointing = self._checkpoint_kwargs is not None and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            args = (hidden, padding_mask, c.is_decoder, encoder_hidden_states, encoder_attention_mask,
                    None if past_key_values is None else past_key_values[i], output_attentions, bool(use_cache), past)
            if checkpointing:
                hidden, self_w, cross_w, layer_cache = torch.utils.checkpoint.checkpoint(
                    layer, *args, use_reentrant=False, context_fn=functools.partial(_checkpoint_contexts, layer),
                    **self._checkpoint_kwargs)
            else:
                hidden, self_w, cross_w, layer_cache = layer(*args)
            if output_hidden_states:
                all_hidden += (hidden,)
            if output_attentions:
                all_attn += (self_w,)
                if all_cross is not None:
                    all_cross += (cross_w,)
            if use_cache:
                next_cache += (layer_cache,)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        if not return_dict:
            return (hidden, pooled, all_hidden, next_cache, all_attn, all_cross)
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=hidden, pooler_output=pooled, hidden_states=all_hidden, past_key_values=next_cache,
            attentions=all_attn, cross_attentions=all_cross)
