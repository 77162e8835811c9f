"""Building a TensorRT-LLM engine from the gated (FP8 or INT4 AWQ) checkpoint with `trtllm-build`.

TensorRT-LLM is detected without importing it (its import loads CUDA libraries): `trtllm-build` on PATH is what we
run, and the `tensorrt_llm` package is looked up only to say precisely what is missing. Where it is absent (any
machine outside NVIDIA's container), `build_engine` raises TensorRTLLMUnavailable with the commands that finish the
build in the NGC Triton container.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

from .errors import BuildError
from .fp8_verify import checkpoint_architecture
from tritonllm.contract import EngineSettings

TRTLLM_BUILD = "trtllm-build"
# The NGC Triton release whose container runs trtllm-build and serves its engines (docker/Dockerfile.trtllm pins the
# same one). Engines are tied to the TensorRT version: build and serve with one tag.
NGC_TRITON_TAG = "25.10"
NGC_IMAGE = f"nvcr.io/nvidia/tritonserver:{NGC_TRITON_TAG}-trtllm-python-py3"
# KV cache page size in tokens; TensorRT-LLM chunks long prompts in multiples of it.
TOKENS_PER_BLOCK = 64


class TensorRTLLMUnavailable(BuildError):
    """TensorRT-LLM is not installed here; the message says how to finish the build in the NGC container."""


def checkpoint_quantization(checkpoint_dir: Path) -> dict:
    """The `quantization` section of a TensorRT-LLM checkpoint's config.json ({} for an unquantized one)."""
    config_file = Path(checkpoint_dir) / "config.json"
    if not config_file.is_file():
        raise BuildError(f"{checkpoint_dir} is not a TensorRT-LLM checkpoint (no config.json); run the FP8 build first")
    return json.loads(config_file.read_text()).get("quantization") or {}


def attention_windows(checkpoint_dir: Path, settings: EngineSettings) -> tuple[int, ...]:
    """The per-layer attention windows (tokens) the engine must be served with (RepositorySettings.
    trtllm_attention_windows): a Gemma 3 checkpoint's sliding layers get its window, its full layers the whole
    sequence (max_context_length); () for a checkpoint without sliding layers (every layer sees the whole sequence).
    trtllm-build bakes no window into the engine: the runtime's max_attention_window_size applies it."""
    config_file = Path(checkpoint_dir) / "config.json"
    config = json.loads(config_file.read_text())
    if "sliding_window" not in config:  # only Gemma 3 checkpoints carry windows (TensorRT-LLM's Gemma3ConfigGroup)
        return ()
    windows = checkpoint_architecture(config, Path(checkpoint_dir)).windows
    if all(window is None for window in windows):
        return ()
    return tuple(min(window or settings.max_context_length, settings.max_context_length) for window in windows)


def trtllm_build_args(checkpoint_dir: Path, engine_dir: Path, settings: EngineSettings,
                      quantization: dict) -> list[str]:
    """The `trtllm-build` command line for a checkpoint (paths as the command will see them; `quantization` from its
    config.json), every limit taken from the engine settings.

    - max_batch_size: sequences the engine schedules together (EngineSettings.max_batch_size).
    - max_seq_len: prompt + generated tokens of one sequence (max_context_length); max_input_len leaves at least one
      token to generate.
    - max_num_tokens: tokens one engine step processes: a prefill chunk plus one token for each running sequence,
      rounded up to whole KV pages (prefill_chunk_tokens + max_batch_size). Prompts longer than that are prefilled
      in chunks, which needs paged context FMHA here and `enable_chunked_context` in the served model.
    - paged KV cache with paged context FMHA (also what KV cache reuse needs).
    - W4A16_AWQ checkpoints: `--gemm_plugin auto` (groupwise int4 weight-only GEMMs, bf16 activations).
    - FP8 (per-tensor) checkpoints: the FP8 GEMM plugin; FP8_PER_CHANNEL_PER_TOKEN (rowwise) checkpoints leave the
      GEMM choice to trtllm-build (its rowwise FP8 GEMMs come with that quant mode; not yet run on a GPU here). With
      an FP8 KV cache also FP8 context FMHA (it reads FP8 K/V). Layers in exclude_modules stay bf16 either way.
    """
    settings.validate()
    max_num_tokens = _round_up(settings.prefill_chunk_tokens + settings.max_batch_size, TOKENS_PER_BLOCK)
    args = [
        TRTLLM_BUILD,
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(engine_dir),
        "--max_batch_size", str(settings.max_batch_size),
        "--max_input_len", str(settings.max_context_length - 1),
        "--max_seq_len", str(settings.max_context_length),
        "--max_num_tokens", str(max_num_tokens),
        "--max_beam_width", "1",
        "--kv_cache_type", "paged",
        "--tokens_per_block", str(TOKENS_PER_BLOCK),
        "--use_paged_context_fmha", "enable",
        "--remove_input_padding", "enable",
        "--workers", "1",
    ]
    if quantization.get("quant_algo") == "FP8":
        args += ["--gemm_plugin", "fp8"]
    elif quantization.get("quant_algo") == "W4A16_AWQ":
        # bf16 activations; the groupwise int4 weight-only GEMM plugin comes with the AWQ checkpoint itself
        # (TensorRT-LLM's examples/llama: `--gemm_plugin auto` for INT4 AWQ). Not yet run on a GPU here.
        args += ["--gemm_plugin", "auto"]
    if quantization.get("kv_cache_quant_algo") == "FP8":
        args += ["--use_fp8_context_fmha", "enable"]
    return args


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def ngc_instructions(checkpoint_dir: Path, settings: EngineSettings) -> str:
    """What is missing here, and how to finish the engine build and serve it in the NGC container, for this
    checkpoint and these settings (the `tensorrt_llm` package is looked up, never imported)."""
    if importlib.util.find_spec("tensorrt_llm") is not None:
        missing = (f"The tensorrt_llm Python package is installed but `{TRTLLM_BUILD}` is not on PATH: add the folder "
                   f"holding its console scripts (the environment's bin/) to PATH and build again, or finish in "
                   f"NVIDIA's container.")
    else:
        missing = (f"TensorRT-LLM is not installed here: `{TRTLLM_BUILD}` is not on PATH and the tensorrt_llm Python "
                   f"package is absent. It cannot be installed from PyPI (the package there only points to NVIDIA's "
                   f"own index); it ships in NVIDIA's Triton container.")
    out_dir = Path(checkpoint_dir).resolve().parent
    mounted = Path("/workspace/out")
    build = " ".join(trtllm_build_args(mounted / Path(checkpoint_dir).name, mounted / "engine", settings,
                                       checkpoint_quantization(checkpoint_dir)))
    windows = attention_windows(checkpoint_dir, settings)
    serve_windows = (f"The model has sliding-window layers, which the engine applies only through the runtime's "
                     f"max_attention_window_size: serve it with one window per layer, "
                     f"max_attention_window_size = \"{','.join(map(str, windows))}\" in the tensorrt_llm model's "
                     f"config (the rendered repository sets it: trtllm_attention_windows). " if windows else "")
    return (
        f"{missing}\n"
        f"The checkpoint is ready in {checkpoint_dir}. Finish on a machine with an "
        f"NVIDIA GPU with FP8 tensor cores (Hopper or Ada) and the NVIDIA Container Toolkit:\n"
        f"  docker run --rm --gpus all -v {out_dir}:{mounted} {NGC_IMAGE} \\\n"
        f"    {build}\n"
        f"then render the repository with the engine folder as the server will see it (trtllm_engine_dir) and serve "
        f"it from the same image tag: engines are tied to the TensorRT version inside it. {serve_windows}"
        f"docker/Dockerfile.trtllm does all of it (FP8 export and gate, trtllm-build, repository, tritonserver).")


def build_engine(checkpoint_dir: Path, engine_dir: Path, settings: EngineSettings) -> Path:
    """Run `trtllm-build` on a TensorRT-LLM checkpoint; returns the engine folder (config.json + rank0.engine).

    Raises TensorRTLLMUnavailable with the NGC container instructions where TensorRT-LLM is absent, BuildError when
    trtllm-build fails or leaves no engine."""
    checkpoint_dir, engine_dir = Path(checkpoint_dir), Path(engine_dir)
    args = trtllm_build_args(checkpoint_dir, engine_dir, settings, checkpoint_quantization(checkpoint_dir))
    executable = shutil.which(TRTLLM_BUILD)
    if executable is None:
        raise TensorRTLLMUnavailable(ngc_instructions(checkpoint_dir, settings))
    completed = subprocess.run([executable, *args[1:]])  # its progress goes straight to the terminal (minutes)
    if completed.returncode != 0:
        raise BuildError(f"{TRTLLM_BUILD} failed with exit code {completed.returncode} (its output is above): "
                         f"{' '.join(args)}")
    for name in ("config.json", "rank0.engine"):
        if not (engine_dir / name).is_file():
            raise BuildError(f"{TRTLLM_BUILD} finished but {engine_dir / name} is missing")
    return engine_dir
