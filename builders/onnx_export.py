"""Export a decoder-only HF model to ONNX with an explicit KV cache (decoder-with-past), in fp32 / int8 / bf16.

Graph contract (what the ONNX Runtime engine feeds and reads):

inputs
  input_ids                  int64 [batch, sequence]           new tokens (prefill: the prompt or a chunk; decode: 1)
  attention_mask             int64 [batch, past + sequence]    1 = real token, 0 = padding (left padding)
  position_ids               int64 [batch, sequence]           per row: position of each new token among real tokens
  past_key_values.{i}.key    float [batch, kv_heads, past, head_dim]   (past may be 0)
  past_key_values.{i}.value  float [batch, kv_heads, past, head_dim]
outputs
  logits                     float [batch, 1, vocab]           for the LAST new position only (see below)
  present.{i}.key / .value   float [batch, kv_heads, past + sequence, head_dim]

Only the last position's logits are computed by default: the engine samples one token per sequence and, with left
padding, every row's last new token sits in the last column. The 49152-wide lm_head over every prompt token would be
~25% of SmolLM2's prefill FLOPs for rows nobody reads. `last_logits_only=False` gives [batch, sequence, vocab].

Attention is exported as `grouped_attention` below: transformers' eager attention without its `repeat_kv`. Eager
attention's additive mask uses the dtype's finite minimum, so rows of left-padding tokens (which attend to nothing)
stay finite; a fully masked row through SDPA can give NaN keys/values at padded positions, and a NaN key poisons every
later step even where it is masked (NaN * 0 is NaN). `repeat_kv` would copy the whole KV cache of every layer
(x query heads / kv heads) on every decode step; grouping the query heads by their kv head reads the cache in place.

Precisions (measured on SmolLM2-135M, see benchmarks/precision_report.py):
  fp32  the export as is; parity with torch fp32 ~1e-4 max |logit difference|.
  int8  8-bit weights, one scale per block of 32 input channels (ONNX Runtime `MatMulNBits`, symmetric), with
        activations quantized per block on the fly (accuracy_level 4 = int8 dot products). All MatMuls with a
        constant weight, lm_head included. Greedy agreement with fp32 0.96; ONNX Runtime's `quantize_dynamic`
        (per-channel weights, one activation scale per tensor) reached only 0.82 on the same prompts.
  bf16  refused: ONNX Runtime's CPU provider has no bfloat16 kernels for MatMul/Gemm/Add/Mul/Softmax (session
        creation fails with NOT_IMPLEMENTED), so a bf16 graph cannot run on this engine.

`decoder.json` next to `model.onnx` records the graph's geometry for the engine (layers, kv heads, head dim, dtype).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import BuildError

ONNX_FILE = "model.onnx"
METADATA_FILE = "decoder.json"
OPSET = 18
EXPORT_PRECISIONS = ("fp32", "int8", "bf16")


class FlatCacheDecoder(torch.nn.Module):
    """Wraps a causal LM so its KV cache travels as flat tensors, which is what an ONNX graph can take and give."""

    def __init__(self, model: torch.nn.Module, last_logits_only: bool) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.logits_to_keep = 1 if last_logits_only else 0  # 0 = all positions (transformers' convention)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        pairs = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.num_layers)]
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=DynamicCache(pairs), use_cache=True, logits_to_keep=self.logits_to_keep)
        present = [tensor for layer in output.past_key_values.layers for tensor in (layer.keys, layer.values)]
        return (output.logits, *present)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the exported graph, in order."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


GROUPED_ATTENTION = "grouped_eager"


def grouped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                      **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention for grouped-query heads without materialising repeated keys/values.

    query [batch, heads, new, head_dim]; key/value [batch, kv_heads, total, head_dim]; query head h uses kv head
    h // (heads / kv_heads), so the heads of one group are adjacent and a reshape lines them up with their kv head.
    """
    batch, heads, new, head_dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    grouped_query = query.reshape(batch, kv_heads, (heads // kv_heads) * new, head_dim)
    scores = torch.matmul(grouped_query, key.transpose(2, 3)) * scaling
    scores = scores.reshape(batch, kv_heads, heads // kv_heads, new, total)
    if attention_mask is not None:  # [batch, 1, new, total] -> broadcast over kv heads and group
        scores = scores + attention_mask[:, :, None, :, :total]
    probabilities = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(probabilities.reshape(batch, kv_heads, (heads // kv_heads) * new, total), value)
    output = output.reshape(batch, heads, new, head_dim).transpose(1, 2).contiguous()
    return output, probabilities


def load_causal_lm(hf_dir: Path, dtype: torch.dtype = torch.float32, attention: str = "eager") -> torch.nn.Module:
    """The HF model in eval mode; `attention` is "eager" (the reference) or GROUPED_ATTENTION (what is exported)."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if attention == GROUPED_ATTENTION:
        AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_ATTENTION, eager_mask)
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation=attention)
    except (OSError, ValueError, KeyError) as error:
        raise BuildError(f"cannot load the model in {hf_dir}: {type(error).__name__}: {error}") from error
    return model.eval()


INT8_BLOCK_SIZE = 32  # input channels per weight scale; 128 measured 0.949 greedy agreement vs 0.965 for 32
BF16_UNSUPPORTED = (
    "precision bf16 is not available for the onnxruntime engine: ONNX Runtime's CPU execution provider has no "
    "bfloat16 kernels for MatMul, Gemm, Add, Mul or Softmax (session creation fails with NOT_IMPLEMENTED; "
    "benchmarks/precision_report.py shows the probe), so a bf16 graph cannot run; choose fp32 or int8")


def export_decoder(hf_dir: Path, out_dir: Path, precision: str = "fp32", last_logits_only: bool = True,
                   fp32_dir: Path | None = None) -> Path:
    """Export `hf_dir` to `out_dir/model.onnx` (+ `model.onnx.data`, `decoder.json`) in `precision`; returns out_dir.

    `out_dir` is written under a temporary name and renamed at the end, so it never exists half-written. int8 is
    derived from an fp32 export: pass `fp32_dir` (an earlier fp32 export of the same model with the same
    `last_logits_only`) to skip exporting again.
    """
    if precision not in EXPORT_PRECISIONS:
        raise BuildError(f"precision = {precision!r} is not supported; allowed: {', '.join(EXPORT_PRECISIONS)}")
    if precision == "bf16":
        raise BuildError(BF16_UNSUPPORTED)
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as work:
        result_dir = Path(work) / precision
        if precision == "fp32":
            _export_fp32(hf_dir, result_dir, last_logits_only)
        else:
            if fp32_dir is None:
                fp32_dir = Path(work) / "fp32"
                _export_fp32(hf_dir, fp32_dir, last_logits_only)
            quantize_int8(Path(fp32_dir), result_dir)
        _write_metadata(hf_dir, result_dir, precision, last_logits_only)
        # TemporaryDirectory and the quantizer make private files; the server may run as another user.
        result_dir.chmod(0o755)
        for file in result_dir.iterdir():
            file.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        result_dir.rename(out_dir)
    return out_dir


def _export_fp32(hf_dir: Path, out_dir: Path, last_logits_only: bool) -> None:
    model = load_causal_lm(hf_dir, attention=GROUPED_ATTENTION)
    config = model.config
    num_layers = config.num_hidden_layers
    kv_heads = config.num_key_value_heads
    head_dim = _head_dim(config)
    wrapper = FlatCacheDecoder(model, last_logits_only).eval()

    # Example shapes are all different and > 1 so the exporter cannot specialise a dim to a constant.
    batch, sequence, past = 2, 3, 5
    input_ids = torch.randint(0, config.vocab_size, (batch, sequence), dtype=torch.int64)
    attention_mask = torch.ones(batch, past + sequence, dtype=torch.int64)
    position_ids = torch.arange(past, past + sequence, dtype=torch.int64).expand(batch, sequence)
    past_key_values = tuple(torch.randn(batch, kv_heads, past, head_dim) for _ in range(2 * num_layers))

    batch_dim = torch.export.Dim("batch", max=4096)
    sequence_dim = torch.export.Dim("sequence", max=1_048_576)
    past_dim = torch.export.Dim("past_sequence", max=1_048_576)
    dynamic_shapes = {
        "input_ids": {0: batch_dim, 1: sequence_dim},
        # past + sequence: torch.export cannot declare a sum of two dims, but derives it from the model.
        "attention_mask": {0: batch_dim, 1: torch.export.Dim.AUTO},
        "position_ids": {0: batch_dim, 1: sequence_dim},
        "past_key_values": tuple({0: batch_dim, 2: past_dim} for _ in range(2 * num_layers)),
    }
    input_names, output_names = io_names(num_layers)
    out_dir.mkdir(parents=True)
    try:
        # The exporter warns about unused axis names and missing torchvision ops; none of it concerns this graph.
        with torch.no_grad(), warnings.catch_warnings(), _quiet_logger("torch.onnx"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, (input_ids, attention_mask, position_ids, past_key_values),
                dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names,
                opset_version=OPSET, external_data=True, optimize=True, verbose=False,
            )
    except Exception as error:  # the exporter raises many types; the build wants one clear failure
        raise BuildError(f"ONNX export of {hf_dir} failed: {type(error).__name__}: {error}") from error
    # The derived dim gets an opaque name (e.g. "s53"); give it the name the present outputs carry.
    mask_input = program.model.graph.inputs[1]
    mask_input.shape = type(mask_input.shape)([mask_input.shape[0], "past_sequence + sequence"])
    program.save(out_dir / ONNX_FILE, external_data=True)


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantize_int8(fp32_dir: Path, out_dir: Path) -> None:
    """8-bit block-quantized weights for every MatMul with a constant weight (see the module docstring)."""
    root_logger = logging.getLogger()
    root_handlers, root_level = list(root_logger.handlers), root_logger.level
    # This module calls logging.basicConfig(level=INFO) on import; undo that so the process keeps its logging.
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    root_logger.handlers[:] = root_handlers
    root_logger.setLevel(root_level)
    model = load_onnx_with_weights(Path(fp32_dir) / ONNX_FILE)
    _fold_transposed_weights(model)
    config = DefaultWeightOnlyQuantConfig(block_size=INT8_BLOCK_SIZE, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=INT8_BLOCK_SIZE, is_symmetric=True, accuracy_level=4,
                                     algo_config=config)
    with _quiet_logger("onnxruntime.quantization"):
        quantizer.process()
    out_dir.mkdir(parents=True)
    quantizer.model.save_model_to_file(str(out_dir / ONNX_FILE), use_external_data_format=True)


def load_onnx_with_weights(path: Path) -> "onnx.ModelProto":
    """The model with its external data read in.

    `onnx.load` refuses external data files with more than one hard link ("hardlink attack"), and builds hard-link
    their artifacts into the repository, so the data is read here directly (ONNX Runtime itself has no such check).
    """
    import onnx

    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        data_file = (path.parent / info["location"]).resolve()
        if data_file.parent != path.parent.resolve():
            raise BuildError(f"{path}: tensor {tensor.name} points outside its folder ({info['location']})")
        with data_file.open("rb") as stream:
            stream.seek(int(info.get("offset", 0)))
            tensor.raw_data = stream.read(int(info["length"])) if "length" in info else stream.read()
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    return model


def _fold_transposed_weights(model: "onnx.ModelProto") -> None:
    """MatMul(x, Transpose(W)) with W an initializer -> MatMul(x, W.T) with W.T stored, so it can be quantized.

    A tied lm_head reaches the graph this way (the embedding matrix, transposed at run time); it is ~20% of
    SmolLM2's weight bytes read per decode step, too much to leave in fp32.
    """
    from onnx import numpy_helper

    initializers = {initializer.name: initializer for initializer in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    folded_transposes = []
    for node in model.graph.node:
        transpose = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[transpose.input[0]])
        if weight.ndim != 2:
            continue
        folded_name = f"{transpose.input[0]}.transposed"
        if folded_name not in initializers:
            folded = numpy_helper.from_array(np.ascontiguousarray(weight.T), folded_name)
            model.graph.initializer.append(folded)
            initializers[folded_name] = folded
        node.input[1] = folded_name
        folded_transposes.append(transpose)
    # A Transpose nobody reads any more would still be folded into a full fp32 copy when the session loads.
    still_read = {name for node in model.graph.node for name in node.input}
    still_read |= {output.name for output in model.graph.output}
    for transpose in {id(t): t for t in folded_transposes}.values():
        if transpose.output[0] not in still_read:
            model.graph.node.remove(transpose)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_metadata(hf_dir: Path, onnx_dir: Path, precision: str, last_logits_only: bool) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    metadata = {
        "precision": precision,
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": _head_dim(config),
        "vocab_size": config.vocab_size,
        "cache_dtype": "float32",
        "last_logits_only": last_logits_only,
    }
    (onnx_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
