"""ONNX export with KV cache and its gates, on tiny random models with SmolLM2's tokenizer (real SmolLM2: `slow`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tritonllm.builders.errors import BuildError
from tritonllm.builders.onnx_export import (METADATA_FILE, ONNX_FILE, export_decoder, grouped_attention,
                                            load_causal_lm)
from tritonllm.builders.parity import (LeftPaddedBatch, OnnxDecoderRunner, check_parity, continue_batch,
                                       greedy_agreement, left_pad, sample_prompts)


def save_tiny_model(folder: Path, model_type: str = "llama") -> Path:
    """A tiny random decoder (hidden 64, 2 layers, 4 heads / 2 KV heads) saved with SmolLM2's converted tokenizer.

    Weights are drawn wider than the default (std 0.1) so logits vary enough for parity to mean something.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tritonllm.builders.source import prepare_hf_model
    from tritonllm.paths import cache_dir

    tokenizer = AutoTokenizer.from_pretrained(prepare_hf_model(None, cache_dir()))
    config = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048, rope_theta=100000.0,
        initializer_range=0.1, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def fp32_dir(tiny_dir, tmp_path_factory) -> Path:
    return export_decoder(tiny_dir, tmp_path_factory.mktemp("export") / "onnx-fp32")


def prompt_tokens(hf_dir: Path, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return [tokenizer(prompt)["input_ids"] for prompt in sample_prompts(count)]


def test_graph_has_the_engine_contract(fp32_dir):
    graph = onnx.load(fp32_dir / ONNX_FILE, load_external_data=False).graph
    dims = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in [*graph.input, *graph.output]}
    assert [value.name for value in graph.input] == [
        "input_ids", "attention_mask", "position_ids",
        "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert [value.name for value in graph.output] == [
        "logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "past_sequence + sequence"]
    assert dims["past_key_values.0.key"] == ["batch", 2, "past_sequence", 16]
    assert dims["present.1.value"] == ["batch", 2, "past_sequence + sequence", 16]
    assert dims["logits"] == ["batch", 1, 49152]  # last position only
    metadata = json.loads((fp32_dir / METADATA_FILE).read_text())
    assert metadata == {"precision": "fp32", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "vocab_size": 49152,
                        "cache_dtype": "float32", "last_logits_only": True}


def test_grouped_attention_equals_eager_attention():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(1)
    query, key, value = torch.randn(2, 6, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.zeros(2, 1, 3, 5)
    mask[1, :, :, :2] = torch.finfo(torch.float32).min  # left padding of the second row
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 3, False
    expected, _ = eager_attention_forward(module, query, key, value, mask, scaling=0.3)
    actual, _ = grouped_attention(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_parity_passes_for_fp32(tiny_dir, fp32_dir):
    report = check_parity(tiny_dir, fp32_dir, batch=3, decode_steps=3, tolerance=1e-4)
    assert report.passed
    assert [step.step for step in report.steps] == [
        "prefill chunk 1", "prefill chunk 2", "decode 1", "decode 2", "decode 3"]
    assert len(set(report.prompt_lengths)) == 3  # rows of different lengths: left padding is exercised
    assert report.steps[1].past_length > 0 and report.steps[1].new_tokens == 2
    assert all(step.same_argmax for step in report.steps)
    assert json.loads(report.to_json())["passed"] is True


def test_parity_fails_clearly_on_damaged_weights(tiny_dir, fp32_dir, tmp_path):
    model = onnx.load(fp32_dir / ONNX_FILE)  # with its external data
    # One projection weight of a layer (the exporter names them val_*), scaled by 1.5.
    weight = next(init for init in model.graph.initializer if len(init.dims) == 2 and "lm_head" not in init.name)
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.5, weight.name))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    onnx.save(model, damaged / ONNX_FILE, save_as_external_data=True, location="model.onnx.data")
    with pytest.raises(BuildError, match=r"parity check failed .* at step '.+' .* max \|logit difference\| vs "
                                         r"torch fp32 is .* allowed 0.0001"):
        check_parity(tiny_dir, damaged, tolerance=1e-4)


def test_left_padding_and_chunked_prefill_match_each_prompt_alone(tiny_dir, fp32_dir):
    """Rows of a left-padded batch, prefilled in chunks of 3 columns and then decoded, give the logits torch gives
    for each prompt run alone and unpadded."""
    prompts = [tokens[:length] for tokens, length in zip(prompt_tokens(tiny_dir, 3), (5, 12, 9))]
    runner = OnnxDecoderRunner(fp32_dir)
    runner.reset(len(prompts))
    padded = left_pad(prompts, pad_id=2)
    for start in range(0, padded.input_ids.shape[1], 3):
        end = start + 3
        chunk = LeftPaddedBatch(padded.input_ids[:, start:end], padded.attention_mask[:, :end],
                             padded.position_ids[:, start:end])
        logits = runner.step(chunk)
    sequences = [list(prompt) for prompt in prompts]
    attention_mask = padded.attention_mask
    for _ in range(2):  # two decode steps on the chunked cache
        next_ids = logits.argmax(-1)
        for sequence, token in zip(sequences, next_ids):
            sequence.append(int(token))
        step = continue_batch(attention_mask, next_ids[:, None])
        attention_mask = step.attention_mask
        logits = runner.step(step)
    assert all(np.isfinite(array).all() for array in runner.past)  # padding rows never produce NaN keys/values

    model = load_causal_lm(tiny_dir)
    for row, sequence in enumerate(sequences):
        with torch.no_grad():
            expected = model(torch.tensor([sequence])).logits[0, -1].numpy()
        np.testing.assert_allclose(logits[row], expected, atol=1e-4)


def test_full_logits_option_returns_every_position(tiny_dir, tmp_path):
    onnx_dir = export_decoder(tiny_dir, tmp_path / "onnx-full", last_logits_only=False)
    tokens = prompt_tokens(tiny_dir, 1)[0][:7]
    runner = OnnxDecoderRunner(onnx_dir)
    runner.reset(1)
    batch = left_pad([tokens], pad_id=2)
    feed = dict(zip(runner.input_names, [batch.input_ids, batch.attention_mask, batch.position_ids, *runner.past]))
    logits = runner.session.run(["logits"], feed)[0]
    with torch.no_grad():
        expected = load_causal_lm(tiny_dir)(torch.tensor([tokens])).logits.numpy()
    assert logits.shape == (1, 7, 49152)
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_int8_export_runs_and_quantizes_every_weight(tiny_dir, fp32_dir, tmp_path):
    int8_dir = export_decoder(tiny_dir, tmp_path / "onnx-int8", "int8", fp32_dir=fp32_dir)
    graph = onnx.load(int8_dir / ONNX_FILE, load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulNBits") == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + the tied lm_head
    assert not any(node.op_type == "Transpose" and "lm_head" in node.input[0] for node in graph.node)
    assert json.loads((int8_dir / METADATA_FILE).read_text())["precision"] == "int8"
    prompts = sample_prompts(4)
    assert greedy_agreement(fp32_dir, fp32_dir, prompts, 4, tokenizer_dir=tiny_dir) == 1.0
    agreement = greedy_agreement(fp32_dir, int8_dir, prompts, 4, tokenizer_dir=tiny_dir)
    assert 0.0 <= agreement <= 1.0


def test_bf16_and_unknown_precisions_are_refused_with_the_reason(tiny_dir, tmp_path):
    with pytest.raises(BuildError, match="no bfloat16 kernels.*choose fp32 or int8"):
        export_decoder(tiny_dir, tmp_path / "onnx-bf16", "bf16")
    with pytest.raises(BuildError, match="precision = 'fp16' is not supported; allowed: fp32, int8, bf16"):
        export_decoder(tiny_dir, tmp_path / "onnx-fp16", "fp16")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_onnx_runtime_really_lacks_bf16_kernels():
    """The reason bf16 is refused, checked against the installed ONNX Runtime: if this fails, bf16 may be possible."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.BFLOAT16, [4, 4]) for name in ("a", "b")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "bf16", inputs,
                              [helper.make_tensor_value_info("c", TensorProto.BFLOAT16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_other_supported_families_export_with_parity(model_type, tmp_path):
    hf_dir = save_tiny_model(tmp_path / model_type, model_type)
    onnx_dir = export_decoder(hf_dir, tmp_path / "onnx")
    assert check_parity(hf_dir, onnx_dir, tolerance=1e-4).passed


def test_export_is_atomic_when_it_fails(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(BuildError, match="cannot load the model in .*broken"):
        export_decoder(broken, tmp_path / "out")
    assert [path.name for path in tmp_path.iterdir()] == ["broken"]
