"""TensorRT-LLM path on a tiny random Gemma 3 (support.TINY_GEMMA3: a 4-token window on layer 0, full attention on
layer 1, soft-capped logits): Model Optimizer's Gemma 3 checkpoint, its config against the source and what
trtllm-build reads, the rebuild against transformers' Gemma3ForCausalLM, the FP8 gate, INT4 AWQ, and refusals by
name."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from support import TINY_GEMMA3, save_tiny_gemma3

from tritonllm.builders.errors import BuildError
from tritonllm.builders.fp8 import (CHECKPOINT_DIR, HELDOUT_FILE, HF_FP8_DIR, RECIPES, calibrate_fp8,
                                    config_mismatches, expected_quantization, export_checkpoints,
                                    hf_export_mismatches, load_prompts, tokenize_prompts)
from tritonllm.builders.fp8_verify import (FP8_DTYPE, LAYER_LINEARS, CheckpointModel, GateThresholds,
                                           checkpoint_tensor_problems, run_gate, score_sequences)
from tritonllm.builders.trtllm_export import check_exportable, export_trtllm_checkpoint

LAYERS = len(TINY_GEMMA3["layer_types"])


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="module")
def gemma3_ids(gemma3_dir):
    """The first 8 held-out prompts (13-190 tokens: every one longer than the window)."""
    from transformers import AutoTokenizer

    return tokenize_prompts(AutoTokenizer.from_pretrained(gemma3_dir), load_prompts(HELDOUT_FILE)[:8])


def _bf16_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="module")
def bf16_checkpoint(gemma3_dir, tmp_path_factory):
    """The unquantized bf16 checkpoint, and the bf16 model it was exported from."""
    model = _bf16_model(gemma3_dir)
    folder = tmp_path_factory.mktemp("gemma3-bf16") / CHECKPOINT_DIR
    export_trtllm_checkpoint(model, folder)
    return folder, model


def test_checkpoint_config_carries_what_trtllm_build_reads_for_gemma3(bf16_checkpoint, gemma3_dir):
    from transformers import AutoConfig

    folder, _ = bf16_checkpoint
    config = json.loads((folder / "config.json").read_text())
    # TensorRT-LLM's GemmaConfig: layer i is sliding unless (i + 1) % _sliding_window_pattern == 0.
    assert {key: config[key] for key in ("architecture", "decoder", "_sliding_window_pattern", "sliding_window",
                                         "query_pre_attn_scalar", "rope_local_base_freq", "final_logit_softcapping",
                                         "rotary_base", "inter_layernorms", "share_embedding_table")} == {
        "architecture": "Gemma3ForCausalLM", "decoder": "gemma3", "_sliding_window_pattern": 2, "sliding_window": 4,
        "query_pre_attn_scalar": 32, "rope_local_base_freq": 10.0, "final_logit_softcapping": 3.0,
        "rotary_base": 100000.0, "inter_layernorms": True, "share_embedding_table": True}
    source = AutoConfig.from_pretrained(gemma3_dir)
    unquantized = {"quant_algo": None, "kv_cache_quant_algo": None}
    assert config_mismatches(config, source, unquantized) == []

    tensors = load_file(folder / "rank0.safetensors")
    assert "lm_head.weight" not in tensors  # shared with the embedding, as TensorRT-LLM's Gemma requires
    state = _bf16_model(gemma3_dir).state_dict()
    # Every Gemma RMSNorm is stored as the multiplier 1 + w (exact here: the helper draws w on that bf16 grid).
    for trt, hf in (("input_layernorm", "input_layernorm"), ("post_layernorm", "post_attention_layernorm"),
                    ("pre_feedforward_layernorm", "pre_feedforward_layernorm"),
                    ("post_feedforward_layernorm", "post_feedforward_layernorm"),
                    ("attention.q_layernorm", "self_attn.q_norm"), ("attention.k_layernorm", "self_attn.k_norm")):
        assert torch.equal(tensors[f"transformer.layers.0.{trt}.weight"].float(),
                           1.0 + state[f"model.layers.0.{hf}.weight"].float()), trt

    # A config the engine would read differently from the source is caught, fact by fact.
    shifted = {**config, "_sliding_window_pattern": 1, "query_pre_attn_scalar": 16}
    assert config_mismatches(shifted, source, unquantized) == [
        "attention_scale = 0.25 as the checkpoint config reads, source model: 0.1767766952966369",
        "windows = (None, None) as the checkpoint config reads, source model: (4, None)",
        "local_rope = (False, False) as the checkpoint config reads, source model: (True, False)"]


def test_bf16_rebuild_matches_transformers_gemma3(bf16_checkpoint, gemma3_ids):
    """The bf16 checkpoint rebuilt in float32 gives the float32 logits of the bf16 model it was exported from."""
    folder, model = bf16_checkpoint
    rebuilt = CheckpointModel(folder, compute_dtype=torch.float32)
    float_model = copy.deepcopy(model).float()  # the bf16 weights the checkpoint holds, computed in float32
    for sequence in gemma3_ids[:3]:
        ids = sequence.unsqueeze(0)
        with torch.no_grad():
            expected = float_model(ids).logits
        got = rebuilt.logits(ids)
        assert ids.shape[1] > 2 * TINY_GEMMA3["sliding_window"]
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_fp8_checkpoint_structure_and_gate(gemma3_dir, gemma3_ids, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    import modelopt.torch.quantization as mtq

    model = _bf16_model(gemma3_dir)
    calibrate_fp8(model, gemma3_ids, kv_cache_fp8=True)
    mtq.disable_quantizer(model, lambda name: ".layers.1." in name and name.endswith(("weight_quantizer",
                                                                                      "input_quantizer")))
    export_checkpoints(model, tmp_path / CHECKPOINT_DIR, tmp_path / HF_FP8_DIR, gemma3_dir, excluded_layers=[1])
    config = json.loads((tmp_path / CHECKPOINT_DIR / "config.json").read_text())
    tensors = load_file(tmp_path / CHECKPOINT_DIR / "rank0.safetensors")
    recipe = RECIPES["fp8"][2]  # fp8-mixed+fp8-kv: FP8 GEMMs and KV cache, layer 1 kept in bf16
    assert config["quantization"] == expected_quantization(recipe, [1])
    assert config_mismatches(config, AutoConfig.from_pretrained(gemma3_dir), expected_quantization(recipe, [1])) == []
    assert checkpoint_tensor_problems(config, tensors) == []
    assert hf_export_mismatches(tmp_path / HF_FP8_DIR, tensors, LAYERS) == []
    for linear in LAYER_LINEARS:
        quantized, kept = f"transformer.layers.0.{linear}", f"transformer.layers.1.{linear}"
        assert tensors[f"{quantized}.weight"].dtype == FP8_DTYPE
        for scale in ("weights_scaling_factor", "activation_scaling_factor"):
            assert tensors[f"{quantized}.{scale}"].dtype == torch.float32 and tensors[f"{quantized}.{scale}"] > 0
        assert tensors[f"{kept}.weight"].dtype == torch.bfloat16 and f"{kept}.weights_scaling_factor" not in tensors
    for layer in range(LAYERS):
        assert tensors[f"transformer.layers.{layer}.attention.kv_cache_scaling_factor"].item() > 0
        assert tensors[f"transformer.layers.{layer}.attention.q_layernorm.weight"].dtype == torch.bfloat16

    reference_model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    reference = score_sequences(lambda ids: reference_model(ids).logits, gemma3_ids)
    report = run_gate(CheckpointModel(tmp_path / CHECKPOINT_DIR), gemma3_ids, reference,
                      GateThresholds(min_top1_agreement=0.5, max_perplexity_increase=0.5))
    assert report.passed, report.failures
    assert report.tokens == sum(len(ids) - 1 for ids in gemma3_ids)


def test_unsupported_gemma3_features_are_refused_by_name(bf16_checkpoint, tmp_path):
    from transformers import Gemma3TextConfig

    folder, _ = bf16_checkpoint
    config = json.loads((folder / "config.json").read_text())
    # Gemma 3 4B and larger scale the RoPE of their full layers: not rebuilt here.
    scaled = shutil.copytree(folder, tmp_path / "scaled")
    (scaled / "config.json").write_text(json.dumps({**config, "rotary_scaling": {"rope_type": "linear",
                                                                                  "factor": 8.0}}))
    with pytest.raises(BuildError, match=r"rotary_scaling = \{'rope_type': 'linear', 'factor': 8.0\} is not "
                                         r"supported for Gemma3ForCausalLM"):
        CheckpointModel(scaled)
    (scaled / "config.json").write_text(json.dumps({key: value for key, value in config.items()
                                                    if key != "_sliding_window_pattern"}))
    with pytest.raises(BuildError, match="_sliding_window_pattern missing"):
        CheckpointModel(scaled)

    # Layer types no _sliding_window_pattern describes are refused before any calibration.
    irregular = Gemma3TextConfig(num_hidden_layers=3, layer_types=["full_attention", "sliding_attention",
                                                                   "full_attention"],
                                 architectures=["Gemma3ForCausalLM"])
    with pytest.raises(BuildError, match="full attention on every _sliding_window_pattern-th layer only"):
        check_exportable(irregular)
    capped = Gemma3TextConfig(attn_logit_softcapping=50.0, architectures=["Gemma3ForCausalLM"])
    with pytest.raises(BuildError, match="attn_logit_softcapping = 50.0 is not supported"):
        check_exportable(capped)
    scaled_source = Gemma3TextConfig(rope_scaling={"rope_type": "linear", "factor": 8.0},
                                     architectures=["Gemma3ForCausalLM"])
    with pytest.raises(BuildError, match="rope_scaling = .*'factor': 8.0.* is not supported on the TensorRT-LLM path"):
        check_exportable(scaled_source)


def test_int4_awq_checkpoint_rebuilds_model_optimizers_fake_quantized_gemma3(gemma3_dir, gemma3_ids, tmp_path):
    """The W4A16 AWQ path on the same layout: packed int4 weights with their group and pre-quant scales, rebuilt
    like Model Optimizer's own fake-quantized model."""
    from transformers import AutoConfig

    model = _bf16_model(gemma3_dir)
    calibrate_fp8(model, gemma3_ids, kv_cache_fp8=False, quant_algo="W4A16_AWQ")
    export_checkpoints(model, tmp_path / CHECKPOINT_DIR, None, gemma3_dir)
    with torch.no_grad():  # after the export: fused layers share their pre-quant scales in place
        simulated = model(gemma3_ids[0].unsqueeze(0)).logits.float()
    config = json.loads((tmp_path / CHECKPOINT_DIR / "config.json").read_text())
    tensors = load_file(tmp_path / CHECKPOINT_DIR / "rank0.safetensors")
    source = AutoConfig.from_pretrained(gemma3_dir)
    expected = expected_quantization(RECIPES["int4_awq"][1], [], source)
    assert config["quantization"] == expected and expected["group_size"] == 64  # divides hidden, heads x head_dim
    assert config_mismatches(config, source, expected) == []
    assert checkpoint_tensor_problems(config, tensors) == []
    logits = CheckpointModel(tmp_path / CHECKPOINT_DIR).logits(gemma3_ids[0].unsqueeze(0))
    assert (logits.argmax(-1) == simulated.argmax(-1)).float().mean() > 0.95
    assert ((logits - simulated).abs().max() / simulated.abs().max()).item() < 0.05
