"""Model Optimizer's TensorRT-LLM checkpoint export for every decoder type the gate rebuilds (Llama, Gemma 3).

Model Optimizer 0.47 writes the weights of a Gemma 3 checkpoint itself (q/k/v and gate/up fused, every RMSNorm weight
exported as 1 + w, q_norm/k_norm as attention.q_layernorm/k_layernorm, the sandwich norms as post_layernorm,
pre_feedforward_layernorm and post_feedforward_layernorm, the embedding shared with lm_head and unscaled), but its
config.json only through TensorRT-LLM's own `GemmaConfig.from_hugging_face`: without the tensorrt_llm package its
fallback raises NotImplementedError for gemma3. Where tensorrt_llm is absent (anywhere outside NVIDIA's container),
the config is Model Optimizer's fallback for the Gemma layout plus the fields TensorRT-LLM's GemmaConfig adds for
Gemma 3 (`gemma3_config_fields`). Where it is installed, Model Optimizer's own path runs untouched; either way
fp8.config_mismatches checks the result against the source model.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import torch

from .architecture import architecture_of
from .errors import BuildError
from .fp8_verify import is_sliding_layer

# Hugging Face model_type -> Model Optimizer's TensorRT-LLM decoder type. Only layouts the gate can rebuild.
DECODER_TYPES = {"llama": "llama", "gemma3_text": "gemma3"}


def sliding_window_pattern(config) -> int:
    """TensorRT-LLM's `_sliding_window_pattern` for a Gemma 3 config: the period p such that layer i uses full
    attention exactly when (i + 1) % p == 0. Read from the config's layer types (what transformers runs), not from
    its own `_sliding_window_pattern` (a legacy field transformers only uses to default layer_types); refused when
    no period describes them."""
    sliding = architecture_of(config).local_rope
    full = [index for index, local in enumerate(sliding) if not local]
    pattern = full[0] + 1 if full else len(sliding) + 1
    if any(is_sliding_layer(index, pattern) != local for index, local in enumerate(sliding)):
        raise BuildError(f"layer_types {list(config.layer_types)} are not supported by TensorRT-LLM's Gemma 3: it puts "
                         f"full attention on every _sliding_window_pattern-th layer only (allowed: every p-th layer "
                         f"full, the others sliding)")
    return pattern


def gemma3_config_fields(config) -> dict:
    """The config.json fields TensorRT-LLM's GemmaConfig adds for a Gemma 3 checkpoint (its Gemma3ConfigGroup, the
    Gemma fields, inter_layernorms for the sandwich norms), from the Hugging Face config."""
    return {
        "decoder": "gemma3",
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "final_logit_softcapping": config.final_logit_softcapping,
        "_sliding_window_pattern": sliding_window_pattern(config),
        "rope_local_base_freq": config.rope_local_base_freq,
        "sliding_window": config.sliding_window,
        "rotary_base": config.rope_theta,
        "rotary_scaling": config.rope_scaling,
        "attn_bias": bool(getattr(config, "attention_bias", False)),
        "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        "inter_layernorms": True,
    }


def check_exportable(config) -> None:
    """Refuse, before any calibration, a source model whose TensorRT-LLM checkpoint cannot be exported and rebuilt
    here, naming what is not supported."""
    if config.model_type not in DECODER_TYPES:
        raise BuildError(f"model_type {config.model_type!r} has no TensorRT-LLM path here; allowed: "
                         f"{', '.join(DECODER_TYPES)}")
    if not config.architectures:
        raise BuildError("config.json has no 'architectures'; the TensorRT-LLM export needs it")
    architecture_of(config)  # features the graph facts cannot represent (attention soft-capping, ...)
    if getattr(config, "rope_scaling", None):  # exported as rotary_scaling, which fp8_verify does not rebuild
        raise BuildError(f"rope_scaling = {config.rope_scaling!r} is not supported on the TensorRT-LLM path: its "
                         f"gate rebuilds unscaled RoPE only (allowed: none)")
    if DECODER_TYPES[config.model_type] == "gemma3":
        sliding_window_pattern(config)


def export_trtllm_checkpoint(model: torch.nn.Module, checkpoint_dir: Path) -> None:
    """Write the TensorRT-LLM checkpoint (config.json + rank0.safetensors, bf16, one rank) of a (quantized) model."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    check_exportable(model.config)
    decoder_type = DECODER_TYPES[model.config.model_type]
    fallback = (_gemma3_config_without_tensorrt_llm(model.config)
                if decoder_type == "gemma3" and importlib.util.find_spec("tensorrt_llm") is None
                else contextlib.nullcontext())
    with fallback:
        export_tensorrt_llm_checkpoint(model, decoder_type, torch.bfloat16, checkpoint_dir,
                                       inference_tensor_parallel=1)


@contextlib.contextmanager
def _gemma3_config_without_tensorrt_llm(source_config) -> Iterator[None]:
    """For the duration, Model Optimizer's config conversion runs its fallback as for Gemma (whose fields it knows)
    and adds the Gemma 3 fields, instead of raising NotImplementedError for gemma3."""
    from modelopt.torch.export import model_config_export

    convert = model_config_export.convert_to_tensorrt_llm_config

    def convert_gemma3(model_config, quant_config, hf_config=None):
        first = model_config.layers[0]  # the fallback reads the decoder type of the first layer only
        first.decoder_type = "gemma"
        try:
            config = convert(model_config, quant_config, hf_config=None)  # None: no TensorRT-LLM import attempt
        finally:
            first.decoder_type = "gemma3"
        return {**config, **gemma3_config_fields(source_config)}

    model_config_export.convert_to_tensorrt_llm_config = convert_gemma3
    try:
        yield
    finally:
        model_config_export.convert_to_tensorrt_llm_config = convert
