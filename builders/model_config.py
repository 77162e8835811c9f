"""Typed values for each model's `config.pbtxt.template` (build side: it escapes with protobuf's text encoding).

Engine and cache parameters are keyed by the field names of `EngineSettings` / `CacheSettings`; their encoding and
decoding live in `tritonllm.contract`, which the Triton adapters read them back with. The `input`/`output` blocks of
the ensemble and front model are rendered from the contract's tensors.
"""

from __future__ import annotations

from google.protobuf import text_encoding

from tritonllm.contract import (CACHE_PARAMETERS, CALLED_MODEL_PARAMETER, DEFAULT_ENSEMBLE_GRPC_URL, DRAFT_ONNX_PARAMETER,
                                ENGINE_MODEL_PARAMETER, ENGINE_PARAMETERS, ENSEMBLE_INPUTS,
                                ENSEMBLE_URL_PARAMETER,
                                ENSEMBLE_OUTPUTS, FORWARDED_INPUTS_PARAMETER, FRONT_INPUTS,
                                ONNX_ENGINE_ONLY_INPUTS, FRONT_OUTPUTS, SERVED_NAME_PARAMETER, RepositorySettings,
                                SettingsError,
                                encode_parameter, render_tensors)

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
DRAFT_ONNX_FOLDER = "draft_onnx"  # the draft model's graph (speculative drafter draft_model)
EMBEDDER_FOLDER = "embedder"


def pbtxt_string(text: str) -> str:
    """`text` escaped for the inside of a double-quoted protobuf text-format string.

    `$` is written as an octal escape so that a user's value can never look like a template placeholder.
    """
    return text_encoding.CEscape(text, as_utf8=True).replace("$", "\\044")


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
                                     max_context_length=engine.max_context_length),
                **(_string_parameters(**{SERVED_NAME_PARAMETER: settings.served_model_name})
                   if model == PREPROCESSING else {})}
    if model == ENGINE:
        return {"triton_max_batch_size": request_batch,
                **_string_parameters(onnx_path=f"{ONNX_FOLDER}/{ONNX_FILE}", tokenizer_path=TOKENIZER_FOLDER,
                                     **{DRAFT_ONNX_PARAMETER: f"{DRAFT_ONNX_FOLDER}/{ONNX_FILE}"
                                        if settings.draft_onnx_dir else ""},
                                     **{key: getattr(engine, key) for key in ENGINE_PARAMETERS})}
    if model == TENSORRT_LLM:
        return {"triton_max_batch_size": request_batch,
                "max_queue_delay_microseconds": _count(engine.max_queue_delay_microseconds,
                                                       "engine.max_queue_delay_microseconds"),
                "max_queue_size": _count(engine.max_queue_size, "engine.max_queue_size"),
                **_string_parameters(gpt_model_path=settings.trtllm_engine_dir,
                                     # one window for every layer unless the model has sliding-window layers
                                     max_attention_window_size=",".join(map(str, settings.trtllm_attention_windows))
                                     or engine.max_context_length,
                                     max_tokens_in_paged_kv_cache=engine.kv_cache_max_tokens,
                                     kv_cache_free_gpu_mem_fraction=engine.kv_cache_free_gpu_mem_fraction,
                                     enable_kv_cache_reuse=engine.enable_kv_cache_reuse)}
    if model == ENSEMBLE:
        # Every input declared optional: see the ensemble template for why.
        return {"triton_max_batch_size": request_batch,
                "inputs": render_tensors(ensemble_inputs(settings), all_optional=True),
                "outputs": render_tensors(ENSEMBLE_OUTPUTS),
                **_string_parameters(engine_model_name=engine_model_name(settings))}
    if model == LLM:
        return {"triton_max_batch_size": request_batch,
                "inputs": render_tensors(FRONT_INPUTS), "outputs": render_tensors(FRONT_OUTPUTS),
                **_string_parameters(**{key: getattr(settings.cache, key) for key in CACHE_PARAMETERS},
                                     embedder_path=EMBEDDER_FOLDER,
                                     **{CALLED_MODEL_PARAMETER: ENSEMBLE,
                                        ENSEMBLE_URL_PARAMETER: DEFAULT_ENSEMBLE_GRPC_URL,
                                        ENGINE_MODEL_PARAMETER: engine_model_name(settings),
                                        FORWARDED_INPUTS_PARAMETER: ",".join(
                                            tensor.name for tensor in ensemble_inputs(settings))})}
    raise ValueError(f"unknown model {model!r}; allowed: {ENSEMBLE}, {PREPROCESSING}, {ENGINE}, {TENSORRT_LLM}, "
                     f"{POSTPROCESSING}, {LLM}")


def ensemble_inputs(settings: RepositorySettings) -> tuple:
    """The contract's ensemble inputs this deployment offers: TensorRT-LLM takes no tenant (its KV reuse is not
    scoped by tenant), so with that engine the ensemble does not offer one."""
    if settings.engine.kind == "tensorrt_llm":
        return tuple(tensor for tensor in ENSEMBLE_INPUTS if tensor.name not in ONNX_ENGINE_ONLY_INPUTS)
    return ENSEMBLE_INPUTS


def engine_model_name(settings: RepositorySettings) -> str:
    """The engine step of the ensemble: the ONNX Runtime Python model or the TensorRT-LLM backend model."""
    return TENSORRT_LLM if settings.engine.kind == "tensorrt_llm" else ENGINE
