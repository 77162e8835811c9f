"""Typed values a repository is rendered from.

Every number that ends up in a generated `config.pbtxt` starts here, so it is checked once (``validate``) before any
file is written, and `tritonllm lint` can check an ops-edited repository against the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Precision = Literal["fp32", "int8", "int4"]
EngineKind = Literal["onnxruntime", "tensorrt_llm"]

# Weight precisions of the ONNX Runtime engine (bf16 is not offered: ONNX Runtime's CPU provider has no bf16 kernels).
PRECISIONS: tuple[str, ...] = ("fp32", "int8", "int4")


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
    similarity_threshold: float = 0.96  # cosine; lowest with no wrong hit on benchmarks/data/paraphrases.jsonl + 0.01
    ttl_seconds: float = 3600.0
    max_entries: int = 100_000
    max_answer_bytes: int = 65536
    persist_path: str = ""  # empty: <model version dir>/cache_snapshot
    snapshot_interval_seconds: float = 30.0
    cache_sampled: bool = False  # cache temperature>0 answers that carry no seed

    def validate(self) -> None:
        _check(0.0 < self.similarity_threshold <= 1.0, "cache.similarity_threshold", self.similarity_threshold,
               "(0, 1]")
        _check(self.ttl_seconds > 0, "cache.ttl_seconds", self.ttl_seconds, "> 0")
        _check(1 <= self.max_entries <= 10_000_000, "cache.max_entries", self.max_entries, "1..10000000")
        _check(1 <= self.max_answer_bytes <= 16 * 1024 * 1024, "cache.max_answer_bytes", self.max_answer_bytes,
               "1..16777216")
        _check(self.snapshot_interval_seconds > 0, "cache.snapshot_interval_seconds",
               self.snapshot_interval_seconds, "> 0")


@dataclass(frozen=True)
class RepositorySettings:
    """Everything the renderer needs to write a deployable model repository."""

    tokenizer_dir: Path  # HF folder holding tokenizer files (+ generation_config.json)
    onnx_dir: Path | None = None  # folder holding model.onnx (+ external data) for the onnxruntime engine
    trtllm_engine_dir: str = ""  # engine folder path *inside the serving container* for the tensorrt_llm engine
    embedder_dir: Path | None = None  # folder holding the ONNX sentence embedder for the semantic cache
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
        _check((Path(self.tokenizer_dir) / "tokenizer.json").is_file(), "tokenizer_dir", self.tokenizer_dir,
               "a Hugging Face folder holding tokenizer.json")


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise SettingsError(f"{name} = {value!r} is not allowed; allowed: {allowed}")
