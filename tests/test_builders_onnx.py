"""The decoder graph builder (builders/onnx_graph.py) and its gates, on tiny random models with SmolLM2's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from support import TINY_GEMMA3, save_tiny_gemma3, save_tiny_model

from tritonllm.builders.errors import BuildError
from tritonllm.builders.onnx_graph import DecoderGeometry, write_decoder
from tritonllm.builders.parity import agreement, check_parity
from tritonllm.python_backends.onnx_runner import ONNX_FILE, OnnxDecoder, past_names, present_names


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def build(hf_dir: Path, out_dir: Path, precision: str = "fp32") -> Path:
    out_dir.mkdir(parents=True)
    write_decoder(hf_dir, out_dir, precision)
    return out_dir


@pytest.fixture(scope="module")
def fp32_dir(tiny_dir, tmp_path_factory) -> Path:
    return build(tiny_dir, tmp_path_factory.mktemp("graph") / "onnx-fp32")


def test_graph_has_the_engine_contract(fp32_dir):
    model = onnx.load(fp32_dir / ONNX_FILE, load_external_data=False)
    inputs = {value.name: value for value in model.graph.input}
    outputs = [value.name for value in model.graph.output]
    assert list(inputs) == ["input_ids", "seqlens_k", "total_sequence_length", "logits_index", *past_names(2)]
    assert outputs == ["logits", *present_names(2)]
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("SkipSimplifiedLayerNormalization") == 4
    assert ops.count("MatMul") == 2 * 4  # packed qkv, o, packed gate/up, down per layer
    # tied embeddings: lm_head multiplies by the embedding table itself (one copy of it in the graph)
    (lm_head,) = [node for node in model.graph.node if node.op_type == "Gemm"]
    assert lm_head.input[1] == "model.embed_tokens.weight"
    assert "lm_head.weight.transposed" not in {tensor.name for tensor in model.graph.initializer}
    cache_dims = [dim.dim_param or dim.dim_value for dim in inputs["past_key_values.0.key"].type.tensor_type.shape.dim]
    assert cache_dims == ["batch", 2, "max_length", 16]
    geometry = DecoderGeometry.load(fp32_dir)
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, geometry.precision) == (2, 2, 16, "fp32")


def test_parity_passes_for_fp32(tiny_dir, fp32_dir):
    report = check_parity(tiny_dir, fp32_dir, batch=3, decode_steps=3, tolerance=1e-4)
    assert report.passed
    assert [step.step for step in report.steps] == [
        "prefill (right-padded batch)", "prefill chunk of 2", "decode 1", "decode 2", "decode 3"]
    assert len(set(report.prompt_lengths)) == 3  # rows of different lengths: right padding is exercised
    assert report.steps[1].past_length > 0 and report.steps[1].new_tokens == 2
    assert all(step.same_argmax for step in report.steps)
    assert json.loads(report.to_json())["passed"] is True


def test_parity_fails_clearly_on_damaged_weights(tiny_dir, fp32_dir, tmp_path):
    model = onnx.load(fp32_dir / ONNX_FILE)  # with its external data
    weight = next(init for init in model.graph.initializer if init.name.endswith("qkv_proj.weight"))
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.5, weight.name))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    onnx.save(model, damaged / ONNX_FILE, save_as_external_data=True, location="model.onnx.data")
    with pytest.raises(BuildError, match=r"parity check failed .* at step '.+' max \|logit difference\| vs "
                                         r"torch fp32 is .* allowed 0.0001"):
        check_parity(tiny_dir, damaged, tolerance=1e-4)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_graphs_quantize_every_weight_and_are_scored_against_fp32(tiny_dir, fp32_dir, tmp_path,
                                                                           precision):
    quantized = build(tiny_dir, tmp_path / precision, precision)
    graph = onnx.load(quantized / ONNX_FILE, load_external_data=False).graph
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 4 + 1 and not any(node.op_type == "MatMul" for node in graph.node)
    bits = {node.name: next(a.i for a in node.attribute if a.name == "bits") for node in nbits}
    assert bits.pop("lm_head_Q8") == 8
    assert set(bits.values()) == {int(precision[3:])}  # int4 keeps lm_head, the logits' GEMM, in 8 bits
    assert DecoderGeometry.load(quantized).precision == precision
    texts = ["The river flows through the old town, past the market and the church, and on to the sea beyond "
             "the hills where the fishermen keep their boats."]
    same = agreement(fp32_dir, fp32_dir, tiny_dir, texts, context_tokens=8, scored_tokens=16)
    assert same.top1_agreement == 1.0 and same.perplexity_increase == 0.0 and same.scored_tokens > 0
    scored = agreement(fp32_dir, quantized, tiny_dir, texts, context_tokens=8, scored_tokens=16)
    assert 0.0 <= scored.top1_agreement <= 1.0 and scored.candidate_perplexity > 0


def test_unknown_precisions_are_refused_with_what_is_allowed(tiny_dir, tmp_path):
    for precision in ("bf16", "fp16"):
        with pytest.raises(BuildError, match=f"precision = '{precision}' is not supported; allowed: fp32, int8, int4"):
            write_decoder(tiny_dir, tmp_path, precision)
    assert not any(tmp_path.iterdir())  # nothing written


def test_onnx_runtime_really_lacks_bf16_kernels():
    """Why bf16 is not offered, checked against the installed ONNX Runtime: if this fails, bf16 may be possible."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.BFLOAT16, [4, 4]) for name in ("a", "b")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "bf16", inputs,
                              [helper.make_tensor_value_info("c", TensorProto.BFLOAT16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_other_supported_families_build_with_parity(model_type, tmp_path):
    hf_dir = save_tiny_model(tmp_path / model_type, model_type)
    assert check_parity(hf_dir, build(hf_dir, tmp_path / "onnx"), tolerance=1e-4).passed


def test_an_architecture_the_builder_cannot_serve_is_refused_by_name(tmp_path):
    hf_dir = save_tiny_model(tmp_path / "gemma", "gemma")
    with pytest.raises(BuildError, match="model_type 'gemma' is not supported by the ONNX graph builder; "
                                         "supported: llama, qwen2, mistral, gemma3_text"):
        write_decoder(hf_dir, tmp_path, "fp32")


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory) -> Path:
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="module")
def tiny_gemma3_onnx(tiny_gemma3_dir, tmp_path_factory) -> Path:
    return build(tiny_gemma3_dir, tmp_path_factory.mktemp("gemma3-graph") / "onnx-fp32")


def test_gemma3_blocks_match_torch_across_the_sliding_window(tiny_gemma3_dir, tiny_gemma3_onnx):
    graph = onnx.load(tiny_gemma3_onnx / ONNX_FILE, load_external_data=False).graph
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    windows = [next(a.i for a in node.attribute if a.name == "local_window_size") for node in attention]
    assert windows == [4, -1]  # the sliding layer, then the full one
    assert [node.input[7] for node in attention] == ["cos_cache_local", "cos_cache"]
    assert [node.op_type for node in graph.node].count("FastGelu") == 2
    report = check_parity(tiny_gemma3_dir, tiny_gemma3_onnx, batch=3, decode_steps=3, tolerance=1e-4)
    assert report.passed and all(step.same_argmax for step in report.steps)
    assert min(report.prompt_lengths) > 2 * TINY_GEMMA3["sliding_window"]


@pytest.mark.parametrize("offset", [-1, 1])
def test_a_window_one_token_off_fails_parity(tiny_gemma3_dir, tiny_gemma3_onnx, tmp_path, offset):
    """The window test above can tell an off-by-one: the same graph with the window one token shorter or longer
    fails the gate."""
    model = onnx.load(tiny_gemma3_onnx / ONNX_FILE)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "local_window_size" and attribute.i > 0:
                attribute.i += offset
    changed = tmp_path / "changed"
    changed.mkdir()
    onnx.save(model, changed / ONNX_FILE, save_as_external_data=True, location="model.onnx.data")
    (changed / "decoder.json").write_text((tiny_gemma3_onnx / "decoder.json").read_text())
    with pytest.raises(BuildError, match="parity check failed"):
        check_parity(tiny_gemma3_dir, changed, batch=3, decode_steps=1, tolerance=1e-4)


def test_awq_keeps_the_gemma3_function(tiny_gemma3_dir):
    """AWQ's folds into (1 + weight) norms (and the MLP norm Gemma names pre_feedforward_layernorm) leave the
    model's fp32 logits unchanged."""
    import torch
    from transformers import AutoModelForCausalLM

    from tritonllm.builders.awq import apply_awq

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32).eval()
    tokens = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        before = model(tokens).logits
        apply_awq(model, [list(range(5, 30)), list(range(40, 70))], block=16)
        after = model(tokens).logits
    assert torch.allclose(before, after, atol=1e-4), float((before - after).abs().max())


def test_gemma3_attention_soft_capping_is_refused_by_name(tmp_path):
    hf_dir = save_tiny_model(tmp_path / "capped", "gemma3_text", **{**TINY_GEMMA3, "attn_logit_softcapping": 50.0})
    with pytest.raises(BuildError, match="attn_logit_softcapping = 50.0 is not supported"):
        write_decoder(hf_dir, tmp_path, "fp32")


def test_a_broken_model_folder_is_refused_clearly(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(BuildError, match="cannot"):
        write_decoder(broken, tmp_path, "fp32")


def test_executor_refuses_a_graph_of_another_contract(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "other",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / ONNX_FILE)
    with pytest.raises(ValueError, match="is not a tritonllm decoder graph"):
        OnnxDecoder(tmp_path, slots=1, max_length=8)
