"""INT4 AWQ (W4A16) for the TensorRT-LLM path on a tiny random Llama (SmolLM2's tokenizer): Model Optimizer's
INT4_AWQ_CFG calibration and TensorRT-LLM export, the checkpoint's structure, the rebuild the gate scores against
Model Optimizer's own fake-quantized model, and a damaged checkpoint refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tritonllm.builders.errors import BuildError
from tritonllm.builders.fp8 import (CHECKPOINT_DIR, HF_FP8_DIR, REPORT_FILE, RECIPES, awq_group_size, build_fp8,
                                    calibrate_fp8, expected_quantization, export_checkpoints)
from tritonllm.builders.fp8_verify import (W4A16_AWQ, CheckpointModel, GateThresholds, Int4AwqLinear,
                                           checkpoint_tensor_problems, run_gate, score_sequences, unpack_int4)

LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


def test_unpack_int4_inverts_model_optimizers_packing():
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    values = torch.randint(-8, 8, (6, 8)).float()
    packed = pack_int4_in_uint8(values, torch.ones(6, 2), block_size=4)
    assert packed.shape == (3, 8)
    assert torch.equal(unpack_int4(packed.view(torch.int8)), values.to(torch.int8))


def test_group_size_divides_every_input_width(tiny_llama_dir):
    from transformers import AutoConfig

    assert awq_group_size(AutoConfig.from_pretrained(tiny_llama_dir)) == 64  # hidden 64
    smollm2_like = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9)
    assert awq_group_size(smollm2_like) == 64  # 576 = 4.5 x 128
    with pytest.raises(BuildError, match="no INT4 AWQ group size"):
        awq_group_size(AutoConfig.for_model("llama", hidden_size=96, intermediate_size=256, num_attention_heads=4))


@pytest.fixture(scope="module")
def awq_export(tiny_llama_dir, heldout_ids, tmp_path_factory):
    """Calibrated once with INT4_AWQ_CFG (and the FP8 KV cache), exported; with Model Optimizer's fake-quantized
    logits of one held-out prompt, taken after the export (the TensorRT-LLM export shares pre-quant scales of fused
    layers in place)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("awq-export")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    calibrate_fp8(model, heldout_ids[:8], kv_cache_fp8=True, quant_algo=W4A16_AWQ)
    export_checkpoints(model, out / CHECKPOINT_DIR, None, tiny_llama_dir)
    with torch.no_grad():
        simulated = model(heldout_ids[0].unsqueeze(0)).logits.float()
    return out / CHECKPOINT_DIR, simulated


def test_awq_checkpoint_structure(awq_export, tiny_llama_dir):
    from transformers import AutoConfig

    checkpoint, _ = awq_export
    config = json.loads((checkpoint / "config.json").read_text())
    tensors = load_file(checkpoint / "rank0.safetensors")
    recipe = RECIPES["int4_awq"][0]
    assert config["quantization"] == expected_quantization(recipe, [], AutoConfig.from_pretrained(tiny_llama_dir)) \
        == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": "FP8", "group_size": 64, "has_zero_point": False,
            "pre_quant_scale": True, "exclude_modules": ["lm_head"]}
    assert checkpoint_tensor_problems(config, tensors) == []
    for layer in range(2):
        for linear in LINEARS:
            name = f"transformer.layers.{layer}.{linear}"
            weight, scales = tensors[f"{name}.weight"], tensors[f"{name}.weights_scaling_factor"]
            assert weight.dtype == torch.int8  # two int4 per byte
            assert scales.dtype == torch.float32 and scales.shape == (2 * weight.shape[0], weight.shape[1] // 64)
            assert (scales > 0).all() and (tensors[f"{name}.prequant_scaling_factor"] > 0).all()
    assert tensors["lm_head.weight"].dtype == torch.bfloat16  # excluded, really unquantized
    assert not (checkpoint.parent / HF_FP8_DIR).exists()


def test_rebuild_matches_model_optimizers_fake_quantized_model(awq_export, heldout_ids):
    checkpoint, simulated = awq_export
    rebuilt = CheckpointModel(checkpoint)
    assert isinstance(rebuilt.layers[0].linears["mlp.proj"], Int4AwqLinear)
    logits = rebuilt.logits(heldout_ids[0].unsqueeze(0))
    assert (logits.argmax(-1) == simulated.argmax(-1)).float().mean() > 0.95
    assert ((logits - simulated).abs().max() / simulated.abs().max()).item() < 0.05


def test_damaged_awq_checkpoint_is_refused(awq_export, heldout_ids, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint, _ = awq_export
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    reference = score_sequences(lambda ids: model(ids).logits, heldout_ids)
    good = run_gate(CheckpointModel(checkpoint), heldout_ids, reference, GateThresholds())
    assert good.passed, good.failures

    damaged = shutil.copytree(checkpoint, tmp_path / "damaged")
    tensors = load_file(damaged / "rank0.safetensors")
    for name in [n for n in tensors if n.endswith("weights_scaling_factor")]:
        tensors[name] = tensors[name] * 100
    save_file(tensors, damaged / "rank0.safetensors")
    report = run_gate(CheckpointModel(damaged), heldout_ids, reference, GateThresholds(), stop_early=True)
    assert not report.passed and report.stopped_early and report.top1_agreement < 0.5

    tensors["transformer.layers.0.mlp.fc.prequant_scaling_factor"][5] = -1.0
    dense = "transformer.layers.1.attention.dense.weight"
    tensors[dense] = tensors[dense][:, :32].contiguous()
    save_file(tensors, damaged / "rank0.safetensors")
    with pytest.raises(BuildError) as error:
        CheckpointModel(damaged)
    assert "transformer.layers.0.mlp.fc.prequant_scaling_factor = -1.0, expected positive" in str(error.value)
    assert "transformer.layers.1.attention.dense: quantization.group_size = 64 does not divide its 32 input " \
           "channels" in str(error.value)


def test_int4_awq_search_publishes_the_first_passing_recipe(tiny_llama_dir, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"prompt": f"Question {i}: what is {i} + {i}?"}) for i in range(8)) + "\n")
    result = build_fp8(tiny_llama_dir, tmp_path / "awq", calib, 8, None, GateThresholds(), quant="int4_awq")
    report = json.loads((tmp_path / "awq" / REPORT_FILE).read_text())
    assert result.report.passed and result.hf_fp8_dir is None
    assert report["quant_algo"] == "W4A16_AWQ" and report["extra"]["recipe"] == "int4-awq+fp8-kv"
    assert [a["recipe"] for a in report["extra"]["search"]] == ["int4-awq+fp8-kv"]
    assert "int4 weights (groups of 64)" in report["gemm"]
