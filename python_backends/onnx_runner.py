"""The executor: runs the decoder graph (builders/onnx_graph.py) on ONNX Runtime over a KV slot pool.

It only runs what it is told: a fresh prefill of prompts into consecutive slots, a continuation of one slot by
several tokens (a prefill chunk, the prompt after a reused prefix), one decode step over slots 0..n-1, or the
speculative verification of one slot (its last token and drafted tokens, scored at every position) followed by
`truncate` of the slot to the tokens accepted. The scheduler (scheduler.py) decides which; the engine loop (engine.py) samples from the logits returned here. The parity
and agreement gates of the build run this same class.

The graph's I/O names live here (`DECODER_INPUTS`, `past_names`, `present_names`): the builder writes them, this
module binds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tritonllm.python_backends.kv_slots import KVSlotPool

ONNX_FILE = "model.onnx"
DECODER_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length", "logits_index")
LOGITS = "logits"
ORT_TO_NUMPY = {"tensor(float)": np.float32}


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


@dataclass
class RunnerCounters:
    """Work done so far, for metrics and reports."""

    prefill_runs: int = 0
    prefill_tokens: int = 0  # prompt tokens computed
    prefill_padding_tokens: int = 0  # right padding of batched fresh prompts
    decode_steps: int = 0
    decode_rows: int = 0  # sum over steps of rows decoded
    decode_kv_bytes: int = 0  # sum over steps of KV bytes read (past) + written (the new token)
    verify_runs: int = 0  # speculative verification runs (one per row of a verifying step)
    verify_positions: int = 0  # tokens they scored (last token + drafted ones)

    @property
    def prefill_padding_ratio(self) -> float:
        return self.prefill_padding_tokens / max(self.prefill_tokens, 1)


class OnnxDecoder:
    """One InferenceSession of the decoder graph and the slot pool its KV lives in."""

    def __init__(self, model_path: Path | str, slots: int, max_length: int, intra_op_threads: int = 0) -> None:
        path = Path(model_path)
        path = path / ONNX_FILE if path.is_dir() else path
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {node.name: node for node in self.session.get_inputs()}
        missing = [name for name in DECODER_INPUTS if name not in inputs]
        self.num_layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        if missing or self.num_layers == 0 or len(inputs["logits_index"].shape) != 2:
            raise ValueError(f"{path} is not a tritonllm decoder graph (rebuild with `tritonllm build`): inputs "
                             f"{sorted(inputs)} lack {missing or 'past_key_values.*'} or score one position per row")
        self.past_names, self.present_names = past_names(self.num_layers), present_names(self.num_layers)
        first_past = inputs[self.past_names[0]]
        _, self.kv_heads, _, self.head_dim = first_past.shape
        if first_past.type not in ORT_TO_NUMPY:
            raise ValueError(f"{path}: KV cache type {first_past.type} is not supported (float)")
        self.kv_dtype = np.dtype(ORT_TO_NUMPY[first_past.type])
        self.vocab_size = int(self.session.get_outputs()[0].shape[-1])
        self.pool = KVSlotPool(2 * self.num_layers, slots, self.kv_heads, max_length, self.head_dim, self.kv_dtype)
        self.counters = RunnerCounters()

    @property
    def kv_bytes_per_token(self) -> int:
        return self.pool.bytes_per_token

    def _run(self, first_slot: int, input_ids: np.ndarray, lengths_after: np.ndarray, total: int,
             logits_index: np.ndarray) -> np.ndarray:
        """One graph run; logits [rows, scored, V] at the positions `logits_index` [rows, scored] names."""
        rows = input_ids.shape[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", (lengths_after - 1).astype(np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        binding.bind_cpu_input("logits_index", np.ascontiguousarray(logits_index, dtype=np.int64))
        binding.bind_output(LOGITS, "cpu")  # first, so it is get_outputs()[0]
        for past, present, view in zip(self.past_names, self.present_names, self.pool.views(first_slot, rows)):
            binding.bind_input(past, "cpu", 0, self.kv_dtype, view.shape, view.ctypes.data)
            binding.bind_output(present, "cpu", 0, self.kv_dtype, view.shape, view.ctypes.data)
        self.session.run_with_iobinding(binding)
        self.pool.lengths[first_slot:first_slot + rows] = lengths_after
        return binding.get_outputs()[0].numpy()

    def prefill(self, first_slot: int, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Fresh prompts (empty slots first_slot..) in one run, right-padded; logits [rows, V] after each prompt."""
        lengths = np.array([len(prompt) for prompt in prompts], dtype=np.int64)
        width = int(lengths.max())
        if width > self.pool.max_length:
            raise ValueError(f"a prompt of {width} tokens exceeds the slot length {self.pool.max_length}")
        input_ids = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            input_ids[row, :len(prompt)] = prompt
        logits = self._run(first_slot, input_ids, lengths, width, (lengths - 1)[:, None])[:, 0]
        self.counters.prefill_runs += 1
        self.counters.prefill_tokens += int(lengths.sum())
        self.counters.prefill_padding_tokens += int(width * len(prompts) - lengths.sum())
        return logits

    def extend(self, slot: int, start: int, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` to the `start` tokens `slot` holds (one run at batch 1); logits [1, V] after the last."""
        if start == 0:
            return self.prefill(slot, [tokens])
        logits = self._continue(slot, start, tokens, np.array([[len(tokens) - 1]]))[:, 0]
        self.counters.prefill_runs += 1
        self.counters.prefill_tokens += len(tokens)
        return logits

    def _continue(self, slot: int, start: int, tokens: Sequence[int], logits_index: np.ndarray) -> np.ndarray:
        after = int(start) + len(tokens)
        if after > self.pool.max_length:
            raise ValueError(f"slot {slot} would hold {after} tokens; the slot length is {self.pool.max_length}")
        return self._run(slot, np.asarray([tokens]), np.array([after]), after, logits_index)

    def decode(self, next_ids: Sequence[int]) -> np.ndarray:
        """One token for each of slots 0..len(next_ids)-1; logits [rows, V]."""
        rows = len(next_ids)
        after = self.pool.lengths[:rows] + 1
        if int(after.max()) > self.pool.max_length:
            raise ValueError(f"a slot would exceed its length {self.pool.max_length}")
        logits = self._run(0, np.asarray(next_ids, dtype=np.int64).reshape(rows, 1), after, int(after.max()),
                           np.zeros((rows, 1), dtype=np.int64))[:, 0]
        self.counters.decode_steps += 1
        self.counters.decode_rows += rows
        self.counters.decode_kv_bytes += int(after.sum()) * self.pool.bytes_per_token
        return logits

    def verify(self, slot: int, tokens: Sequence[int]) -> np.ndarray:
        """`slot` takes its last token and the drafted ones in one run at batch 1 (ONNX Runtime's CPU
        GroupQueryAttention takes several new tokens after a past only at batch 1); logits [len(tokens), V],
        row j scoring the token after tokens[j]. `truncate` then drops the KV of the rejected ones."""
        logits = self._continue(slot, self.pool.lengths[slot], tokens, np.arange(len(tokens))[None])[0]
        self.counters.verify_runs += 1
        self.counters.verify_positions += len(tokens)
        return logits

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first `length` tokens of `slot` (rolls back the KV of rejected drafted tokens)."""
        if not 0 <= length <= self.pool.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.pool.lengths[slot]} tokens; cannot keep {length}")
        self.pool.lengths[slot] = length
