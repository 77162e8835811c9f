"""Post-training quantization for TensorRT-LLM (FP8, INT4 AWQ), with an accuracy gate and a recipe search.

Steps, per recipe (RECIPES[quant], cheapest first): load the Hugging Face model in bf16 (cast before quantizing, or
the export rounds twice), calibrate with NVIDIA Model Optimizer on calibration prompts (FP8 weights + activations,
optionally the KV cache; or INT4 AWQ weights, Model Optimizer's INT4_AWQ_CFG with its awq_lite scale search),
optionally keep the decoder layers a measured sensitivity scan finds most harmful in bf16, export a TensorRT-LLM
checkpoint (and for FP8 an FP8 Hugging Face checkpoint), check the exports against the source model, then rebuild the
model from the TensorRT-LLM checkpoint (real FP8 GEMMs, or the packed int4 weights; fp8_verify.py) and compare it with
the unquantized model on held-out prompts. The first recipe that passes is published; every attempt, refused ones
included, is in the report. Everything is written into a temporary folder that becomes `out_dir` only when a recipe
passes.

What makes the search affordable on a CPU, without touching the gate: the float32 reference scores are computed once
per (model, prompts) and kept in the build cache; calibration runs once per quantization algorithm (calibration only
collects ranges from the unquantized forward pass, so the recipes with and without an FP8 KV cache share it; each
recipe works on a copy); and a recipe's gate stops as soon as it provably cannot pass (fp8_verify.unreachable).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from tritonllm.prompts import PromptFileError, read_prompts
from tritonllm.python_backends.chat import encode_user_turn

from .errors import BuildError
from .files import atomic_dir
from .source import content_key
from .architecture import architecture_of
from .fp8_verify import (CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, FP8_DTYPE, PER_CHANNEL_PER_TOKEN, PER_TENSOR,
                         W4A16_AWQ, CheckpointModel, GateReport, GateThresholds, TokenScores,
                         checkpoint_architecture, checkpoint_tensor_problems, compare_scores, read_checkpoint_config,
                         run_gate, score_sequences)
from .trtllm_export import check_exportable, export_trtllm_checkpoint

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CALIBRATION_FILE = DATA_DIR / "calibration_prompts.jsonl"
HELDOUT_FILE = DATA_DIR / "heldout_prompts.jsonl"
MAX_SEQUENCE_TOKENS = 512  # longer prompts are cut: calibration statistics saturate well before, and CPU time does not
CHECKPOINT_DIR = "trtllm_checkpoint"
HF_FP8_DIR = "hf_fp8"
REPORT_FILE = "gate_report.json"
MODELOPT_LOG = "modelopt.log"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
HF_QUANT_CONFIG = "hf_quant_config.json"
# TensorRT-LLM linear layer -> the Hugging Face projections fused into it (in the fused weight's row order).
HF_LINEARS = {"attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "attention.dense": ("self_attn.o_proj",), "mlp.fc": ("mlp.gate_proj",), "mlp.gate": ("mlp.up_proj",),
              "mlp.proj": ("mlp.down_proj",)}
# The builders.architecture facts a checkpoint config and its source config must agree on (RMSNorm offsets differ by
# design: the checkpoint stores Gemma's 1 + w).
ARCHITECTURE_FACTS = ("activation", "sandwich_norms", "qk_norm", "embedding_scale", "attention_scale",
                      "final_logit_softcap", "windows", "local_rope")
# TensorRT-LLM scale tensor -> the FP8 Hugging Face checkpoint's, per quant algo.
HF_SCALES = {PER_TENSOR: {"weights_scaling_factor": "weight_scale", "activation_scaling_factor": "input_scale"},
             PER_CHANNEL_PER_TOKEN: {"per_channel_scale": "weight_scale"}}
SCAN_PROMPTS = 8  # calibration prompts the sensitivity scan scores (never the held-out ones the gate scores): it
# only ranks layers (the gate then judges the choice on the held-out set), and each prompt costs a forward pass per
# layer scanned (30 for SmolLM2); 8 instead of 32 cut the two mixed recipes from about 1,000 forward passes each to 250
# The scan's few prompts (~440 tokens for SmolLM2) measure agreement within about +-1.4 points (one standard
# error at 90%): a choice of layers is kept only when it passes there by this many standard errors, or it is fitted to
# the scan's noise (SmolLM2 fp8-mixed without the margin: 91.7% on the scan with 4 layers, 88.98% in the gate).
SCAN_MARGIN_STANDARD_ERRORS = 2.0
# At most this share of the decoder layers is kept in bf16: beyond it the build is no longer an FP8 model.
MAX_EXCLUDED_LAYER_SHARE = 0.25


@dataclass(frozen=True)
class Fp8Recipe:
    """One way to quantize: the TensorRT-LLM quant algo, whether the KV cache is FP8 too, and whether the decoder
    layers the sensitivity scan finds most harmful stay in bf16."""

    name: str
    quant_algo: str
    kv_cache_fp8: bool
    keep_sensitive_layers: bool = False


# `--quant` value -> its recipes, cheapest first (most quantized, fewest scales): the search publishes the first that
# passes the gate.
RECIPES = {
    "fp8": (
        Fp8Recipe("fp8-per-tensor+fp8-kv", PER_TENSOR, kv_cache_fp8=True),
        Fp8Recipe("fp8-per-tensor", PER_TENSOR, kv_cache_fp8=False),
        Fp8Recipe("fp8-mixed+fp8-kv", PER_TENSOR, kv_cache_fp8=True, keep_sensitive_layers=True),
        Fp8Recipe("fp8-mixed", PER_TENSOR, kv_cache_fp8=False, keep_sensitive_layers=True),
        Fp8Recipe("fp8-rowwise+fp8-kv", PER_CHANNEL_PER_TOKEN, kv_cache_fp8=True),
        Fp8Recipe("fp8-rowwise", PER_CHANNEL_PER_TOKEN, kv_cache_fp8=False),
    ),
    # W4A16: int4 weights with AWQ pre-quant scales, bf16 activations (the seed's "AWQ 4-bit" pattern).
    "int4_awq": (
        Fp8Recipe("int4-awq+fp8-kv", W4A16_AWQ, kv_cache_fp8=True),
        Fp8Recipe("int4-awq", W4A16_AWQ, kv_cache_fp8=False),
    ),
}
QUANTS = tuple(RECIPES)
RECIPE_NAMES = tuple(recipe.name for recipes in RECIPES.values() for recipe in recipes)
# TensorRT-LLM's W4A16 AWQ kernels take these group sizes; the largest that divides every input width is used.
AWQ_GROUP_SIZES = (128, 64)
# awq_lite's cost is per forward call (every call fake-quantizes each weight for each of its 11 scale exponents), not
# per token: calibration prompts run in batches of this many, of similar length (the padding positions of a batch
# count in its activation statistics, as with Model Optimizer's own padded calibration loaders). Measured (tiny model):
# ~60% of AWQ calibration time in those per-call weight fake-quantizations.
AWQ_BATCH = 8


def select_recipes(kv_cache_fp8: bool | None, names: list[str] | None = None, quant: str = "fp8") -> list[Fp8Recipe]:
    """The recipes of `quant` to search, in order: all of them, or only those with (True) / without (False) an FP8
    KV cache, optionally only the named ones."""
    if quant not in RECIPES:
        raise BuildError(f"quantization {quant!r} is not known; allowed: {', '.join(QUANTS)}")
    allowed = [recipe.name for recipe in RECIPES[quant]]
    unknown = set(names or ()) - set(allowed)
    if unknown:
        raise BuildError(f"{quant} recipe {sorted(unknown)} is not known; allowed: {', '.join(allowed)}")
    chosen = [recipe for recipe in RECIPES[quant] if (kv_cache_fp8 is None or recipe.kv_cache_fp8 == kv_cache_fp8)
              and (names is None or recipe.name in names)]
    if not chosen:
        raise BuildError(f"no {quant} recipe matches recipes {names} with kv_cache_fp8={kv_cache_fp8}; allowed: "
                         f"{', '.join(allowed)}")
    return chosen


@dataclass(frozen=True)
class Fp8Result:
    """A published build: out_dir holds trtllm_checkpoint/, gate_report.json and, for FP8 recipes, hf_fp8/."""

    out_dir: Path
    checkpoint_dir: Path
    hf_fp8_dir: Path | None
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


def awq_group_size(model_config) -> int:
    """The largest of AWQ_GROUP_SIZES dividing every linear layer's input width (hidden, heads x head_dim and
    intermediate sizes); SmolLM2's 576 takes 64."""
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    widths = (model_config.hidden_size, heads * head_dim, model_config.intermediate_size)
    for size in AWQ_GROUP_SIZES:
        if all(width % size == 0 for width in widths):
            return size
    raise BuildError(f"no INT4 AWQ group size in {AWQ_GROUP_SIZES} divides the input widths {widths} of this model")


def quantize_config(quant_algo: str, kv_cache_fp8: bool, model_config) -> dict:
    """Model Optimizer's config for a quant algo: FP8 per tensor (FP8_DEFAULT_CFG), FP8 per channel and token, or
    INT4_AWQ_CFG with its group size set to `awq_group_size` (Model Optimizer's default 128 does not divide
    SmolLM2's 576 channels); the FP8 KV cache on top when asked. lm_head stays unquantized in all (their default)."""
    import modelopt.torch.quantization as mtq

    if quant_algo == W4A16_AWQ:
        config = copy.deepcopy(mtq.INT4_AWQ_CFG)
        for entry in config["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["block_sizes"] = {-1: awq_group_size(model_config), "type": "static"}
    else:
        config = {PER_TENSOR: mtq.FP8_DEFAULT_CFG, PER_CHANNEL_PER_TOKEN: mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG}[quant_algo]
    if kv_cache_fp8:
        config = mtq.update_quant_cfg_with_kv_cache_quant(config, mtq.FP8_KV_CFG["quant_cfg"])
    return config


def calibrate_fp8(model: torch.nn.Module, sequences: list[torch.Tensor], kv_cache_fp8: bool,
                  quant_algo: str = PER_TENSOR) -> None:
    """Insert the quant algo's quantizers (`quantize_config`; the KV cache too when asked) and calibrate them on the
    sequences, in place: ranges (max) for FP8, the AWQ pre-quant scales and int4 group ranges for W4A16_AWQ."""
    import modelopt.torch.quantization as mtq

    config = quantize_config(quant_algo, kv_cache_fp8, model.config)
    device = next(model.parameters()).device
    batches = _length_sorted_batches(sequences, AWQ_BATCH if quant_algo == W4A16_AWQ else 1)

    def forward_loop(quantized: torch.nn.Module) -> None:
        for ids, mask in batches:
            quantized(ids.to(device), attention_mask=mask.to(device))

    with torch.no_grad():
        mtq.quantize(model, config, forward_loop)


def _length_sorted_batches(sequences: list[torch.Tensor], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, attention mask) batches of `size` sequences of similar length, right-padded (size 1: each sequence
    alone, in order, no padding)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i])) if size > 1 else range(len(sequences))
    ordered = [sequences[i] for i in order]
    batches = []
    for start in range(0, len(ordered), size):
        group = ordered[start:start + size]
        width = max(len(ids) for ids in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, sequence in enumerate(group):
            ids[row, :len(sequence)], mask[row, :len(sequence)] = sequence, 1
        batches.append((ids, mask))
    return batches


def _disable_kv_cache_quantizers(model: torch.nn.Module) -> None:
    """Turn a model calibrated with an FP8 KV cache into the same model without one (the other quantizers'
    statistics come from the unquantized forward pass, so they do not depend on it). Their calibrated ranges go too:
    the exports read a KV range as an FP8 KV cache."""
    for name, module in model.named_modules():
        if name.endswith(("k_bmm_quantizer", "v_bmm_quantizer")):
            module.disable()
            module.reset_amax()


def _is_linear_quantizer(name: str, layer: int | None = None) -> bool:
    """A weight or input quantizer of a decoder layer's linear layers (of `layer`, or of any layer); the KV cache's
    quantizers are not."""
    inside = f".layers.{layer}." in name if layer is not None else ".layers." in name
    return inside and name.endswith(("weight_quantizer", "input_quantizer"))


def layer_sensitivity(model: torch.nn.Module, sequences: list[torch.Tensor], reference: TokenScores,
                      thresholds: GateThresholds) -> list[dict]:
    """The gate's measures with one decoder layer's linear layers quantized at a time (Model Optimizer's simulated
    quantization of the calibrated model; the KV cache as calibrated), on calibration sequences. Leaves every
    quantizer enabled again."""
    import modelopt.torch.quantization as mtq

    device = next(model.parameters()).device
    results = []
    mtq.disable_quantizer(model, _is_linear_quantizer)
    try:
        for layer in range(model.config.num_hidden_layers):
            mtq.enable_quantizer(model, lambda name: _is_linear_quantizer(name, layer))
            scores = score_sequences(lambda ids: model(ids.to(device)).logits, sequences)
            agreement, increase, _ = compare_scores(scores, reference, thresholds)
            results.append({"layer": layer, "top1_agreement": agreement, "perplexity_increase": increase})
            mtq.disable_quantizer(model, lambda name: _is_linear_quantizer(name, layer))
    finally:
        mtq.enable_quantizer(model, _is_linear_quantizer)
    return results


def agreement_margin(agreement: float, tokens: int) -> float:
    """SCAN_MARGIN_STANDARD_ERRORS standard errors of a greedy agreement measured on `tokens` positions."""
    return SCAN_MARGIN_STANDARD_ERRORS * math.sqrt(agreement * (1 - agreement) / tokens)


def keep_sensitive_layers(model: torch.nn.Module, sequences: list[torch.Tensor], reference: TokenScores,
                          thresholds: GateThresholds) -> dict:
    """Leave the most sensitive decoder layers unquantized: rank them by the sensitivity scan (lowest agreement
    first), then disable the quantizers of the top 1, 2, ... until the simulated model passes the thresholds on the
    calibration sequences, its agreement by `agreement_margin` (at most MAX_EXCLUDED_LAYER_SHARE of the layers).
    Returns the scan and the choice."""
    import modelopt.torch.quantization as mtq

    device = next(model.parameters()).device
    scan = layer_sensitivity(model, sequences, reference, thresholds)
    ranked = [row["layer"] for row in sorted(scan, key=lambda row: (row["top1_agreement"],
                                                                     -row["perplexity_increase"]))]
    limit = max(1, int(len(ranked) * MAX_EXCLUDED_LAYER_SHARE))
    trials = []
    for layer in ranked[:limit]:
        mtq.disable_quantizer(model, lambda name: _is_linear_quantizer(name, layer))
        scores = score_sequences(lambda ids: model(ids.to(device)).logits, sequences)
        agreement, increase, failures = compare_scores(scores, reference, thresholds)
        margin = agreement_margin(agreement, scores.tokens)
        trials.append({"excluded_layers": sorted(ranked[:len(trials) + 1]), "top1_agreement": agreement,
                       "perplexity_increase": increase, "agreement_margin": margin})
        if not failures and agreement - margin >= thresholds.min_top1_agreement:
            break
    return {"scan": scan, "trials": trials, "excluded_layers": trials[-1]["excluded_layers"],
            "scan_prompts": len(sequences)}


def exclude_modules(excluded_layers: list[int], naming: str) -> list[str]:
    """The exact module names a checkpoint's exclude_modules lists: lm_head and every linear layer of the excluded
    decoder layers, in TensorRT-LLM ("trtllm") or Hugging Face ("hf") naming. Exact names, not Model Optimizer's
    `transformer.layers.1*`, which TensorRT-LLM's fnmatch would also apply to layers 10-19."""
    names = ["lm_head"] + (["model.embed_tokens"] if naming == "hf" else [])
    for layer in sorted(excluded_layers):
        for linear, hf_names in HF_LINEARS.items():
            names += ([f"transformer.layers.{layer}.{linear}"] if naming == "trtllm"
                      else [f"model.layers.{layer}.{name}" for name in hf_names])
    return names


def export_checkpoints(model: torch.nn.Module, checkpoint_dir: Path, hf_fp8_dir: Path | None, source_dir: Path,
                       excluded_layers: list[int] | None = None) -> None:
    """Write the TensorRT-LLM checkpoint (config.json + rank0.safetensors) and, unless hf_fp8_dir is None, the FP8
    Hugging Face checkpoint; with excluded layers, both configs list them by exact module name."""
    from modelopt.torch.export import export_hf_checkpoint

    # TensorRT-LLM first: it gives fused layers (q/k/v, gate/up) one shared scale in place, and the HF export then
    # replaces the weights by FP8 tensors in place, after which the model no longer runs.
    export_trtllm_checkpoint(model, checkpoint_dir)
    if excluded_layers:
        _set_exclude_modules(checkpoint_dir / CHECKPOINT_CONFIG, exclude_modules(excluded_layers, "trtllm"))
    if hf_fp8_dir is None:
        return
    # dtype float32: Model Optimizer quantizes the HF weights in the export dtype, and dividing bf16 weights by their
    # scale in bf16 rounds twice (measured: ~2.5% of the FP8 weights one step off the TensorRT-LLM checkpoint's).
    # Unquantized tensors keep the model's bf16.
    export_hf_checkpoint(model, dtype=torch.float32, export_dir=hf_fp8_dir)
    if excluded_layers:
        _set_exclude_modules(hf_fp8_dir / HF_QUANT_CONFIG, exclude_modules(excluded_layers, "hf"))
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, hf_fp8_dir / name)


def _set_exclude_modules(config_file: Path, names: list[str]) -> None:
    config = json.loads(config_file.read_text())
    config["quantization"]["exclude_modules"] = names
    config_file.write_text(json.dumps(config, indent=4) + "\n")


def expected_quantization(recipe: Fp8Recipe, excluded_layers: list[int], model_config=None) -> dict:
    """The `quantization` block a recipe's TensorRT-LLM checkpoint must carry (what trtllm-build reads); INT4 AWQ
    (needs `model_config`) adds its group size, no zero point and the pre-quant scales."""
    awq = ({"group_size": awq_group_size(model_config), "has_zero_point": False, "pre_quant_scale": True}
           if recipe.quant_algo == W4A16_AWQ else {})
    return {"quant_algo": recipe.quant_algo, "kv_cache_quant_algo": "FP8" if recipe.kv_cache_fp8 else None, **awq,
            "exclude_modules": exclude_modules(excluded_layers, "trtllm")}


def config_mismatches(checkpoint_config: dict, source_config, quantization: dict) -> list[str]:
    """Where the exported TensorRT-LLM config disagrees with the source model's config or with the expected
    `quantization` block (missing keys included)."""
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
        "norm_epsilon": source_config.rms_norm_eps,
        "rotary_base": source_config.rope_theta,
        "rotary_scaling": source_config.rope_scaling,
        **({"rope_local_base_freq": source_config.rope_local_base_freq}
           if architecture_of(source_config).has_local_rope else {}),
        **{f"quantization.{key}": value for key, value in quantization.items()},
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
    return mismatches + architecture_mismatches(checkpoint_config, source_config)


def architecture_mismatches(checkpoint_config: dict, source_config) -> list[str]:
    """Where the rebuild's reading of the checkpoint config (fp8_verify.checkpoint_architecture: what trtllm-build
    will build) differs from the ONNX graph's reading of the source config (architecture.architecture_of): the
    activation, norms, embedding and attention scales, soft-capping, and each layer's window and RoPE."""
    try:
        rebuilt = checkpoint_architecture(checkpoint_config)
    except BuildError as error:
        return [str(error)]
    source = architecture_of(source_config)
    mismatches = []
    for fact in ARCHITECTURE_FACTS:
        got, want = getattr(rebuilt, fact), getattr(source, fact)
        same = math.isclose(got, want, rel_tol=1e-6) if isinstance(got, float) and isinstance(want, float) \
            else got == want
        if not same:
            mismatches.append(f"{fact} = {got!r} as the checkpoint config reads, source model: {want!r}")
    return mismatches


def hf_export_mismatches(hf_fp8_dir: Path, checkpoint_tensors: dict[str, torch.Tensor], layers: int,
                         quant_algo: str = PER_TENSOR) -> list[str]:
    """Where the FP8 Hugging Face checkpoint differs from the TensorRT-LLM checkpoint: both must hold the same model,
    FP8 weights bit for bit with the same scales (fused q/k/v and gate/up sharing per-tensor scales), unquantized
    layers with the same bf16 weights."""
    hf = {}
    for shard in sorted(Path(hf_fp8_dir).glob("*.safetensors")):
        hf.update(load_file(shard))
    mismatches = []
    for layer in range(layers):
        for trt_name, hf_names in HF_LINEARS.items():
            trt_prefix, hf_prefixes = f"transformer.layers.{layer}.{trt_name}", [
                f"model.layers.{layer}.{name}" for name in hf_names]
            try:
                trt_weight = checkpoint_tensors[f"{trt_prefix}.weight"]
                hf_weight = torch.cat([hf[f"{p}.weight"] for p in hf_prefixes])
                quantized = trt_weight.dtype == FP8_DTYPE
                if hf_weight.dtype != trt_weight.dtype or not torch.equal(
                        hf_weight.view(torch.uint8) if quantized else hf_weight, trt_weight.view(torch.uint8)
                        if quantized else trt_weight):
                    mismatches.append(f"{hf_fp8_dir.name}: weights of {', '.join(hf_prefixes)} ({hf_weight.dtype}) "
                                      f"differ from {trt_prefix}.weight ({trt_weight.dtype})")
                for trt_scale, hf_scale in (HF_SCALES[quant_algo].items() if quantized else ()):
                    want = checkpoint_tensors[f"{trt_prefix}.{trt_scale}"].reshape(-1)
                    got = [hf[f"{prefix}.{hf_scale}"].reshape(-1) for prefix in hf_prefixes]
                    # Per-tensor: each fused projection repeats the shared scale; per channel: rows concatenate.
                    same = (torch.equal(torch.cat(got), want) if want.numel() > 1
                            else all(torch.equal(scale, want) for scale in got))
                    if not same:
                        mismatches.append(f"{hf_fp8_dir.name}: {hf_scale} of {', '.join(hf_prefixes)} differs from "
                                          f"{trt_prefix}.{trt_scale}")
            except KeyError as missing:
                mismatches.append(f"{hf_fp8_dir.name}: tensor {missing} is missing")
    return mismatches


def build_fp8(hf_dir: Path, out_dir: Path, calib_file: Path | None, calib_size: int, kv_cache_fp8: bool | None,
              gate: GateThresholds, console: Console | None = None,
              recipes: list[Fp8Recipe] | None = None, quant: str = "fp8", stop_early: bool = True,
              reference_cache: Path | None = None) -> Fp8Result:
    """Search the recipes (default: `select_recipes(kv_cache_fp8, quant=quant)`) for the model in `hf_dir`, in order;
    publish the first whose checkpoint passes the gate as `out_dir`, with every attempt in its report.

    `stop_early`: a recipe's gate stops once it provably cannot pass (the report says why; the gate itself is the
    same). `reference_cache`: a folder keeping the float32 reference scores between builds (keyed by the model's
    content and the token ids scored); None computes them every time.

    Raises BuildError (and publishes nothing) on bad calibration input, an unsupported model, an export inconsistent
    with the source, or when no recipe passes; the report of all attempts is then kept as
    `<out_dir>.rejected-gate-report.json`.
    """
    with torch_threads_for_load(console):
        return _search(hf_dir, out_dir, calib_file, calib_size, kv_cache_fp8, gate, console, recipes, quant,
                       stop_early, reference_cache)


def _search(hf_dir: Path, out_dir: Path, calib_file: Path | None, calib_size: int, kv_cache_fp8: bool | None,
            gate: GateThresholds, console: Console | None, recipes: list[Fp8Recipe] | None, quant: str,
            stop_early: bool, reference_cache: Path | None) -> Fp8Result:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    console = console or Console(stderr=True)
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    gate.validate()
    recipes = list(recipes) if recipes is not None else select_recipes(kv_cache_fp8, quant=quant)
    if not recipes:
        raise BuildError(f"no recipe to try; allowed: {', '.join(RECIPE_NAMES)}")
    calibration = load_prompts(calib_file or DEFAULT_CALIBRATION_FILE, calib_size)
    heldout = load_prompts(HELDOUT_FILE)
    source_config = AutoConfig.from_pretrained(hf_dir)
    try:
        check_exportable(source_config)
    except BuildError as error:
        raise BuildError(f"{hf_dir}: {error}") from None
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    calibration_ids = tokenize_prompts(tokenizer, calibration)
    heldout_ids = tokenize_prompts(tokenizer, heldout)
    scan_ids = calibration_ids[:SCAN_PROMPTS]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def reference_model():
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval().to(device)

    reference, scan_reference = reference_scores(reference_model, hf_dir, [heldout_ids, scan_ids], reference_cache)
    context = {"source": str(hf_dir), "reference": "source model, float32",
               "calibration_file": str(calib_file or DEFAULT_CALIBRATION_FILE),
               "calibration_prompts": len(calibration_ids), "heldout_file": str(HELDOUT_FILE)}

    def bf16_model() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval().to(device)

    calibrated: dict[str, torch.nn.Module] = {}  # quant algo -> calibrated model, shared by its recipes
    attempts = []
    with atomic_dir(out_dir) as staging:  # an earlier build in out_dir is replaced only by a whole new one
        for recipe in recipes:
            attempt_dir = staging / recipe.name
            attempt_dir.mkdir()
            with _modelopt_output(attempt_dir / MODELOPT_LOG):
                if recipe.quant_algo not in calibrated:
                    console.print(f"calibration ({recipe.quant_algo}) on {len(calibration_ids)} prompts from "
                                  f"{calib_file or 'the default set'}")
                    calibrated[recipe.quant_algo] = model = bf16_model()
                    # With the KV cache quantizers when any recipe of this algo wants them; the others turn them off.
                    calibrate_fp8(model, calibration_ids, any(r.kv_cache_fp8 for r in recipes
                                                              if r.quant_algo == recipe.quant_algo), recipe.quant_algo)
                model = copy.deepcopy(calibrated[recipe.quant_algo])  # the export changes the model in place
                if not recipe.kv_cache_fp8:
                    _disable_kv_cache_quantizers(model)
                console.print(f"recipe {recipe.name}: export and gate")
                report, sensitivity = _attempt(recipe, model, hf_dir, attempt_dir, source_config, scan_ids,
                                               scan_reference, heldout_ids, reference, gate, device, stop_early)
            del model
            console.print(report.table())
            attempts.append({"recipe": recipe.name, "passed": report.passed, "failures": report.failures,
                             "stopped_early": report.stopped_early, "scored_tokens": report.tokens,
                             "top1_agreement": report.top1_agreement,
                             "perplexity_increase": report.perplexity_increase, "quant_algo": report.quant_algo,
                             "kv_cache_quant_algo": report.kv_cache_quant_algo,
                             "exclude_modules": report.exclude_modules, "gate_seconds": round(report.seconds, 1),
                             **({"sensitivity": sensitivity} if sensitivity else {})})
            if report.passed:
                break
            shutil.rmtree(attempt_dir)
        calibrated.clear()
        report.extra = {**context, "recipe": recipe.name, "search": attempts}
        if not report.passed:
            rejected = out_dir.with_name(f"{out_dir.name}.rejected-gate-report.json")
            rejected.write_text(json.dumps({"passed": False, "thresholds": asdict(gate), **context,
                                            "search": attempts}, indent=2) + "\n")
            tried = "; ".join(f"{a['recipe']}: {a['top1_agreement']:.2%} / {a['perplexity_increase']:+.2%}"
                              + (" (stopped early)" if a["stopped_early"] else "") for a in attempts)
            raise BuildError(f"no {quant} recipe passed the accuracy gate (top-1 agreement / perplexity increase: "
                             f"{tried}); nothing was published to {out_dir}. Report: {rejected}. Try "
                             f"production-like calibration prompts (--calib), or keep this model in bf16.")
        for name in (CHECKPOINT_DIR, HF_FP8_DIR, MODELOPT_LOG):
            if (attempt_dir / name).exists():
                (attempt_dir / name).rename(staging / name)
        attempt_dir.rmdir()
        report.checkpoint = str(out_dir / CHECKPOINT_DIR)
        report.write_json(staging / REPORT_FILE)
    hf_fp8_dir = out_dir / HF_FP8_DIR
    return Fp8Result(out_dir=out_dir, checkpoint_dir=out_dir / CHECKPOINT_DIR,
                     hf_fp8_dir=hf_fp8_dir if hf_fp8_dir.is_dir() else None, report_path=out_dir / REPORT_FILE,
                     report=report)


def reference_scores(load_model, hf_dir: Path, sequence_sets: list[list[torch.Tensor]],
                     cache: Path | None) -> list[TokenScores]:
    """The float32 reference's scores of each set of sequences. With `cache`, each set's are kept there under a key of
    the model folder's content and the set's token ids, so a later build of the same model and prompts skips the
    reference model (on 2 busy CPU cores it takes minutes)."""
    model_key = content_key(hf_dir) if cache else ""
    results: list[TokenScores | None] = []
    files: list[Path | None] = []
    for sequences in sequence_sets:
        digest = hashlib.sha256(model_key.encode())
        for ids in sequences:
            digest.update(ids.numpy().tobytes() + b"|")
        file = cache / f"reference-scores-{digest.hexdigest()[:24]}.safetensors" if cache else None
        files.append(file)
        results.append(TokenScores.from_tensors(load_file(file)) if file is not None and file.is_file() else None)
    if any(scores is None for scores in results):
        model = load_model()
        for index, sequences in enumerate(sequence_sets):
            if results[index] is None:
                results[index] = score_sequences(lambda ids: model(ids.to(model.device)).logits, sequences)
                if files[index] is not None:
                    files[index].parent.mkdir(parents=True, exist_ok=True)
                    partial = files[index].with_suffix(".partial")
                    save_file(results[index].to_tensors(), partial)
                    partial.replace(files[index])
    return results


def _attempt(recipe: Fp8Recipe, model: torch.nn.Module, hf_dir: Path, attempt_dir: Path, source_config, scan_ids,
             scan_reference: TokenScores, heldout_ids, reference: TokenScores, gate: GateThresholds,
             device: str, stop_early: bool) -> tuple[GateReport, dict | None]:
    """(Scan,) export, check and gate one recipe's calibrated model into attempt_dir. An export inconsistent with
    the source raises BuildError: that is a broken export, not an accuracy miss for the search to step over."""
    checkpoint_dir = attempt_dir / CHECKPOINT_DIR
    # The FP8 Hugging Face checkpoint is an FP8 artifact; INT4 AWQ ships the TensorRT-LLM checkpoint only.
    hf_fp8_dir = attempt_dir / HF_FP8_DIR if recipe.quant_algo in HF_SCALES else None
    sensitivity = None
    if recipe.keep_sensitive_layers:
        sensitivity = keep_sensitive_layers(model, scan_ids, scan_reference, gate)
    excluded = sensitivity["excluded_layers"] if sensitivity else []
    export_checkpoints(model, checkpoint_dir, hf_fp8_dir, hf_dir, excluded)

    checkpoint_config = read_checkpoint_config(checkpoint_dir)
    tensors = load_file(checkpoint_dir / CHECKPOINT_WEIGHTS)
    problems = config_mismatches(checkpoint_config, source_config,
                                 expected_quantization(recipe, excluded, source_config))
    problems += checkpoint_tensor_problems(checkpoint_config, tensors)
    if hf_fp8_dir is not None:
        problems += hf_export_mismatches(hf_fp8_dir, tensors, source_config.num_hidden_layers, recipe.quant_algo)
    if problems:
        raise BuildError(f"the export ({recipe.name}) of {hf_dir} is inconsistent with the source model, "
                         f"refused:\n  " + "\n  ".join(problems))
    report = run_gate(CheckpointModel(checkpoint_dir, device=device), heldout_ids, reference, gate, stop_early)
    return report, sensitivity


@contextlib.contextmanager
def torch_threads_for_load(console: Console | None = None) -> Iterator[int]:
    """torch's intra-op threads for the duration: every core on a quiet machine, one while the 1-minute load average
    is at or above the core count. Measured here (2 cores, load ~11 from other builds): a 100-token SmolLM2 forward
    took 8-12 s with 2 threads and 0.8-1.0 s with 1 (its OpenMP workers wait on each other's descheduled threads)."""
    import os

    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    threads = cores if load < cores else 1
    previous = torch.get_num_threads()
    if console is not None and threads != previous:
        console.print(f"torch threads: {threads} (load average {load:.1f} on {cores} cores)")
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


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

