"""Typed values for each model's `config.pbtxt.template`, and the parameter encoding shared by the renderer, the linter
and the Triton adapters.

Triton model parameters are strings. Engine and cache parameters are keyed by the field names of
`EngineSettings` / `CacheSettings`, so an adapter reads them back with
``settings_from_parameters(EngineSettings, read_parameters(json.loads(args["model_config"])))`` and gets the same
checked values the renderer wrote.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import text_encoding

from .settings import CacheSettings, EngineSettings, RepositorySettings, SettingsError

# Model folders of the rendered repository.
ENSEMBLE = "ensemble"
PREPROCESSING = "preprocessing"
ENGINE = "engine"
TENSORRT_LLM = "tensorrt_llm"
POSTPROCESSING = "postprocessing"
LLM = "llm"

VERSION = "1"  # the one version folder rendered per model; parameter paths are relative to it
TOKENIZER_FOLDER = "tokenizer"
ONNX_FOLDER = "onnx"
ONNX_FILE = "model.onnx"
EMBEDDER_FOLDER = "embedder"

# EngineSettings fields the ONNX Runtime engine reads from its parameters.
ENGINE_PARAMETERS: tuple[str, ...] = (
    "precision", "max_batch_size", "max_queue_size", "kv_cache_max_tokens", "max_context_length",
    "prefill_chunk_tokens", "prefill_group_ratio", "intra_op_threads", "prefix_cache_max_tokens",
    "prefix_block_tokens")
CACHE_PARAMETERS: tuple[str, ...] = tuple(f.name for f in fields(CacheSettings))
# Parameter of the front model naming the model it sends cache misses to.
CALLED_MODEL_PARAMETER = "ensemble_model_name"
# Path parameters (relative to the version folder) -> a file the path must hold ("" : the path itself is the file or
# folder that must exist).
PATH_PARAMETERS: dict[str, str] = {"tokenizer_path": "tokenizer.json", "onnx_path": "", "embedder_path": ""}

SettingsT = TypeVar("SettingsT", EngineSettings, CacheSettings)


def pbtxt_string(text: str) -> str:
    """`text` escaped for the inside of a double-quoted protobuf text-format string.

    `$` is written as an octal escape so that a user's value can never look like a template placeholder.
    """
    return text_encoding.CEscape(text, as_utf8=True).replace("$", "\\044")


def encode_parameter(value: object) -> str:
    """The string a typed setting is stored as in a model config `parameters` entry."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str, Path)):
        return str(value)
    raise TypeError(f"cannot encode a {type(value).__name__} as a model parameter; "
                    "allowed: bool, int, float, str, Path")


def read_parameters(config: Any) -> dict[str, str]:
    """Parameters of a model config as plain strings.

    `config` is a `model_config_pb2.ModelConfig` or the JSON dict the Python backend hands to `initialize`
    (``json.loads(args["model_config"])``).
    """
    if isinstance(config, Mapping):
        return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
    return {key: value.string_value for key, value in config.parameters.items()}


@functools.cache
def _field_types(settings_type: type) -> dict[str, Any]:
    return typing.get_type_hints(settings_type)


def decode_setting(settings_type: type, name: str, text: str) -> object:
    """One parameter string decoded to the type of `settings_type.<name>`; bad text raises SettingsError."""
    field_type = _field_types(settings_type)[name]
    if field_type is bool:
        if text not in ("true", "false"):
            raise SettingsError(f"{name} = {text!r} is not allowed; allowed: true or false")
        return text == "true"
    if field_type in (int, float):
        try:
            return field_type(text)
        except ValueError:
            kind = "an integer" if field_type is int else "a number"
            raise SettingsError(f"{name} = {text!r} is not allowed; allowed: {kind}") from None
    return text  # str and Literal[...] of str; validate() checks Literal membership


def settings_from_parameters(settings_type: type[SettingsT], parameters: Mapping[str, str],
                             **fixed: object) -> SettingsT:
    """`EngineSettings` / `CacheSettings` from model parameters (missing keys keep their defaults), validated.

    `fixed` sets fields that are not parameters (e.g. ``kind="onnxruntime"``).
    """
    names = {f.name for f in fields(settings_type)}
    values = {key: decode_setting(settings_type, key, text) for key, text in parameters.items() if key in names}
    settings = settings_type(**{**values, **fixed})
    settings.validate()
    return settings


def _count(value: object, name: str) -> str:
    """An integer written bare into the config (not inside a string)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{name} = {value!r} is not allowed; allowed: an integer")
    return str(value)


def _string_parameters(**values: object) -> dict[str, str]:
    return {key: pbtxt_string(encode_parameter(value)) for key, value in values.items()}


def template_values(model: str, settings: RepositorySettings) -> dict[str, str]:
    """Placeholder values for `model_repository/<model>/config.pbtxt.template`, every one escaped or typed."""
    request_batch = _count(settings.max_request_batch_size, "max_request_batch_size")
    engine = settings.engine
    if model in (PREPROCESSING, POSTPROCESSING):
        instances = settings.preprocessing_instances if model == PREPROCESSING else settings.postprocessing_instances
        return {"triton_max_batch_size": request_batch,
                "instance_count": _count(instances, f"{model}_instances"),
                **_string_parameters(tokenizer_path=TOKENIZER_FOLDER,
                                     max_context_length=engine.max_context_length)}
    if model == ENGINE:
        return {"triton_max_batch_size": request_batch,
                **_string_parameters(onnx_path=f"{ONNX_FOLDER}/{ONNX_FILE}",
                                     **{key: getattr(engine, key) for key in ENGINE_PARAMETERS})}
    if model == TENSORRT_LLM:
        return {"triton_max_batch_size": request_batch,
                "max_queue_delay_microseconds": _count(engine.max_queue_delay_microseconds,
                                                       "engine.max_queue_delay_microseconds"),
                "max_queue_size": _count(engine.max_queue_size, "engine.max_queue_size"),
                **_string_parameters(gpt_model_path=settings.trtllm_engine_dir,
                                     max_tokens_in_paged_kv_cache=engine.kv_cache_max_tokens,
                                     kv_cache_free_gpu_mem_fraction=engine.kv_cache_free_gpu_mem_fraction,
                                     enable_kv_cache_reuse=engine.enable_kv_cache_reuse)}
    if model == ENSEMBLE:
        return {"triton_max_batch_size": request_batch,
                **_string_parameters(engine_model_name=engine_model_name(settings))}
    if model == LLM:
        return {"triton_max_batch_size": request_batch,
                **_string_parameters(**{key: getattr(settings.cache, key) for key in CACHE_PARAMETERS},
                                     embedder_path=EMBEDDER_FOLDER,
                                     **{CALLED_MODEL_PARAMETER: ENSEMBLE})}
    raise ValueError(f"unknown model {model!r}; allowed: {ENSEMBLE}, {PREPROCESSING}, {ENGINE}, {TENSORRT_LLM}, "
                     f"{POSTPROCESSING}, {LLM}")


def engine_model_name(settings: RepositorySettings) -> str:
    """The engine step of the ensemble: the ONNX Runtime Python model or the TensorRT-LLM backend model."""
    return TENSORRT_LLM if settings.engine.kind == "tensorrt_llm" else ENGINE
