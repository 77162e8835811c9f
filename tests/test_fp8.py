"""FP8 path on a tiny random Llama (SmolLM2's tokenizer and vocabulary): Model Optimizer calibration and export,
checks against the source model, the FP8 GEMM rebuild, and the accuracy gate."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tritonllm.builders.errors import BuildError
from tritonllm.builders.fp8 import (CHECKPOINT_DIR, HF_FP8_DIR, HELDOUT_FILE, RECIPES, REPORT_FILE, agreement_margin,
                                    build_fp8, calibrate_fp8, config_mismatches, expected_quantization,
                                    export_checkpoints, hf_export_mismatches, load_prompts, select_recipes,
                                    tokenize_prompts)
from tritonllm.builders.fp8_verify import (FP8_DTYPE, CheckpointModel, Fp8Linear, GateThresholds,
                                           checkpoint_tensor_problems, run_gate, score_sequences)

HF_TO_TRTLLM = {"self_attn.o_proj": "attention.dense", "mlp.gate_proj": "mlp.fc", "mlp.up_proj": "mlp.gate",
                "mlp.down_proj": "mlp.proj"}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, heldout_ids, tmp_path_factory):
    """Calibrated (FP8 weights, activations and KV cache) and exported once; also the simulated-quantization model
    (Model Optimizer's fake quantization, in float32) with every quantized linear layer's input and output captured."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("fp8-export")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    calibrate_fp8(model, heldout_ids[:6], kv_cache_fp8=True)
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    export_tensorrt_llm_checkpoint(model, "llama", torch.bfloat16, out / CHECKPOINT_DIR, inference_tensor_parallel=1)
    simulated = copy.deepcopy(model).float()  # after the TensorRT-LLM export: fused layers share their scales
    captured = {}
    hooks = [module.register_forward_hook(lambda _, args, output, name=name: captured.__setitem__(
        name, (args[0].detach(), output.detach())))
             for name, module in simulated.named_modules() if type(module).__name__ == "QuantLinear"]
    with torch.no_grad():
        simulated(heldout_ids[0].unsqueeze(0))
    for hook in hooks:
        hook.remove()
    shutil.rmtree(out / CHECKPOINT_DIR)
    export_checkpoints(model, out / CHECKPOINT_DIR, out / HF_FP8_DIR, tiny_llama_dir)
    return out, captured


def test_export_holds_fp8_weights_with_positive_fp32_scales(exported):
    out, _ = exported
    config = json.loads((out / CHECKPOINT_DIR / "config.json").read_text())
    tensors = load_file(out / CHECKPOINT_DIR / "rank0.safetensors")
    assert config["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}
    assert checkpoint_tensor_problems(config, tensors) == []
    for layer in range(2):
        for linear in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"):
            name = f"transformer.layers.{layer}.{linear}"
            assert tensors[f"{name}.weight"].dtype == FP8_DTYPE
            for scale in ("weights_scaling_factor", "activation_scaling_factor"):
                assert tensors[f"{name}.{scale}"].dtype == torch.float32
                assert tensors[f"{name}.{scale}"].item() > 0
    assert tensors["lm_head.weight"].dtype == torch.bfloat16  # lm_head stays unquantized


def test_fused_layers_share_one_scale(exported):
    out, _ = exported
    trt = load_file(out / CHECKPOINT_DIR / "rank0.safetensors")
    hf = load_file(out / HF_FP8_DIR / "model.safetensors")
    for layer in range(2):
        prefix = f"transformer.layers.{layer}.mlp"
        for scale in ("weights_scaling_factor", "activation_scaling_factor"):
            assert torch.equal(trt[f"{prefix}.fc.{scale}"], trt[f"{prefix}.gate.{scale}"])
        attention = f"model.layers.{layer}.self_attn"
        for scale in ("weight_scale", "input_scale"):
            q, k, v = (hf[f"{attention}.{p}_proj.{scale}"] for p in "qkv")
            assert torch.equal(q, k) and torch.equal(q, v)
            mlp = f"model.layers.{layer}.mlp"
            assert torch.equal(hf[f"{mlp}.gate_proj.{scale}"], hf[f"{mlp}.up_proj.{scale}"])
    # Both exports hold the same FP8 model, weights bit for bit.
    assert hf_export_mismatches(out / HF_FP8_DIR, trt, layers=2) == []


def test_exported_config_is_checked_against_the_source(exported, tiny_llama_dir):
    from transformers import AutoConfig

    out, _ = exported
    source = AutoConfig.from_pretrained(tiny_llama_dir)
    config = json.loads((out / CHECKPOINT_DIR / "config.json").read_text())
    assert config["rotary_base"] == source.rope_theta == 100000.0
    with_kv, without_kv = (expected_quantization(RECIPES["fp8"][index], []) for index in (0, 1))
    assert config_mismatches(config, source, with_kv) == []

    assert config_mismatches(config, source, without_kv) == [
        "quantization.kv_cache_quant_algo = 'FP8', source model: None"]
    broken = {**config, "rotary_base": 10000.0, "num_key_value_heads": 4}
    del broken["norm_epsilon"]
    assert config_mismatches(broken, source, with_kv) == [
        "num_key_value_heads = 4, source model: 2",
        "norm_epsilon is missing (source: 1e-05)",
        "rotary_base = 10000.0, source model: 100000.0"]


def test_fp8_gemm_matches_model_optimizer_simulated_quantization(exported):
    out, captured = exported
    tensors = load_file(out / CHECKPOINT_DIR / "rank0.safetensors")

    def fp8_linear(name: str) -> Fp8Linear:
        return Fp8Linear(tensors[f"{name}.weight"], tensors[f"{name}.weights_scaling_factor"],
                         tensors[f"{name}.activation_scaling_factor"])

    for layer in range(2):
        hf, trt = f"model.layers.{layer}", f"transformer.layers.{layer}"
        x, _ = captured[f"{hf}.self_attn.q_proj"]
        simulated = torch.cat([captured[f"{hf}.self_attn.{p}_proj"][1] for p in "qkv"], dim=-1)
        assert _relative_error(fp8_linear(f"{trt}.attention.qkv")(x), simulated) < 1e-5
        for hf_name, trt_name in HF_TO_TRTLLM.items():
            x, simulated = captured[f"{hf}.{hf_name}"]
            assert x.dtype == torch.float32
            assert _relative_error(fp8_linear(f"{trt}.{trt_name}")(x), simulated) < 1e-5


def test_rebuild_matches_transformers_on_an_unquantized_checkpoint(tiny_llama_dir, heldout_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from tritonllm.builders.trtllm_export import export_trtllm_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    export_trtllm_checkpoint(model, tmp_path)
    rebuilt = CheckpointModel(tmp_path, compute_dtype=torch.float32)
    ids = heldout_ids[0].unsqueeze(0)
    with torch.no_grad():
        expected = model.float()(ids).logits
    assert _relative_error(rebuilt.logits(ids), expected) < 1e-5


@pytest.fixture(scope="module")
def reference_scores(tiny_llama_dir, heldout_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return score_sequences(lambda ids: model(ids).logits, heldout_ids)


def test_gate_accepts_the_export_and_rejects_a_damaged_one(exported, heldout_ids, reference_scores, tmp_path):
    out, _ = exported
    good = run_gate(CheckpointModel(out / CHECKPOINT_DIR), heldout_ids, reference_scores, GateThresholds())
    assert good.passed, good.failures
    assert good.tokens == sum(len(ids) - 1 for ids in heldout_ids)

    damaged_dir = tmp_path / "damaged"
    shutil.copytree(out / CHECKPOINT_DIR, damaged_dir)
    tensors = load_file(damaged_dir / "rank0.safetensors")
    for name in [n for n in tensors if n.endswith("weights_scaling_factor")]:
        tensors[name] = tensors[name] * 100
    save_file(tensors, damaged_dir / "rank0.safetensors")
    damaged = run_gate(CheckpointModel(damaged_dir), heldout_ids, reference_scores, GateThresholds())
    assert not damaged.passed
    assert damaged.top1_agreement < 0.1 < good.top1_agreement
    assert damaged.failures[0].startswith("greedy top-1 agreement")


def test_checkpoint_with_bad_scales_is_refused(exported, tmp_path):
    out, _ = exported
    shutil.copytree(out / CHECKPOINT_DIR, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "rank0.safetensors")
    tensors["transformer.layers.1.mlp.proj.activation_scaling_factor"] *= -1
    tensors["transformer.layers.0.attention.qkv.weight"] = tensors["transformer.layers.0.attention.qkv.weight"].half()
    save_file(tensors, tmp_path / "rank0.safetensors")
    with pytest.raises(BuildError) as error:
        CheckpointModel(tmp_path)
    message = str(error.value)
    assert "transformer.layers.0.attention.qkv.weight is torch.float16, expected torch.float8_e4m3fn" in message
    assert "transformer.layers.1.mlp.proj.activation_scaling_factor = -" in message


def test_build_fp8_publishes_only_a_passing_build(tiny_llama_dir, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"prompt": f"Question {i}: what is {i} + {i}?"}) for i in range(8)) + "\n")
    out = tmp_path / "fp8"
    result = build_fp8(tiny_llama_dir, out, calib, 8, kv_cache_fp8=False, gate=GateThresholds())
    assert result.out_dir == out and result.report.passed
    assert {p.name for p in out.iterdir()} >= {CHECKPOINT_DIR, HF_FP8_DIR, REPORT_FILE}
    assert (out / CHECKPOINT_DIR / "config.json").is_file() and (out / CHECKPOINT_DIR / "rank0.safetensors").is_file()
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["passed"] and report["kv_cache_quant_algo"] is None and report["extra"]["calibration_prompts"] == 8
    # The search stops at the first recipe that passes (the cheapest without an FP8 KV cache) and says so.
    assert report["extra"]["recipe"] == "fp8-per-tensor"
    assert [a["recipe"] for a in report["extra"]["search"]] == ["fp8-per-tensor"]
    assert report["checkpoint"] == str(out / CHECKPOINT_DIR)

    rejected_out = tmp_path / "fp8-strict"
    impossible = GateThresholds(min_top1_agreement=1.0, max_perplexity_increase=0.0)
    # Two recipes keep the test short; the rowwise one's structure is checked on its own below.
    with pytest.raises(BuildError, match="no fp8 recipe passed the accuracy gate .*fp8-per-tensor: .*fp8-mixed: "):
        build_fp8(tiny_llama_dir, rejected_out, calib, 8, kv_cache_fp8=False, gate=impossible,
                  recipes=select_recipes(False, ["fp8-per-tensor", "fp8-mixed"]))
    assert not rejected_out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.jsonl", "fp8", "fp8-strict.rejected-gate-report.json"]
    refused = json.loads((tmp_path / "fp8-strict.rejected-gate-report.json").read_text())
    assert [a["recipe"] for a in refused["search"]] == ["fp8-per-tensor", "fp8-mixed"]
    assert all(not a["passed"] and a["failures"] and 0 < a["top1_agreement"] <= 1 for a in refused["search"])
    mixed = refused["search"][1]
    assert [row["layer"] for row in mixed["sensitivity"]["scan"]] == [0, 1]
    excluded = mixed["sensitivity"]["excluded_layers"]
    assert mixed["exclude_modules"] == expected_quantization(RECIPES["fp8"][3], excluded)["exclude_modules"]


def test_excluded_layers_stay_unquantized_and_configs_name_them_exactly(tiny_llama_dir, heldout_ids, tmp_path):
    from transformers import AutoModelForCausalLM
    import modelopt.torch.quantization as mtq

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    calibrate_fp8(model, heldout_ids[:4], kv_cache_fp8=True)
    mtq.disable_quantizer(model, lambda name: ".layers.1." in name and name.endswith(("weight_quantizer",
                                                                                      "input_quantizer")))
    export_checkpoints(model, tmp_path / CHECKPOINT_DIR, tmp_path / HF_FP8_DIR, tiny_llama_dir, excluded_layers=[1])
    config = json.loads((tmp_path / CHECKPOINT_DIR / "config.json").read_text())
    tensors = load_file(tmp_path / CHECKPOINT_DIR / "rank0.safetensors")
    assert config["quantization"] == expected_quantization(RECIPES["fp8"][2], [1]) == {
        "quant_algo": "FP8", "kv_cache_quant_algo": "FP8",
        "exclude_modules": ["lm_head"] + [f"transformer.layers.1.{name}" for name in
                                          ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")]}
    assert checkpoint_tensor_problems(config, tensors) == []
    assert hf_export_mismatches(tmp_path / HF_FP8_DIR, tensors, layers=2) == []
    hf_quant = json.loads((tmp_path / HF_FP8_DIR / "hf_quant_config.json").read_text())["quantization"]
    assert "model.layers.1.mlp.down_proj" in hf_quant["exclude_modules"]
    for linear in ("attention.qkv", "mlp.proj"):
        assert tensors[f"transformer.layers.0.{linear}.weight"].dtype == FP8_DTYPE
        assert tensors[f"transformer.layers.1.{linear}.weight"].dtype == torch.bfloat16
        assert f"transformer.layers.1.{linear}.weights_scaling_factor" not in tensors
    assert tensors["transformer.layers.1.attention.kv_cache_scaling_factor"].item() > 0  # KV cache: every layer
    rebuilt = CheckpointModel(tmp_path / CHECKPOINT_DIR)
    assert type(rebuilt.layers[1].linears["mlp.proj"]).__name__ == "PlainLinear"
    assert isinstance(rebuilt.layers[0].linears["mlp.proj"], Fp8Linear)

    # A config that no longer excludes layer 1 does not match its bf16 weights: refused.
    config["quantization"]["exclude_modules"] = ["lm_head"]
    assert "transformer.layers.1.mlp.proj.weight is torch.bfloat16, expected torch.float8_e4m3fn" in \
        checkpoint_tensor_problems(config, tensors)


def test_rowwise_checkpoint_has_per_row_scales_and_matches_simulated_quantization(tiny_llama_dir, heldout_ids,
                                                                                  tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    calibrate_fp8(model, heldout_ids[:4], kv_cache_fp8=False, quant_algo="FP8_PER_CHANNEL_PER_TOKEN")
    with torch.no_grad():
        simulated = model(heldout_ids[0].unsqueeze(0)).logits.float()
    export_checkpoints(model, tmp_path / CHECKPOINT_DIR, tmp_path / HF_FP8_DIR, tiny_llama_dir)
    config = json.loads((tmp_path / CHECKPOINT_DIR / "config.json").read_text())
    tensors = load_file(tmp_path / CHECKPOINT_DIR / "rank0.safetensors")
    assert config["quantization"] == expected_quantization(RECIPES["fp8"][5], [])
    assert checkpoint_tensor_problems(config, tensors) == []
    assert hf_export_mismatches(tmp_path / HF_FP8_DIR, tensors, 2, "FP8_PER_CHANNEL_PER_TOKEN") == []
    scale = tensors["transformer.layers.0.attention.qkv.per_channel_scale"]
    assert scale.shape == (tensors["transformer.layers.0.attention.qkv.weight"].shape[0],) and (scale > 0).all()
    assert "transformer.layers.0.attention.qkv.activation_scaling_factor" not in tensors  # per token, at run time
    rebuilt = CheckpointModel(tmp_path / CHECKPOINT_DIR).logits(heldout_ids[0].unsqueeze(0))
    assert (rebuilt.argmax(-1) == simulated.argmax(-1)).float().mean() > 0.95

    tensors["transformer.layers.1.mlp.fc.per_channel_scale"][3] = 0.0
    assert checkpoint_tensor_problems(config, tensors) == [
        "transformer.layers.1.mlp.fc.per_channel_scale = 0.0, expected positive finite numbers"]


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "holds no prompts"),
    ("\n\n", "holds no prompts"),
    ('{"prompt": "ok"}\nnot json\n', ":2 is not JSON"),
    ('["a list"]\n', ':1 has no non-empty "prompt" or "text"'),
    ('{"question": "wrong field"}\n', ':1 has no non-empty "prompt" or "text"'),
    ('{"text": "   "}\n', ':1 has no non-empty "prompt" or "text"'),
    ('{"prompt": "one"}\n{"text": "two"}\n', "holds 2 prompts, fewer than the 3 asked for"),
])
def test_bad_calibration_files_are_explained(tmp_path, content, message):
    path = tmp_path / "calib.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BuildError, match=message):
        load_prompts(path, 3)


def test_shipped_prompt_sets_are_large_varied_and_disjoint():
    from tritonllm.builders.fp8 import DEFAULT_CALIBRATION_FILE

    calibration, heldout = load_prompts(DEFAULT_CALIBRATION_FILE), load_prompts(HELDOUT_FILE)
    assert len(calibration) >= 128 and len(heldout) >= 24
    assert {kind for kind, _ in calibration} == {"prompt", "text"}
    assert not {text for _, text in calibration} & {text for _, text in heldout}
    everything = "".join(text for _, text in calibration)
    for sample in ("def ", "SELECT", "é", "ü", "中", "日本", "한국", "москва".capitalize()):
        assert sample in everything


@pytest.mark.parametrize("thresholds", [GateThresholds(min_top1_agreement=0.0), GateThresholds(min_top1_agreement=1.5),
                                        GateThresholds(max_perplexity_increase=-0.1)])
def test_gate_thresholds_are_validated(thresholds):
    with pytest.raises(BuildError, match="gate"):
        thresholds.validate()


def test_gate_stops_early_only_once_it_cannot_pass(exported, heldout_ids, reference_scores, tmp_path):
    out, _ = exported
    early = run_gate(CheckpointModel(out / CHECKPOINT_DIR), heldout_ids, reference_scores, GateThresholds(),
                     stop_early=True)
    # A passing build is scored on every held-out token.
    assert early.passed and not early.stopped_early and early.tokens == sum(len(ids) - 1 for ids in heldout_ids)

    damaged = shutil.copytree(out / CHECKPOINT_DIR, tmp_path / "damaged")
    tensors = load_file(damaged / "rank0.safetensors")
    for name in [n for n in tensors if n.endswith("weights_scaling_factor")]:
        tensors[name] = tensors[name] * 100
    save_file(tensors, damaged / "rank0.safetensors")
    stopped = run_gate(CheckpointModel(damaged), heldout_ids, reference_scores, GateThresholds(), stop_early=True)
    assert not stopped.passed and stopped.stopped_early and stopped.sequences < len(heldout_ids)
    assert stopped.failures[0].startswith("greedy top-1 agreement can reach at most ")
    assert f"of {len(heldout_ids)} held-out sequences" in stopped.failures[0]


def test_unreachable_is_a_proof():
    from tritonllm.builders.fp8_verify import TokenScores, unreachable

    reference = TokenScores([torch.zeros(10, dtype=torch.long)] * 2, [torch.full((10,), 1.0, dtype=torch.float64)] * 2)
    gate = GateThresholds(min_top1_agreement=0.9, max_perplexity_increase=0.05)
    first_bad = TokenScores([torch.ones(10, dtype=torch.long)], [torch.full((10,), 1.0, dtype=torch.float64)])
    assert unreachable(first_bad, reference, gate) == [  # 10 of 20 disagree: at most 50% even if the rest agree
        "greedy top-1 agreement can reach at most 50.00% < 90.00% (0 of 10 agreed after 1 of 2 held-out sequences "
        "(10 of 20 tokens))"]
    # 5 disagreements of 20: the rest could still reach 90%? no: at most 75%. 1 disagreement: 95%, still possible.
    one_off = torch.zeros(10, dtype=torch.long)
    one_off[0] = 1
    assert unreachable(TokenScores([one_off], [torch.full((10,), 1.0, dtype=torch.float64)]), reference, gate) == []
    # Perplexity: the loss so far alone, with zero loss on the remaining tokens, exceeds +5%.
    lossy = TokenScores([torch.zeros(10, dtype=torch.long)], [torch.full((10,), 2.2, dtype=torch.float64)])
    assert unreachable(lossy, reference, gate)[0].startswith("perplexity increase is at least +10.52% > +5.00%")


@pytest.mark.parametrize("quant_algo", ["FP8", "FP8_PER_CHANNEL_PER_TOKEN"])
def test_calibration_is_the_same_with_the_kv_cache_quantizers_turned_off(tiny_llama_dir, heldout_ids, quant_algo,
                                                                           tmp_path):
    """The search calibrates once per algo with the KV cache quantizers and turns them off for the recipes without
    an FP8 KV cache: the other quantizers' state must equal a calibration without them."""
    from transformers import AutoModelForCausalLM

    from tritonllm.builders.fp8 import _disable_kv_cache_quantizers

    def quantizer_state(kv_cache_fp8: bool) -> dict[str, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
        calibrate_fp8(model, heldout_ids[:4], kv_cache_fp8, quant_algo)
        if kv_cache_fp8:
            _disable_kv_cache_quantizers(model)
        return {name: tensor for name, tensor in model.state_dict().items() if "quantizer" in name
                and "bmm_quantizer" not in name}, model

    shared, shared_model = quantizer_state(True)
    alone, alone_model = quantizer_state(False)
    assert shared.keys() == alone.keys() and shared
    assert all(torch.equal(shared[name], alone[name]) for name in shared)
    with torch.no_grad():
        ids = heldout_ids[0].unsqueeze(0)
        assert torch.equal(shared_model(ids).logits, alone_model(ids).logits)
    export_checkpoints(shared_model, tmp_path / CHECKPOINT_DIR, tmp_path / HF_FP8_DIR, tiny_llama_dir)
    config = json.loads((tmp_path / CHECKPOINT_DIR / "config.json").read_text())
    assert config["quantization"]["kv_cache_quant_algo"] is None  # no KV range left for the export to read
    assert "transformer.layers.0.attention.kv_cache_scaling_factor" not in load_file(
        tmp_path / CHECKPOINT_DIR / "rank0.safetensors")


def test_reference_scores_are_kept_in_the_cache(tiny_llama_dir, heldout_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from tritonllm.builders.fp8 import reference_scores as cached_scores

    loads = []

    def load():
        loads.append(1)
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()

    first = cached_scores(load, tiny_llama_dir, [heldout_ids[:3], heldout_ids[3:5]], tmp_path)
    again = cached_scores(load, tiny_llama_dir, [heldout_ids[:3], heldout_ids[3:5]], tmp_path)
    # One file per set: other ids miss (and load the model once more), a known set is read back.
    other = cached_scores(load, tiny_llama_dir, [heldout_ids[:2], heldout_ids[3:5]], tmp_path)
    assert len(loads) == 2 and len(list(tmp_path.glob("reference-scores-*.safetensors"))) == 3
    for computed, kept in zip(first, again):
        assert all(torch.equal(a, b) for a, b in zip(computed.top1 + computed.nll, kept.top1 + kept.nll))
    assert len(other[0].top1) == 2


def test_a_layer_choice_must_clear_the_scan_by_two_standard_errors():
    """The scan of 8 calibration prompts (436 tokens for SmolLM2) measures agreement within about +-1.3 points: the
    choice the search kept there without a margin (91.7%) then scored 88.98% in the gate; the next one clears it."""
    threshold = GateThresholds().min_top1_agreement
    assert 0.9174 - agreement_margin(0.9174, 436) < threshold <= 0.9312 - agreement_margin(0.9312, 436)
    assert agreement_margin(0.9, 436) == pytest.approx(2 * (0.9 * 0.1 / 436) ** 0.5)
    assert agreement_margin(1.0, 436) == 0 and agreement_margin(0.9, 4 * 436) == pytest.approx(
        agreement_margin(0.9, 436) / 2)
