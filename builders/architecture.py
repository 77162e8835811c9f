"""The architecture facts the decoder graph and AWQ need, read from a model's own config.

One decoder block shape covers the supported families; what differs between them is a handful of facts, each taken
from the config (never from one model's constants):

- Llama / Mistral / Qwen2: pre-norm blocks (input norm -> attention -> add; post_attention norm -> SiLU MLP -> add),
  RMSNorm weight used as is, one RoPE for every layer, attention scale head_dim^-0.5.
- Gemma 3 (`gemma3_text`): "sandwich" norms (a norm on each sublayer's output before the residual add, and the MLP's
  input norm named `pre_feedforward_layernorm`), RMSNorm scaling by (1 + weight), RMSNorm of each query/key head
  before rotary, gelu-tanh MLP, embeddings times sqrt(hidden_size), attention scale query_pre_attn_scalar^-0.5,
  `layer_types` choosing sliding-window or full attention per layer, with a RoPE base per layer type
  (`rope_local_base_freq` for sliding layers), optional final logit soft-capping, and a BOS that the tokenizer
  must add.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .errors import BuildError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Architecture:
    """Per-model facts of the decoder graph (derived from the config by `architecture_of`)."""

    model_type: str
    activation: str  # one of ACTIVATIONS
    norm_weight_offset: float  # RMSNorm multiplies by (offset + weight): 0 for Llama, 1 for Gemma
    sandwich_norms: bool  # each sublayer's output is normed before the residual add (Gemma 2/3)
    qk_norm: bool  # RMSNorm over head_dim of each query and key head, before rotary
    embedding_scale: float | None  # embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    attention_scale: float
    final_logit_softcap: float | None
    # Per layer: the HF sliding window (a query sees itself and window - 1 earlier tokens) or None for full attention.
    windows: tuple[int | None, ...]
    # Per layer: whether it uses the RoPE of sliding layers (Gemma 3: `rope_local_base_freq`), whatever its window.
    local_rope: tuple[bool, ...]

    @property
    def mlp_norm(self) -> str:
        """The HF name of the norm whose output feeds the MLP."""
        return "pre_feedforward_layernorm" if self.sandwich_norms else "post_attention_layernorm"

    @property
    def has_local_rope(self) -> bool:
        return any(self.local_rope)


def architecture_of(config) -> Architecture:
    """The facts of `config`, or BuildError naming the feature this graph cannot represent faithfully."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BuildError(f"model_type {model_type!r} is not supported by the ONNX graph builder; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    gemma = model_type == "gemma3_text"
    activation = (getattr(config, "hidden_activation", None) if gemma else None) or getattr(config, "hidden_act",
                                                                                            "silu")
    if activation not in ACTIVATIONS:
        raise BuildError(f"hidden activation {activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    if getattr(config, "mlp_bias", False):
        raise BuildError("mlp_bias=True is not supported by the ONNX graph builder")
    if getattr(config, "use_bidirectional_attention", False):
        raise BuildError("use_bidirectional_attention=True is not supported: the engine decodes causally")
    if getattr(config, "attn_logit_softcapping", None):
        # transformers' Gemma 3 attention never applies it (the reference the parity gate compares with), so
        # either reading of such a model would be a guess.
        raise BuildError(f"attn_logit_softcapping = {config.attn_logit_softcapping} is not supported; allowed: "
                         f"none (transformers' {model_type} ignores it)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if gemma:
        scale = float(config.query_pre_attn_scalar) ** -0.5
    else:
        scale = float(getattr(config, "attention_multiplier", None) or head_dim ** -0.5)
    return Architecture(
        model_type=model_type, activation=activation, norm_weight_offset=1.0 if gemma else 0.0,
        sandwich_norms=gemma, qk_norm=gemma,
        embedding_scale=float(config.hidden_size) ** 0.5 if gemma else None, attention_scale=scale,
        final_logit_softcap=_softcap(config, "final_logit_softcapping"), windows=_windows(config),
        local_rope=tuple(gemma and kind == SLIDING for kind in _layer_types(config)))


def _softcap(config, name: str) -> float | None:
    value = getattr(config, name, None)
    return float(value) if value else None


def _layer_types(config) -> list[str]:
    """SLIDING or FULL per layer: `layer_types` where the config has it, else (Mistral style) one window for every
    layer unless `use_sliding_window` turns it off."""
    layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
        return [SLIDING if windowed else FULL] * layers
    unknown = sorted(set(layer_types) - {SLIDING, FULL})
    if unknown:
        raise BuildError(f"layer type(s) {', '.join(unknown)} are not supported; supported: {SLIDING}, {FULL}")
    return list(layer_types[:layers])


def _windows(config) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    windows = [window if kind == SLIDING else None for kind in _layer_types(config)]
    if any(w is not None and w < 1 for w in windows):
        raise BuildError(f"sliding_window = {window!r} is not supported; allowed: a positive number of tokens")
    # A window no shorter than the longest position never masks anything: that is full attention.
    return tuple(None if w is None or w >= config.max_position_embeddings else int(w) for w in windows)


def local_rope_config(config):
    """A copy of `config` describing the RoPE of Gemma 3's sliding layers (as transformers builds it: the local
    base frequency, no scaling)."""
    local = copy.deepcopy(config)
    local.rope_theta = config.rope_local_base_freq
    local.rope_scaling = {"rope_type": "default"}
    return local
