"""Build the serving decoder as an ONNX graph of ONNX Runtime's fused CPU ops, straight from the HF weights.

Why not `torch.onnx.export`: the exported eager attention concatenates past and new keys, so every decode step
rewrites the whole KV cache. This graph uses `com.microsoft.GroupQueryAttention`, whose past and present are bound to
**one preallocated buffer** per layer (`[slots, kv_heads, max_length, head_dim]`), so a step writes only the new
positions. Fused rotary (inside GQA), packed QKV and gate/up projections, `SkipSimplifiedLayerNormalization` for the
residual adds, and logits only where they are needed (positions chosen by `logits_index`: the last one of a prompt, or
every drafted position of a speculative verification) complete it.
`int8`/`int4` replace every weight MatMul, lm_head included, with `MatMulNBits` (accuracy_level 4: int8 dot products
on AVX-512 VNNI).

Graph contract (what the engine's executor, python_backends/onnx_runner.py, binds; its names are defined there):

inputs
  input_ids                  int64 [batch, sequence]   new tokens of each row (right-padded when rows differ)
  seqlens_k                  int32 [batch]             per row: tokens in the cache after this run, minus one
  total_sequence_length      int32 []                  max over rows of (tokens in the cache after this run)
  logits_index               int64 [batch, scored]     per row: which of the `sequence` new tokens to score
  past_key_values.{i}.key    float [batch, kv_heads, max_length, head_dim]   shared with present.{i}.key
  past_key_values.{i}.value  float [batch, kv_heads, max_length, head_dim]   shared with present.{i}.value
outputs
  logits                     float [batch, scored, vocab]  next-token logits after `input_ids[row, logits_index[row, j]]`
  present.{i}.key / .value   float [batch, kv_heads, max_length, head_dim]

What ONNX Runtime's CPU GroupQueryAttention accepts (measured with 1.32): a run is either a *fresh prompt* run
(`sequence == total_sequence_length`, any batch, right padding, rotary positions 0..) or a *continuation* run
(`sequence == 1`, any batch, each row at position `seqlens_k[row]`), or a continuation of several tokens (chunked
prefill and a prompt after a reused prefix at batch 1; speculative verification at any batch, each row's new tokens
ending at `seqlens_k[row]`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tritonllm.contract import DECODER_METADATA_FILE as METADATA_FILE
from tritonllm.contract import PRECISIONS as GRAPH_PRECISIONS
from tritonllm.python_backends.onnx_runner import DECODER_INPUTS, LOGITS, ONNX_FILE, past_names, present_names

from .architecture import architecture_of, local_rope_config
from .errors import BuildError

AWQ_CALIBRATION_PROMPTS = 32  # activation statistics settle well before; each prompt is a forward pass
BLOCK_SIZE = 32  # input channels per weight scale for MatMulNBits (int8 measured 0.965 agreement at 32, 0.949 at 128)


@dataclass(frozen=True)
class DecoderGeometry:
    """The facts the engine needs about a built graph; written to decoder.json beside model.onnx."""

    precision: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    cache_dtype: str = "float32"
    graph: str = "gqa-shared-buffer"
    quantization: str = "none"

    def save(self, folder: Path) -> None:
        (Path(folder) / METADATA_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "DecoderGeometry":
        return cls(**json.loads((Path(folder) / METADATA_FILE).read_text()))


def rotary_caches(config) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_positions, head_dim / 2] for GQA's non-interleaved rotary, via transformers' own RoPE
    initialisation (so rope_scaling variants such as llama3 or linear come out as HF computes them)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise BuildError(f"rope_scaling type {rope_type!r} is not supported; supported: "
                         f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
    if rope_type in ("dynamic", "longrope"):
        raise BuildError(f"rope_scaling type {rope_type!r} depends on the sequence length at run time; not supported")
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    positions = np.arange(config.max_position_embeddings, dtype=np.float32)[:, None]
    angles = positions * inv_freq.float().numpy()[None, :]
    return ((np.cos(angles) * attention_scaling).astype(np.float32),
            (np.sin(angles) * attention_scaling).astype(np.float32))


class _GraphWriter:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []

    def weight(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attributes):
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attributes))
        return outputs[0] if len(outputs) == 1 else outputs


def build_graph(hf_dir: Path, prepare: Callable[[torch.nn.Module], None] | None = None,
                share_tied_embedding: bool = False) -> tuple["onnx.ModelProto", DecoderGeometry]:
    """The fp32 graph with its weights in memory, and its geometry; `prepare` may rewrite the loaded model's weights
    first (AWQ scaling for int4). Per-family differences come from `architecture_of(config)`.

    lm_head is a MatMul on its own [hidden, vocab] copy of the weight, which the weight-only quantizer (MatMul nodes
    only) turns into MatMulNBits. `share_tied_embedding` (the fp32 graph, which is not quantized): with tied
    embeddings lm_head is instead a Gemm with transB on the embedding table itself, so the graph holds one copy
    (Gemma 3's is 671 MB) at the same speed and with the same results.
    """
    from onnx import TensorProto, helper
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(hf_dir)
        arch = architecture_of(config)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise BuildError(f"cannot load the model in {hf_dir}: {type(error).__name__}: {error}") from error
    if prepare is not None:
        prepare(model)
    state = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    geometry = DecoderGeometry(precision="fp32", num_layers=layers, num_heads=heads,
                               num_kv_heads=kv_heads, head_dim=head_dim, hidden_size=config.hidden_size,
                               intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
                               max_position_embeddings=config.max_position_embeddings)
    epsilon = float(config.rms_norm_eps)
    g = _GraphWriter()
    cos, sin = rotary_caches(config)
    g.weight("cos_cache", cos)
    g.weight("sin_cache", sin)
    if arch.has_local_rope:
        cos, sin = rotary_caches(local_rope_config(config))
        g.weight("cos_cache_local", cos)
        g.weight("sin_cache_local", sin)

    def norm_weight(name: str) -> str:
        """An RMSNorm's weight as the fused ops multiply by it: (offset + weight), folded once here."""
        return g.weight(name, state[name] + np.float32(arch.norm_weight_offset) if arch.norm_weight_offset
                        else state[name])

    def rms_norm(value: str, weight_name: str, output: str) -> str:
        return g.node("SimplifiedLayerNormalization", [value, norm_weight(weight_name)], [output], output, axis=-1,
                      epsilon=epsilon)

    def per_head_norm(value: str, weight_name: str, output: str) -> str:
        """RMSNorm over head_dim of each head of a [batch, sequence, heads * head_dim] projection."""
        split = g.node("Reshape", [value, "per_head_shape"], [f"{output}.heads"], f"{output}.split_heads")
        normed_heads = rms_norm(split, weight_name, f"{output}.normed_heads")
        return g.node("Reshape", [normed_heads, "merged_heads_shape"], [output], f"{output}.merge_heads")

    if arch.qk_norm:
        g.weight("per_head_shape", np.array([0, 0, -1, head_dim], np.int64))
        g.weight("merged_heads_shape", np.array([0, 0, -1], np.int64))
        g.weight("qkv_sizes", np.array([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], np.int64))

    embed = g.weight("model.embed_tokens.weight", state["model.embed_tokens.weight"])
    input_ids, seqlens_k, total_sequence_length, logits_index = DECODER_INPUTS
    hidden = g.node("Gather", [embed, input_ids], ["embeddings"], "embed")
    if arch.embedding_scale is not None:
        # HF multiplies by the normalizer cast to the hidden dtype (float32 here).
        hidden = g.node("Mul", [hidden, g.weight("embedding_scale", np.array(arch.embedding_scale, np.float32))],
                        ["scaled_embeddings"], "embed_scale")
    residual = hidden
    normed = rms_norm(hidden, "model.layers.0.input_layernorm.weight", "layers.0.input_norm")
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        attention = f"{prefix}.self_attn"
        qkv_weight = np.concatenate([state[f"{attention}.{p}_proj.weight"] for p in "qkv"], axis=0).T
        qkv = g.node("MatMul", [normed, g.weight(f"{attention}.qkv_proj.weight", qkv_weight)],
                     [f"layers.{layer}.qkv"], f"layers.{layer}.qkv_proj")
        if getattr(config, "attention_bias", False) or f"{attention}.q_proj.bias" in state:
            bias = np.concatenate([state[f"{attention}.{p}_proj.bias"] for p in "qkv"])
            qkv = g.node("Add", [qkv, g.weight(f"{attention}.qkv_proj.bias", bias)],
                         [f"layers.{layer}.qkv_biased"], f"layers.{layer}.qkv_bias")
        qkv_inputs = [qkv, "", ""]
        if arch.qk_norm:  # GQA takes q, k, v apart so that q and k can be normed before its fused rotary
            q, k, v = g.node("Split", [qkv, "qkv_sizes"], [f"layers.{layer}.{p}" for p in "qkv"],
                             f"layers.{layer}.qkv_split", axis=-1)
            qkv_inputs = [per_head_norm(q, f"{attention}.q_norm.weight", f"layers.{layer}.q_normed"),
                          per_head_norm(k, f"{attention}.k_norm.weight", f"layers.{layer}.k_normed"), v]
        rope = ["cos_cache_local", "sin_cache_local"] if arch.local_rope[layer] else ["cos_cache", "sin_cache"]
        # GQA's local_window_size means what HF's sliding_window means: a query sees itself and window - 1 earlier
        # tokens (checked against HF with windows shorter than the prompts: tests/test_builders_onnx.py).
        window = -1 if arch.windows[layer] is None else arch.windows[layer]
        attended, _, _ = g.node(
            "GroupQueryAttention",
            [*qkv_inputs, *past_names(layers)[2 * layer:2 * layer + 2], seqlens_k, total_sequence_length, *rope],
            [f"layers.{layer}.attention", *present_names(layers)[2 * layer:2 * layer + 2]],
            f"layers.{layer}.gqa", domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
            scale=arch.attention_scale, do_rotary=1, rotary_interleaved=0, local_window_size=window)
        projected = g.node("MatMul", [attended, g.weight(f"{attention}.o_proj.weight",
                                                         state[f"{attention}.o_proj.weight"].T)],
                           [f"layers.{layer}.o"], f"layers.{layer}.o_proj")
        if arch.sandwich_norms:
            projected = rms_norm(projected, f"{prefix}.post_attention_layernorm.weight",
                                 f"layers.{layer}.attention_output_norm")
        normed, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization",
            [projected, residual, norm_weight(f"{prefix}.{arch.mlp_norm}.weight")],
            [f"layers.{layer}.post_norm", "", "", f"layers.{layer}.attention_residual"],
            f"layers.{layer}.post_norm", domain="com.microsoft", epsilon=epsilon)
        mlp = f"{prefix}.mlp"
        gate_up_weight = np.concatenate([state[f"{mlp}.gate_proj.weight"], state[f"{mlp}.up_proj.weight"]], 0).T
        gate_up = g.node("MatMul", [normed, g.weight(f"{mlp}.gate_up_proj.weight", gate_up_weight)],
                         [f"layers.{layer}.gate_up"], f"layers.{layer}.gate_up_proj")
        gate, up = g.node("Split", [gate_up], [f"layers.{layer}.gate", f"layers.{layer}.up"],
                          f"layers.{layer}.split", axis=-1, num_outputs=2)
        if arch.activation == "gelu_pytorch_tanh":  # FastGelu is the tanh approximation of GELU
            activated = g.node("FastGelu", [gate], [f"layers.{layer}.gelu"], f"layers.{layer}.gelu",
                               domain="com.microsoft")
        else:
            activated = g.node("Mul", [gate, g.node("Sigmoid", [gate], [f"layers.{layer}.gate_sigmoid"],
                                                   f"layers.{layer}.sigmoid")],
                               [f"layers.{layer}.silu"], f"layers.{layer}.silu")
        gated = g.node("Mul", [activated, up], [f"layers.{layer}.gated"], f"layers.{layer}.gated")
        down = g.node("MatMul", [gated, g.weight(f"{mlp}.down_proj.weight", state[f"{mlp}.down_proj.weight"].T)],
                      [f"layers.{layer}.down"], f"layers.{layer}.down_proj")
        if arch.sandwich_norms:
            down = rms_norm(down, f"{prefix}.post_feedforward_layernorm.weight", f"layers.{layer}.mlp_output_norm")
        is_last = layer == layers - 1
        norm_name = "model.norm.weight" if is_last else f"model.layers.{layer + 1}.input_layernorm.weight"
        normed, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization", [down, residual, norm_weight(norm_name)],
            ["final_norm" if is_last else f"layers.{layer + 1}.input_norm", "", "", f"layers.{layer}.residual"],
            f"layers.{layer}.next_norm", domain="com.microsoft", epsilon=epsilon)

    # Only the scored positions of each row reach lm_head (a long prompt scores one):
    # [batch, sequence, hidden] -> [batch, scored, hidden].
    g.weight("axis_2", np.array([2], np.int64))
    g.weight("hidden_size", np.array([1, 1, config.hidden_size], np.int64))
    index = g.node("Unsqueeze", [logits_index, "axis_2"], ["logits_index_3d"], "logits_index_unsqueeze")
    index = g.node("Expand", [index, "hidden_size"], ["logits_index_expanded"], "logits_index_expand")
    picked = g.node("GatherElements", [normed, index], ["scored_hidden"], "pick_scored", axis=1)
    logits = LOGITS
    if arch.final_logit_softcap:  # logits = cap * tanh(logits / cap), as HF applies it
        logits = "uncapped_logits"
    if share_tied_embedding and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        # Gemm is 2-D: [batch * scored, hidden] x [vocab, hidden]^T, then back to [batch, scored, vocab]
        g.weight("rows_by_hidden", np.array([-1, config.hidden_size], np.int64))
        g.weight("vocab_size", np.array([config.vocab_size], np.int64))
        rows = g.node("Reshape", [picked, "rows_by_hidden"], ["scored_rows"], "lm_head_rows")
        row_logits = g.node("Gemm", [rows, embed], ["row_logits"], "lm_head", transB=1)
        batch_scored = g.node("Shape", [picked], ["batch_scored"], "lm_head_batch_scored", end=2)
        logits_shape = g.node("Concat", [batch_scored, "vocab_size"], ["logits_shape"], "lm_head_logits_shape",
                              axis=0)
        g.node("Reshape", [row_logits, logits_shape], [logits], "lm_head_logits")
    else:
        lm_head = g.weight("lm_head.weight.transposed",
                           state.get("lm_head.weight", state["model.embed_tokens.weight"]).T)
        g.node("MatMul", [picked, lm_head], [logits], "lm_head")
    if arch.final_logit_softcap:
        cap = g.weight("final_logit_softcap", np.array(arch.final_logit_softcap, np.float32))
        divided = g.node("Div", [logits, cap], ["logits_over_cap"], "softcap_divide")
        g.node("Mul", [g.node("Tanh", [divided], ["logits_tanh"], "softcap_tanh"), cap], [LOGITS], "softcap_scale")

    cache_shape = ["batch", kv_heads, "max_length", head_dim]
    inputs = [helper.make_tensor_value_info(input_ids, TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info(seqlens_k, TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info(total_sequence_length, TensorProto.INT32, []),
              helper.make_tensor_value_info(logits_index, TensorProto.INT64, ["batch", "scored"])]
    inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, cache_shape)
               for name in past_names(layers)]
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", "scored", config.vocab_size])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, cache_shape)
                for name in present_names(layers)]
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.initializers)
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                          helper.make_opsetid("com.microsoft", 1)],
                                    producer_name="tritonllm")
    model_proto.ir_version = 9
    return model_proto, geometry


def quantize_weights(model_proto: "onnx.ModelProto", bits: int, exclude: Sequence[str] = (),
                     include: Sequence[str] | None = None) -> "onnx.ModelProto":
    """MatMuls with a constant weight (all, or `include`, minus `exclude`) -> MatMulNBits (symmetric, BLOCK_SIZE
    channels per scale, accuracy level 4)."""
    import logging

    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    # The quantizer module calls logging.basicConfig(level=INFO) on import; undo that so the process keeps its own.
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    root_logger.handlers[:] = handlers
    root_logger.setLevel(level)
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=4, bits=bits)
    quantizer = MatMulNBitsQuantizer(model_proto, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=4, nodes_to_exclude=list(exclude),
                                     nodes_to_include=None if include is None else list(include),
                                     algo_config=config)
    logger = logging.getLogger("onnxruntime.quantization")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        quantizer.process()
    finally:
        logger.setLevel(previous)
    return quantizer.model.model


def _awq_preparation(hf_dir: Path, calibration_file: Path | None) -> Callable[[torch.nn.Module], None]:
    from transformers import AutoTokenizer

    from .awq import apply_awq
    from .fp8 import DEFAULT_CALIBRATION_FILE, load_prompts, tokenize_prompts

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts = load_prompts(calibration_file or DEFAULT_CALIBRATION_FILE)[:AWQ_CALIBRATION_PROMPTS]
    tokens = [ids.tolist() for ids in tokenize_prompts(tokenizer, prompts)]
    return lambda model: apply_awq(model, tokens, BLOCK_SIZE)


def write_decoder(hf_dir: Path, out_dir: Path, precision: str, calibration_file: Path | None = None,
                  ) -> DecoderGeometry:
    """Write `out_dir/model.onnx` (+ `model.onnx.data`, `decoder.json`) for `precision` into an existing folder.

    int8: every weight, lm_head included, in 8-bit blocks. int4: activation-aware scaling (builders/awq.py, on
    `calibration_file` or the bundled calibration prompts), then 4-bit blocks, with lm_head in 8-bit blocks (the
    logits are the most sensitive GEMM; 8 bits there cost 14 MB more than 4).
    """
    import onnx

    if precision not in GRAPH_PRECISIONS:
        raise BuildError(f"precision = {precision!r} is not supported; allowed: {', '.join(GRAPH_PRECISIONS)}")
    prepare = _awq_preparation(Path(hf_dir), calibration_file) if precision == "int4" else None
    model_proto, geometry = build_graph(Path(hf_dir), prepare, share_tied_embedding=precision == "fp32")
    quantization = "none"
    if precision == "int8":
        model_proto = quantize_weights(model_proto, bits=8)
        quantization = f"rtn int8 blocks of {BLOCK_SIZE}"
    elif precision == "int4":
        model_proto = quantize_weights(model_proto, bits=4, exclude=["lm_head"])
        model_proto = quantize_weights(model_proto, bits=8, include=["lm_head"])
        quantization = f"awq int4 blocks of {BLOCK_SIZE}, lm_head int8"
    geometry = DecoderGeometry(**{**asdict(geometry), "precision": precision, "quantization": quantization})
    out_dir = Path(out_dir)
    onnx.save_model(model_proto, str(out_dir / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=ONNX_FILE + ".data", size_threshold=1024)
    geometry.save(out_dir)
    return geometry
