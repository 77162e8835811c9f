"""The one place that says what the deployment's models exchange and how they are configured.

A leaf module (standard library only: no numpy, no protobuf, no Triton), so the Triton Python stubs, the renderer,
the linter, the client and the docs all read the same facts:

- the request contract of the ensemble and of the front model `llm` (tensor name, Triton data type, dims, optional);
  the config templates render their `input`/`output` blocks from it, the front model and the client derive their
  tensor types from it, and `docs/architecture.md` holds the table `contract_table()` writes;
- the typed settings every number of a generated `config.pbtxt` starts from (`EngineSettings`, `CacheSettings`,
  `RepositorySettings`), checked once by ``validate``;
- the encoding of those settings as Triton model parameters (strings), shared by the renderer, the linter and the
  Triton adapters: ``settings_from_parameters(EngineSettings, read_parameters(json.loads(args["model_config"])))``
  gives back the same checked values the renderer wrote.
"""

from __future__ import annotations

import functools
import math
import numbers
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

# --- tensors ---------------------------------------------------------------------------------------------------------

# Triton config data type -> (wire data type of the client libraries, numpy dtype name).
DATA_TYPES: dict[str, tuple[str, str]] = {
    "TYPE_STRING": ("BYTES", "object"), "TYPE_BOOL": ("BOOL", "bool"), "TYPE_INT32": ("INT32", "int32"),
    "TYPE_UINT64": ("UINT64", "uint64"), "TYPE_FP32": ("FP32", "float32"),
}


@dataclass(frozen=True)
class Tensor:
    """One input or output of a model; `dims` exclude the batch dimension; `note` is rendered as a comment."""

    name: str
    data_type: str  # Triton config type, a key of DATA_TYPES
    dims: tuple[int, ...]
    optional: bool = False
    note: str = ""

    @property
    def wire_type(self) -> str:
        """Data type as the client libraries name it (BYTES, INT32, ...)."""
        return DATA_TYPES[self.data_type][0]

    @property
    def numpy_dtype(self) -> str:
        """numpy dtype name (``np.dtype(tensor.numpy_dtype)``); BYTES tensors are object arrays."""
        return DATA_TYPES[self.data_type][1]


# The ensemble keeps the I/O contract of NVIDIA's tensorrtllm_backend ensemble, so genai-perf, perf_analyzer and
# existing clients work unchanged. `optional` is what a client may leave out.
ENSEMBLE_INPUTS: tuple[Tensor, ...] = (
    Tensor("text_input", "TYPE_STRING", (1,), note="prompt text"),
    Tensor("max_tokens", "TYPE_INT32", (1,), note="new tokens at most"),
    Tensor("stream", "TYPE_BOOL", (1,), True, "stream pieces as they come (default false)"),
    Tensor("exclude_input_in_output", "TYPE_BOOL", (1,), True, "leave the prompt out of a non-streamed answer"),
    Tensor("temperature", "TYPE_FP32", (1,), True, "0 or absent: greedy"),
    Tensor("top_p", "TYPE_FP32", (1,), True, "nucleus sampling"),
    Tensor("top_k", "TYPE_INT32", (1,), True, "top-k sampling"),
    Tensor("end_id", "TYPE_INT32", (1,), True, "end token; default: the model's eos"),
    Tensor("pad_id", "TYPE_INT32", (1,), True,
           "padding token of TensorRT-LLM's contract; the ONNX engine masks padding, so it never changes the text"),
    Tensor("min_tokens", "TYPE_INT32", (1,), True, "end_id is banned until this many new tokens"),
    Tensor("stop_words", "TYPE_STRING", (-1,), True, "generation stops when one of these is generated"),
    Tensor("bad_words", "TYPE_STRING", (-1,), True, "sequences never generated"),
    Tensor("seed", "TYPE_UINT64", (1,), True, "sampling seed (same seed, same answer)"),
    Tensor("apply_chat_template", "TYPE_BOOL", (1,), True,
           "ours: wrap the prompt in the model's chat template as one user turn"),
    Tensor("tenant", "TYPE_STRING", (1,), True,
           "ours: whose cached prompt prefixes (engine) and cache entries (llm) a request may use; default ''"),
    # Structured output (names as in vLLM); at most one per request; ONNX Runtime engine only.
    Tensor("guided_json", "TYPE_STRING", (1,), True, "the answer is JSON valid under this JSON schema"),
    Tensor("guided_regex", "TYPE_STRING", (1,), True, "the answer matches this regular expression"),
    Tensor("guided_grammar", "TYPE_STRING", (1,), True, "the answer follows this Lark or GBNF grammar"),
    Tensor("guided_choice", "TYPE_STRING", (1,), True, "the answer is one of these strings (a JSON list)"),
    Tensor("speculative", "TYPE_STRING", (1,), True,
           "ours: off, prompt_lookup or draft_model (a build with a draft); default: the build's drafter"),
)
# The structured-output inputs above.
GUIDED_INPUTS: tuple[str, ...] = tuple(tensor.name for tensor in ENSEMBLE_INPUTS if tensor.name.startswith("guided_"))
ENSEMBLE_OUTPUTS: tuple[Tensor, ...] = (Tensor("text_output", "TYPE_STRING", (-1,), note="answer text (a piece)"),)
# The front model `llm`: the ensemble's contract plus these.
FRONT_ONLY_INPUTS: tuple[Tensor, ...] = (
    Tensor("cache", "TYPE_STRING", (1,), True, "front model only: use, bypass or refresh (default use)"),
)
FRONT_INPUTS: tuple[Tensor, ...] = ENSEMBLE_INPUTS + FRONT_ONLY_INPUTS
FRONT_OUTPUTS: tuple[Tensor, ...] = ENSEMBLE_OUTPUTS + (
    Tensor("cache_hit", "TYPE_BOOL", (1,), note="whether this answer came from the cache"),
    Tensor("cache_similarity", "TYPE_FP32", (1,),
           note="cosine similarity of the cached entry served (1 for an exact repeat or the same normal form), or of "
                "the closest on a miss"),
)
CACHE_MODES: tuple[str, ...] = ("use", "bypass", "refresh")


# --- allowed values of request inputs ---------------------------------------------------------------------------------

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
FP32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class InputRange:
    """The values a numeric request input allows, checked on the value the model receives (after Triton's
    conversion). `allowed` says it in a message; `{vocabulary}` and `{last_id}` in it are filled in with the model's
    vocabulary when the checker knows it (`vocab_high` then lowers `high` to vocabulary size + vocab_high)."""

    low: float
    high: float
    allowed: str
    low_exclusive: bool = False
    vocab_high: int | None = None

    def allows(self, value: float, vocab_size: int | None = None) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        high = self.high if vocab_size is None or self.vocab_high is None else vocab_size + self.vocab_high
        return (value > self.low if self.low_exclusive else value >= self.low) and value <= high

    def describe(self, vocab_size: int | None = None) -> str:
        return self.allowed.format(
            vocabulary="the vocabulary size" if vocab_size is None else f"vocabulary size {vocab_size}",
            last_id="vocabulary size - 1" if vocab_size is None else vocab_size - 1)


# Every numeric input of the ensemble and `llm` contracts. The model-dependent bounds (the vocabulary; max_tokens at
# most the context left after the prompt) are checked where the model is known: preprocessing and the engine.
#
# What no check in a model can see: Triton 2.51's HTTP front converts a JSON integer to INT32 by dropping the high
# bits, so top_k = 2**32 + 1 arrives as 1 and max_tokens = 2**32 + 4 as 4, both allowed values. Values that arrive
# out of range (2**31 arrives as -2**31) are refused; the wrapped-in-range residue is stopped only in front of
# Triton: the OpenAI gateway and the Python client range-check before sending, and Triton's own ports stay private.
INPUT_RANGES: dict[str, InputRange] = {
    "max_tokens": InputRange(1, INT32_MAX, "1..2147483647 (and at most the context left after the prompt)"),
    "min_tokens": InputRange(0, INT32_MAX, ">= 0 (at most 2147483647)"),
    "temperature": InputRange(0.0, FP32_MAX, "a finite value >= 0 (0 = greedy)"),
    "top_p": InputRange(0.0, 1.0, "0 < top_p <= 1", low_exclusive=True),
    "top_k": InputRange(0, INT32_MAX, "0 (off) .. {vocabulary}", vocab_high=0),
    "seed": InputRange(0, UINT64_MAX, "0 .. 2**64-1"),
    "end_id": InputRange(0, INT32_MAX, "a token id in 0..{last_id}", vocab_high=-1),
    "pad_id": InputRange(0, INT32_MAX, "a token id in 0..{last_id}", vocab_high=-1),
}
EMPTY_PROMPT = "input text_input must not be empty; send a non-empty UTF-8 prompt"


def input_problem(name: str, value: object, vocab_size: int | None = None) -> str | None:
    """Why `value` is not allowed for the numeric input `name` (None: it is allowed, or `name` has no range)."""
    allowed = INPUT_RANGES.get(name)
    if allowed is None or value is None or allowed.allows(value, vocab_size):
        return None
    return f"{name} = {value!r} is not allowed; allowed: {allowed.describe(vocab_size)}"


def tensors_by_name(tensors: tuple[Tensor, ...]) -> dict[str, Tensor]:
    return {tensor.name: tensor for tensor in tensors}


def render_tensors(tensors: tuple[Tensor, ...], all_optional: bool = False) -> str:
    """The entries of a config.pbtxt `input [...]` / `output [...]` block, one tensor a line, notes as comments.

    `all_optional` declares every tensor optional (the ensemble does: see its template for why).
    """
    lines = []
    for position, tensor in enumerate(tensors):
        if tensor.note:
            lines.append(f"  # {tensor.name}: {tensor.note}")
        dims = ", ".join(str(dim) for dim in tensor.dims)
        optional = " optional: true" if tensor.optional or all_optional else ""
        comma = "," if position < len(tensors) - 1 else ""
        lines.append(f'  {{ name: "{tensor.name}" data_type: {tensor.data_type} dims: [ {dims} ]{optional} }}{comma}')
    return "\n".join(lines)


def contract_table() -> str:
    """The Markdown table of the request contract that docs/architecture.md holds (a test keeps them equal)."""
    rows = ["| tensor | in/out | data type | dims | optional | models | meaning |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for direction, tensors, models in (("in", ENSEMBLE_INPUTS, "ensemble, llm"), ("in", FRONT_ONLY_INPUTS, "llm"),
                                       ("out", ENSEMBLE_OUTPUTS, "ensemble, llm"),
                                       ("out", FRONT_OUTPUTS[len(ENSEMBLE_OUTPUTS):], "llm")):
        for tensor in tensors:
            dims = "[" + ", ".join(str(dim) for dim in tensor.dims) + "]"
            rows.append(f"| `{tensor.name}` | {direction} | {tensor.wire_type} | {dims} | "
                        f"{'yes' if tensor.optional else 'no'} | {models} | {tensor.note} |")
    return "\n".join(rows)


# --- settings --------------------------------------------------------------------------------------------------------

Precision = Literal["fp32", "int8", "int4"]
EngineKind = Literal["onnxruntime", "tensorrt_llm"]

# Weight precisions of the ONNX Runtime engine (bf16 is not offered: ONNX Runtime's CPU provider has no bf16 kernels).
PRECISIONS: tuple[str, ...] = ("fp32", "int8", "int4")
# Drafters of the ONNX Runtime engine's speculative decoding ("off": none; python_backends/speculative.py):
# prompt_lookup needs no model, draft_model is a second decoder graph sharing the target's tokenizer (built with
# `tritonllm build --draft int8|int4` or `--draft-model DIR`). A request's `speculative` input names one of them.
SPECULATIVE_DRAFTERS: tuple[str, ...] = ("off", "prompt_lookup", "draft_model")


class SettingsError(ValueError):
    """A setting is out of its allowed range; the message names the setting and what is allowed."""


@dataclass(frozen=True)
class EngineSettings:
    """The in-flight batching engine (ONNX Runtime Python model, or TensorRT-LLM in NGC containers)."""

    kind: EngineKind = "onnxruntime"
    precision: Precision = "fp32"
    max_batch_size: int = 16  # sequences decoded together in one step
    max_queue_size: int = 128  # requests waiting for admission; beyond it: UNAVAILABLE
    kv_cache_max_tokens: int = 32768  # KV budget summed over running sequences (prompt + generated)
    max_context_length: int = 2048  # prompt + generated tokens of one sequence
    prefill_chunk_tokens: int = 256  # long prompts are prefilled in chunks so running streams keep flowing
    prefill_group_ratio: float = 1.2  # prompts batched in one prefill differ in length by at most this factor
    intra_op_threads: int = 0  # ONNX Runtime threads; 0 = one per core
    prefix_cache_max_tokens: int = 4096  # KV of prompt prefixes kept for reuse (per engine); 0 = off
    prefix_block_tokens: int = 16  # prompt tokens per reusable block
    # Speculative decoding (greedy, unguided requests): a drafter proposes tokens, one target pass verifies them.
    # The drafter of requests that do not name one: off, prompt_lookup (n-gram continuation from the prompt and
    # output) or draft_model (needs the repository's draft graph, RepositorySettings.draft_onnx_dir).
    speculative_drafter: str = "off"
    speculative_max_draft_tokens: int = 8  # drafted tokens per sequence and step, at most
    # Speculate only while the decode batch has at most this many rows: ONNX Runtime's CPU GroupQueryAttention
    # verifies one row per run, so a verifying step reads the weights once per row where a decode step reads them
    # once for the whole batch (benchmarks/speculative.py measures where that stops paying).
    speculative_max_batch_size: int = 1
    prompt_lookup_max_ngram: int = 3  # the longest suffix looked up first
    prompt_lookup_min_ngram: int = 1
    # TensorRT-LLM only (rendered into the tensorrt_llm model).
    kv_cache_free_gpu_mem_fraction: float = 0.9
    enable_kv_cache_reuse: bool = True
    max_queue_delay_microseconds: int = 0

    def validate(self) -> None:
        _check(self.kind in ("onnxruntime", "tensorrt_llm"), "engine.kind", self.kind, "onnxruntime or tensorrt_llm")
        _check(self.precision in PRECISIONS, "engine.precision", self.precision, " / ".join(PRECISIONS))
        _check(1 <= self.max_batch_size <= 256, "engine.max_batch_size", self.max_batch_size, "1..256")
        _check(1 <= self.max_queue_size <= 100_000, "engine.max_queue_size", self.max_queue_size, "1..100000")
        _check(16 <= self.max_context_length <= 1_048_576, "engine.max_context_length", self.max_context_length,
               "16..1048576")
        _check(self.kv_cache_max_tokens >= self.max_context_length, "engine.kv_cache_max_tokens",
               self.kv_cache_max_tokens, f">= max_context_length ({self.max_context_length}) so one full sequence fits")
        _check(1 <= self.prefill_chunk_tokens <= self.max_context_length, "engine.prefill_chunk_tokens",
               self.prefill_chunk_tokens, f"1..max_context_length ({self.max_context_length})")
        _check(1.0 <= self.prefill_group_ratio <= 4.0, "engine.prefill_group_ratio", self.prefill_group_ratio,
               "1.0..4.0")
        _check(0 <= self.prefix_cache_max_tokens <= 1_048_576, "engine.prefix_cache_max_tokens",
               self.prefix_cache_max_tokens, "0 (off) .. 1048576")
        _check(1 <= self.prefix_block_tokens <= 1024, "engine.prefix_block_tokens", self.prefix_block_tokens,
               "1..1024")
        _check(self.speculative_drafter in SPECULATIVE_DRAFTERS, "engine.speculative_drafter",
               self.speculative_drafter, " / ".join(SPECULATIVE_DRAFTERS))
        _check(1 <= self.speculative_max_draft_tokens <= 64, "engine.speculative_max_draft_tokens",
               self.speculative_max_draft_tokens, "1..64")
        _check(1 <= self.speculative_max_batch_size <= 256, "engine.speculative_max_batch_size",
               self.speculative_max_batch_size, "1..256")
        _check(1 <= self.prompt_lookup_min_ngram <= self.prompt_lookup_max_ngram <= 16,
               "engine.prompt_lookup_min_ngram / prompt_lookup_max_ngram",
               (self.prompt_lookup_min_ngram, self.prompt_lookup_max_ngram), "1 <= min <= max <= 16")
        _check(0 <= self.intra_op_threads <= 1024, "engine.intra_op_threads", self.intra_op_threads,
               "0 (one per core) .. 1024")
        _check(0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0, "engine.kv_cache_free_gpu_mem_fraction",
               self.kv_cache_free_gpu_mem_fraction, "(0, 1]")
        _check(self.max_queue_delay_microseconds >= 0, "engine.max_queue_delay_microseconds",
               self.max_queue_delay_microseconds, ">= 0")


@dataclass(frozen=True)
class CacheSettings:
    """Semantic cache in the front model."""

    enabled: bool = True
    # Cosine floor of the candidates the verifier sees. 0 (default): derived when the repository is rendered, as the
    # lowest floor whose false-hit rate stays <= `max_false_hit_rate` on the calibration pairs
    # (builders/cache_calibration.py); a value > 0 is the operator's and wins over the budget (they measured their
    # own traffic). The verifier, not the cosine, keeps near misses out.
    similarity_threshold: float = 0.0
    max_false_hit_rate: float = 0.01  # the operator's error budget: wrong answers among cache hits
    ttl_seconds: float = 3600.0
    max_entries: int = 100_000
    max_answer_bytes: int = 65536
    persist_path: str = ""  # empty: <model version dir>/cache_snapshot
    snapshot_interval_seconds: float = 30.0
    cache_sampled: bool = False  # cache temperature>0 answers that carry no seed
    # Empty: this replica's cache only (kept across restarts by the snapshot). Else the Redis that every replica's
    # cache shares (redis://host:port/db, rediss://..., unix:///path.sock); no snapshot then: Redis keeps the entries.
    # $TRITONLLM_CACHE_REDIS_URL, when set, wins (one rendered repository, a Redis per deployment).
    redis_url: str = ""
    # Opt-in capture of served prompts for calibration (python_backends/traffic_capture.py): a folder (relative to the
    # model's version folder, or absolute); empty (default): off. Per tenant at most capture_max_bytes and
    # capture_max_lines, and at most capture_max_tenants tenants. The files hold prompts as users wrote them.
    capture_dir: str = ""
    capture_max_bytes: int = 1024 * 1024
    capture_max_lines: int = 10_000
    capture_max_tenants: int = 64

    def validate(self) -> None:
        _check(0.0 <= self.similarity_threshold <= 1.0, "cache.similarity_threshold", self.similarity_threshold,
               "[0, 1] (0: derive from max_false_hit_rate)")
        _check(0.0 < self.max_false_hit_rate < 1.0, "cache.max_false_hit_rate", self.max_false_hit_rate, "(0, 1)")
        _check(self.ttl_seconds > 0, "cache.ttl_seconds", self.ttl_seconds, "> 0")
        _check(1 <= self.max_entries <= 10_000_000, "cache.max_entries", self.max_entries, "1..10000000")
        _check(1 <= self.max_answer_bytes <= 16 * 1024 * 1024, "cache.max_answer_bytes", self.max_answer_bytes,
               "1..16777216")
        _check(self.snapshot_interval_seconds > 0, "cache.snapshot_interval_seconds",
               self.snapshot_interval_seconds, "> 0")
        _check(_is_redis_url(self.redis_url), "cache.redis_url", self.redis_url,
               "empty (no shared cache), redis://host[:port][/db], rediss://host[:port][/db] or unix:///path")
        _check(1 <= self.capture_max_bytes <= 1024 ** 3, "cache.capture_max_bytes", self.capture_max_bytes,
               "1..1073741824 (bytes per tenant file)")
        _check(1 <= self.capture_max_lines <= 10_000_000, "cache.capture_max_lines", self.capture_max_lines,
               "1..10000000 (prompts per tenant file)")
        _check(1 <= self.capture_max_tenants <= 10_000, "cache.capture_max_tenants", self.capture_max_tenants,
               "1..10000")
        _check("\0" not in self.capture_dir and "\n" not in self.capture_dir, "cache.capture_dir",
               self.capture_dir, "empty (capture off) or a folder path")


CACHE_REDIS_URL_ENVIRONMENT = "TRITONLLM_CACHE_REDIS_URL"  # overrides CacheSettings.redis_url in the front model


def _is_redis_url(url: str) -> bool:
    if not url:
        return True
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536  # .port raises on a non-numeric port
    except ValueError:
        return False
    if parts.scheme == "unix":
        return bool(parts.path) and not parts.netloc
    database = parts.path.strip("/")  # redis://host/3: database 3
    return (parts.scheme in ("redis", "rediss") and bool(parts.hostname) and port_ok
            and (not database or database.isdigit()))


@dataclass(frozen=True)
class RepositorySettings:
    """Everything the renderer needs to write a deployable model repository."""

    tokenizer_dir: Path  # HF folder holding tokenizer files (+ generation_config.json)
    onnx_dir: Path | None = None  # folder holding model.onnx (+ external data) for the onnxruntime engine
    trtllm_engine_dir: str = ""  # engine folder path *inside the serving container* for the tensorrt_llm engine
    # Per-layer attention windows in tokens of the tensorrt_llm engine (its max_attention_window_size: TensorRT-LLM
    # applies sliding windows, e.g. Gemma 3's, only at run time); empty: every layer sees the whole sequence.
    trtllm_attention_windows: tuple[int, ...] = ()
    embedder_dir: Path | None = None  # folder holding the ONNX sentence embedder for the semantic cache
    # folder holding the draft model's decoder graph (speculative drafter draft_model); None: no draft model
    draft_onnx_dir: Path | None = None
    served_model_name: str = "smollm2-135m-instruct"
    max_request_batch_size: int = 64  # Triton-level max_batch_size of ensemble/pre/post models
    preprocessing_instances: int = 1
    postprocessing_instances: int = 1
    engine: EngineSettings = field(default_factory=EngineSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)

    def validate(self) -> None:
        self.engine.validate()
        self.cache.validate()
        _check(1 <= self.max_request_batch_size <= 1024, "max_request_batch_size", self.max_request_batch_size,
               "1..1024")
        _check(1 <= self.preprocessing_instances <= 64, "preprocessing_instances", self.preprocessing_instances,
               "1..64")
        _check(1 <= self.postprocessing_instances <= 64, "postprocessing_instances", self.postprocessing_instances,
               "1..64")
        if self.engine.kind == "onnxruntime":
            _check(self.onnx_dir is not None and (Path(self.onnx_dir) / "model.onnx").is_file(), "onnx_dir",
                   self.onnx_dir, "a folder holding model.onnx (run `tritonllm build`)")
        else:
            _check(bool(self.trtllm_engine_dir), "trtllm_engine_dir", self.trtllm_engine_dir,
                   "the engine folder as seen inside the serving container")
        _check(all(isinstance(window, int) and 1 <= window <= self.engine.max_context_length
                   for window in self.trtllm_attention_windows) and (
                       not self.trtllm_attention_windows or self.engine.kind == "tensorrt_llm"),
               "trtllm_attention_windows", self.trtllm_attention_windows,
               f"with the tensorrt_llm engine, one window per layer in 1..{self.engine.max_context_length} "
               f"(engine.max_context_length), or none")
        _check((Path(self.tokenizer_dir) / "tokenizer.json").is_file(), "tokenizer_dir", self.tokenizer_dir,
               "a Hugging Face folder holding tokenizer.json")
        _check(self.draft_onnx_dir is None or (self.engine.kind == "onnxruntime"
                                               and (Path(self.draft_onnx_dir) / "model.onnx").is_file()),
               "draft_onnx_dir", self.draft_onnx_dir, "None, or with the onnxruntime engine a folder holding "
               "model.onnx (`tritonllm build --draft int8|int4` or `--draft-model DIR`)")
        _check(self.engine.speculative_drafter != "draft_model" or self.draft_onnx_dir is not None,
               "engine.speculative_drafter", self.engine.speculative_drafter,
               "off or prompt_lookup without a draft model (draft_onnx_dir); draft_model needs one")


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise SettingsError(f"{name} = {value!r} is not allowed; allowed: {allowed}")


# --- model parameters ------------------------------------------------------------------------------------------------

# EngineSettings fields the ONNX Runtime engine reads from its parameters.
ENGINE_PARAMETERS: tuple[str, ...] = (
    "precision", "max_batch_size", "max_queue_size", "kv_cache_max_tokens", "max_context_length",
    "prefill_chunk_tokens", "prefill_group_ratio", "intra_op_threads", "prefix_cache_max_tokens",
    "prefix_block_tokens", "speculative_drafter", "speculative_max_draft_tokens", "speculative_max_batch_size",
    "prompt_lookup_max_ngram", "prompt_lookup_min_ngram")
CACHE_PARAMETERS: tuple[str, ...] = tuple(f.name for f in fields(CacheSettings))
# Parameter of the front model naming the model it sends cache misses to.
CALLED_MODEL_PARAMETER = "ensemble_model_name"
# Parameter of the front model listing the ensemble inputs it forwards (comma-separated): those the ensemble offers.
FORWARDED_INPUTS_PARAMETER = "ensemble_inputs"
# Parameter of the front model naming the engine model its ensemble runs (a cancelled miss is posted to its board).
ENGINE_MODEL_PARAMETER = "engine_model_name"
# Parameter of the preprocessing model: the name clients call the model by (the gateway's default `model`).
SERVED_NAME_PARAMETER = "served_model_name"
# Parameter of the front model: tritonserver's own gRPC address, where it streams cache misses from the ensemble.
ENSEMBLE_URL_PARAMETER = "ensemble_grpc_url"
DEFAULT_ENSEMBLE_GRPC_URL = "127.0.0.1:8001"  # tritonserver's default gRPC port
# Set by tritonllm's launcher for the stubs (it knows the port it chose); wins over the parameter.
ENSEMBLE_URL_ENVIRONMENT = "TRITONLLM_GRPC_URL"
# Ensemble inputs only the ONNX Runtime engine reads.
ONNX_ENGINE_ONLY_INPUTS: tuple[str, ...] = ("tenant", *GUIDED_INPUTS, "speculative")
# Path parameters (relative to the version folder) -> a file the path must hold ("" : the path itself is the file or
# folder that must exist).
PATH_PARAMETERS: dict[str, str] = {"tokenizer_path": "tokenizer.json", "onnx_path": "", "embedder_path": ""}
# Engine parameter: the draft model's graph (relative to the version folder); empty when the build has none.
DRAFT_ONNX_PARAMETER = "draft_onnx_path"
# Written by the ONNX export next to model.onnx: {"precision": ..., ...}; the engine checks its `precision`
# parameter against it at load.
DECODER_METADATA_FILE = "decoder.json"

SettingsT = TypeVar("SettingsT", EngineSettings, CacheSettings)


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


def check_decoder_precision(onnx_path: Path, precision: str) -> None:
    """Refuse an engine whose `precision` parameter differs from the precision its ONNX decoder was exported in
    (DECODER_METADATA_FILE next to model.onnx), so the configuration never claims a precision it does not serve.
    A decoder without that file (not exported by tritonllm) is not checked."""
    import json

    folder = Path(onnx_path) if Path(onnx_path).is_dir() else Path(onnx_path).parent
    metadata = folder / DECODER_METADATA_FILE
    if not metadata.is_file():
        return
    exported = json.loads(metadata.read_text(encoding="utf-8")).get("precision")
    if exported is not None and exported != precision:
        raise SettingsError(f"engine.precision = {precision!r} is not allowed; allowed: {exported!r}, the precision "
                            f"{metadata} says the decoder was exported in")


def required_parameter(parameters: Mapping[str, str], name: str, model: str) -> str:
    """A parameter that must be set; its absence is a configuration error naming the model and the key."""
    value = parameters.get(name, "").strip()
    if not value:
        raise ValueError(f"{model} model configuration lacks the parameter {name}")
    return value


# --- OpenAI-compatible gateway -------------------------------------------------------------------------------------

GatewayModel = Literal["auto", "ensemble", "llm"]
# What `auto` sends requests to, in order of preference, per replica: the front model `llm` where a replica serves it
# (the semantic cache, and the only path whose cancellation stops the engine), else the ensemble.
GATEWAY_AUTO_MODELS: tuple[str, ...] = ("llm", "ensemble")


@dataclass(frozen=True)
class GatewaySettings:
    """The OpenAI-compatible HTTP gateway in front of one or more Triton replicas (tritonllm/gateway/)."""

    triton_grpc_urls: tuple[str, ...] = ("127.0.0.1:8001",)  # replicas, host:port of each one's gRPC endpoint
    model: GatewayModel = "auto"  # Triton model requests go to: auto (llm where ready, else ensemble), ensemble, llm
    served_model_name: str = RepositorySettings.served_model_name  # the `model` clients name; GET /v1/models
    host: str = "127.0.0.1"
    port: int = 8080
    default_max_tokens: int = 256  # when a request names neither max_tokens nor max_completion_tokens
    max_body_bytes: int = 1_048_576  # larger bodies are refused (413) before they are parsed
    max_json_depth: int = 16  # deeper nesting is refused (400) before it is parsed
    max_stop_words: int = 4  # OpenAI's own limit
    request_timeout_seconds: float = 300.0  # longest wait for the next piece from Triton
    health_interval_seconds: float = 2.0  # how often each replica's readiness is asked
    max_attempts: int = 2  # replicas tried for a request that fails before its first token

    def validate(self) -> None:
        _check(bool(self.triton_grpc_urls) and all(url.rpartition(":")[2].isdigit() for url in self.triton_grpc_urls),
               "gateway.triton_grpc_urls", self.triton_grpc_urls, "one or more host:port")
        _check(self.model in typing.get_args(GatewayModel), "gateway.model", self.model, "auto, ensemble or llm")
        _check(bool(self.served_model_name.strip()), "gateway.served_model_name", self.served_model_name,
               "a non-empty name")
        _check(0 <= self.port <= 65535, "gateway.port", self.port, "0..65535 (0: any free port)")
        _check(1 <= self.default_max_tokens <= 1_048_576, "gateway.default_max_tokens", self.default_max_tokens,
               "1..1048576")
        _check(1024 <= self.max_body_bytes <= 64 * 1024 * 1024, "gateway.max_body_bytes", self.max_body_bytes,
               "1024..67108864")
        _check(4 <= self.max_json_depth <= 256, "gateway.max_json_depth", self.max_json_depth, "4..256")
        _check(0 <= self.max_stop_words <= 64, "gateway.max_stop_words", self.max_stop_words, "0..64")
        _check(self.request_timeout_seconds > 0, "gateway.request_timeout_seconds", self.request_timeout_seconds,
               "> 0")
        _check(self.health_interval_seconds > 0, "gateway.health_interval_seconds", self.health_interval_seconds,
               "> 0")
        _check(1 <= self.max_attempts <= 16, "gateway.max_attempts", self.max_attempts, "1..16")
