"""FP8 post-training quantization for TensorRT-LLM, with an accuracy gate.

Steps: load the Hugging Face model in bf16 (cast before quantizing, or the export rounds twice), calibrate FP8
weights + activations (+ optionally the KV cache) with NVIDIA Model Optimizer on calibration prompts, export a
TensorRT-LLM checkpoint and an FP8 Hugging Face checkpoint, check both against the source model, then rebuild the
model from the TensorRT-LLM checkpoint with real FP8 GEMMs (fp8_verify.py) and compare it with the unquantized model
on held-out prompts. Everything is written into a temporary folder that becomes `out_dir` only when the gate passes.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file

from tritonllm.prompts import PromptFileError, read_prompts
from tritonllm.python_backends.chat import encode_user_turn

from .errors import BuildError
from .files import atomic_dir
from .fp8_verify import (CHECKPOINT_WEIGHTS, CheckpointModel, GateReport, GateThresholds,
                         checkpoint_tensor_problems, read_checkpoint_config, run_gate, score_sequences)

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CALIBRATION_FILE = DATA_DIR / "calibration_prompts.jsonl"
HELDOUT_FILE = DATA_DIR / "heldout_prompts.jsonl"
MAX_SEQUENCE_TOKENS = 512  # longer prompts are cut: calibration statistics saturate well before, and CPU time does not
# Hugging Face model_type -> Model Optimizer's TensorRT-LLM decoder type. Only layouts the gate can rebuild.
DECODER_TYPES = {"llama": "llama"}
CHECKPOINT_DIR = "trtllm_checkpoint"
HF_FP8_DIR = "hf_fp8"
REPORT_FILE = "gate_report.json"
MODELOPT_LOG = "modelopt.log"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class Fp8Result:
    """A published FP8 build: out_dir holds trtllm_checkpoint/, hf_fp8/ and gate_report.json."""

    out_dir: Path
    checkpoint_dir: Path
    hf_fp8_dir: Path
    report_path: Path
    report: GateReport


def load_prompts(path: Path, count: int | None = None) -> list[tuple[str, str]]:
    """(kind, text) pairs of a prompt file (`tritonllm.prompts`: JSONL with "prompt" or "text" fields); the first
    `count` of them, which must exist. A bad file raises BuildError saying why."""
    try:
        return read_prompts(path, count)
    except PromptFileError as error:
        raise BuildError(str(error)) from None


def tokenize_prompts(tokenizer, prompts: list[tuple[str, str]]) -> list[torch.Tensor]:
    """Token ids of each prompt (chat-templated for "prompt" records when the tokenizer has a template), cut to
    MAX_SEQUENCE_TOKENS; sequences under 2 tokens are dropped (nothing to predict)."""
    sequences = []
    for kind, text in prompts:
        ids = encode_user_turn(tokenizer, text) if kind == "prompt" else None
        if ids is None:
            ids = tokenizer(text)["input_ids"]
        if len(ids) >= 2:
            sequences.append(torch.tensor(ids[:MAX_SEQUENCE_TOKENS], dtype=torch.long))
    return sequences


def calibrate_fp8(model: torch.nn.Module, sequences: list[torch.Tensor], kv_cache_fp8: bool) -> None:
    """Insert FP8 quantizers (per-tensor weights and activations; the KV cache too when asked) and calibrate their
    ranges (max) on the sequences, in place. lm_head stays unquantized (Model Optimizer's FP8 default)."""
    import modelopt.torch.quantization as mtq

    config = mtq.FP8_DEFAULT_CFG
    if kv_cache_fp8:
        config = mtq.update_quant_cfg_with_kv_cache_quant(config, mtq.FP8_KV_CFG["quant_cfg"])

    device = next(model.parameters()).device

    def forward_loop(quantized: torch.nn.Module) -> None:
        for ids in sequences:
            quantized(ids.unsqueeze(0).to(device))

    with torch.no_grad():
        mtq.quantize(model, config, forward_loop)


def export_checkpoints(model: torch.nn.Module, checkpoint_dir: Path, hf_fp8_dir: Path, source_dir: Path) -> None:
    """Write the TensorRT-LLM checkpoint (config.json + rank0.safetensors) and the FP8 Hugging Face checkpoint."""
    from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint

    decoder_type = DECODER_TYPES[model.config.model_type]
    # TensorRT-LLM first: it gives fused layers (q/k/v, gate/up) one shared scale in place, and the HF export then
    # replaces the weights by FP8 tensors in place, after which the model no longer runs.
    export_tensorrt_llm_checkpoint(model, decoder_type, torch.bfloat16, checkpoint_dir, inference_tensor_parallel=1)
    # dtype float32: Model Optimizer quantizes the HF weights in the export dtype, and dividing bf16 weights by their
    # scale in bf16 rounds twice (measured: ~2.5% of the FP8 weights one step off the TensorRT-LLM checkpoint's).
    # Unquantized tensors keep the model's bf16.
    export_hf_checkpoint(model, dtype=torch.float32, export_dir=hf_fp8_dir)
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, hf_fp8_dir / name)


def config_mismatches(checkpoint_config: dict, source_config, kv_cache_fp8: bool) -> list[str]:
    """Where the exported TensorRT-LLM config disagrees with the source model's config (missing keys included)."""
    heads = source_config.num_attention_heads
    expected = {
        "architecture": (source_config.architectures or [None])[0],
        "num_hidden_layers": source_config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": source_config.num_key_value_heads or heads,
        "hidden_size": source_config.hidden_size,
        "head_size": getattr(source_config, "head_dim", None) or source_config.hidden_size // heads,
        "intermediate_size": source_config.intermediate_size,
        "vocab_size": source_config.vocab_size,
        "max_position_embeddings": source_config.max_position_embeddings,
        "hidden_act": source_config.hidden_act,
        "norm_epsilon": source_config.rms_norm_eps,
        "rotary_base": source_config.rope_theta,
        "rotary_scaling": source_config.rope_scaling,
        "quantization.quant_algo": "FP8",
        "quantization.kv_cache_quant_algo": "FP8" if kv_cache_fp8 else None,
    }
    mismatches = []
    for key, want in expected.items():
        section, _, name = key.rpartition(".")
        holder = (checkpoint_config.get(section) or {}) if section else checkpoint_config
        if name not in holder and want is not None:
            mismatches.append(f"{key} is missing (source: {want!r})")
            continue
        got = holder.get(name)
        same = math.isclose(got, want, rel_tol=1e-6) if isinstance(want, float) and isinstance(got, (int, float)) \
            else got == want
        if not same:
            mismatches.append(f"{key} = {got!r}, source model: {want!r}")
    return mismatches


def hf_export_mismatches(hf_fp8_dir: Path, checkpoint_tensors: dict[str, torch.Tensor], layers: int) -> list[str]:
    """Where the FP8 Hugging Face checkpoint's quantized weights or scales differ from the TensorRT-LLM checkpoint's:
    both must hold the same FP8 model (fused q/k/v and gate/up with one shared scale each)."""
    hf = {}
    for shard in sorted(Path(hf_fp8_dir).glob("*.safetensors")):
        hf.update(load_file(shard))
    pairs = {"attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "attention.dense": ("self_attn.o_proj",), "mlp.fc": ("mlp.gate_proj",), "mlp.gate": ("mlp.up_proj",),
             "mlp.proj": ("mlp.down_proj",)}
    scales = {"weights_scaling_factor": "weight_scale", "activation_scaling_factor": "input_scale"}
    mismatches = []
    for layer in range(layers):
        for trt_name, hf_names in pairs.items():
            trt_prefix, hf_prefixes = f"transformer.layers.{layer}.{trt_name}", [
                f"model.layers.{layer}.{name}" for name in hf_names]
            try:
                weight = torch.cat([hf[f"{p}.weight"] for p in hf_prefixes]).view(torch.uint8)
                if not torch.equal(weight, checkpoint_tensors[f"{trt_prefix}.weight"].view(torch.uint8)):
                    mismatches.append(f"{hf_fp8_dir.name}: FP8 weights of {', '.join(hf_prefixes)} differ from "
                                      f"{trt_prefix}.weight")
                for trt_scale, hf_scale in scales.items():
                    want = checkpoint_tensors[f"{trt_prefix}.{trt_scale}"].reshape(())
                    for prefix in hf_prefixes:
                        if not torch.equal(hf[f"{prefix}.{hf_scale}"].reshape(()), want):
                            mismatches.append(f"{hf_fp8_dir.name}: {prefix}.{hf_scale} differs from "
                                              f"{trt_prefix}.{trt_scale}")
            except KeyError as missing:
                mismatches.append(f"{hf_fp8_dir.name}: tensor {missing} is missing")
    return mismatches


def build_fp8(hf_dir: Path, out_dir: Path, calib_file: Path | None, calib_size: int, kv_cache_fp8: bool,
              gate: GateThresholds, console: Console | None = None) -> Fp8Result:
    """Calibrate, export, check and gate an FP8 build of the model in `hf_dir`; publish it as `out_dir`.

    Raises BuildError (and publishes nothing) on bad calibration input, an unsupported model, an export inconsistent
    with the source, or a gate miss; the rejected gate report is then kept as `<out_dir>.rejected-gate-report.json`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    console = console or Console(stderr=True)
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    gate.validate()
    calibration = load_prompts(calib_file or DEFAULT_CALIBRATION_FILE, calib_size)
    heldout = load_prompts(HELDOUT_FILE)
    source_config = AutoConfig.from_pretrained(hf_dir)
    if source_config.model_type not in DECODER_TYPES:
        raise BuildError(f"{hf_dir}: model_type {source_config.model_type!r} has no FP8 TensorRT-LLM path here; "
                         f"allowed: {', '.join(DECODER_TYPES)}")
    if not source_config.architectures:
        raise BuildError(f"{hf_dir}/config.json has no 'architectures'; the TensorRT-LLM export needs it")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    calibration_ids = tokenize_prompts(tokenizer, calibration)
    heldout_ids = tokenize_prompts(tokenizer, heldout)

    with atomic_dir(out_dir) as staging:  # an earlier build in out_dir is replaced only by a whole new one
        checkpoint_dir, hf_fp8_dir = staging / CHECKPOINT_DIR, staging / HF_FP8_DIR
        started = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        console.print(f"FP8 calibration: {len(calibration_ids)} prompts from {calib_file or 'the default set'}"
                      f"{' (KV cache too)' if kv_cache_fp8 else ''}")
        with _modelopt_output(staging / MODELOPT_LOG):
            model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval().to(device)
            calibrate_fp8(model, calibration_ids, kv_cache_fp8)
            export_checkpoints(model, checkpoint_dir, hf_fp8_dir, hf_dir)
        del model
        console.print(f"exported {checkpoint_dir.name}/ and {hf_fp8_dir.name}/ "
                      f"in {time.perf_counter() - started:.0f} s")

        checkpoint_config = read_checkpoint_config(checkpoint_dir)
        tensors = load_file(checkpoint_dir / CHECKPOINT_WEIGHTS)
        problems = config_mismatches(checkpoint_config, source_config, kv_cache_fp8)
        problems += checkpoint_tensor_problems(checkpoint_config, tensors)
        problems += hf_export_mismatches(hf_fp8_dir, tensors, source_config.num_hidden_layers)
        if problems:
            raise BuildError(f"the FP8 export of {hf_dir} is inconsistent with the source model, refused:\n  "
                             + "\n  ".join(problems))

        console.print(f"accuracy gate: {len(heldout_ids)} held-out prompts, FP8 rebuild vs the unquantized model")
        reference_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval().to(device)
        reference = score_sequences(lambda ids: reference_model(ids.to(device)).logits, heldout_ids)
        del reference_model
        report = run_gate(CheckpointModel(checkpoint_dir, device=device), heldout_ids, reference, gate)
        report.extra = {"source": str(hf_dir), "reference": "source model, float32",
                        "calibration_file": str(calib_file or DEFAULT_CALIBRATION_FILE),
                        "calibration_prompts": len(calibration_ids), "heldout_file": str(HELDOUT_FILE)}
        console.print(report.table())
        if not report.passed:
            rejected = report.write_json(out_dir.with_name(f"{out_dir.name}.rejected-gate-report.json"))
            raise BuildError(f"FP8 build rejected by the accuracy gate ({'; '.join(report.failures)}); nothing was "
                             f"published to {out_dir}. Report: {rejected}. Try production-like calibration prompts "
                             f"(--calib), leave the KV cache unquantized, or keep this model in bf16.")
        report.write_json(staging / REPORT_FILE)
    return Fp8Result(out_dir=out_dir, checkpoint_dir=out_dir / CHECKPOINT_DIR, hf_fp8_dir=out_dir / HF_FP8_DIR,
                     report_path=out_dir / REPORT_FILE, report=report)


@contextlib.contextmanager
def _modelopt_output(log_file: Path) -> Iterator[None]:
    """Model Optimizer prints its whole config and many warnings: keep them in a log instead of the console."""
    captured = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(captured):
        warnings.simplefilter("always")
        try:
            yield
        finally:
            lines = [captured.getvalue()] + [f"{w.category.__name__}: {w.message}" for w in caught]
            log_file.write_text("\n".join(lines) + "\n")

