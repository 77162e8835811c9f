"""ONNX Runtime execution of a decoder-with-past: grouped (chunked) prefill and one batched decode step for all rows.

KV layout of a batch: one array per layer and per key/value, [rows, kv_heads, columns, head_dim]. Every row's tokens
sit right-aligned (left padding) with attention_mask 0 on the padding, so all rows share one column count and one
session.run decodes them all; position_ids are per row (count of real tokens).

The exported graph concatenates past and new keys into a fresh `present` every step, so a decode step reads the whole
cache and writes it again (`RunnerCounters.decode_kv_bytes`), on top of the attention reading it. The decode batch
binds past and present to two preallocated buffers per array that swap roles every step (IO binding). Per step that
is no faster than plain `session.run` (measured: ORT's arena recycles output memory too); what it buys is that rows
can join and leave in place between steps instead of copying the whole cache (see DecodeBatch). Removing the per-step
copy needs a graph that appends the new token in place, e.g. the GroupQueryAttention contrib op with past and present
sharing one buffer (max-length KV buffers, `past_present_share_buffer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class RunnerCounters:
    """Work done so far; padding counts are tokens (prefill) or KV slots (decode) spent on left padding."""

    prefill_runs: int = 0
    prefill_tokens: int = 0
    prefill_padding_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum over steps of rows decoded
    decode_kv_slots: int = 0  # sum over steps of rows * columns attended
    decode_kv_padding_slots: int = 0
    decode_kv_bytes: int = 0  # sum over steps of past read + present written by the concat
    relayout_bytes: int = 0  # KV bytes copied when merging or retiring rows

    @property
    def prefill_padding_ratio(self) -> float:
        return self.prefill_padding_tokens / max(self.prefill_tokens, 1)

    @property
    def decode_padding_ratio(self) -> float:
        real = self.decode_kv_slots - self.decode_kv_padding_slots
        return self.decode_kv_padding_slots / max(real, 1)


@dataclass
class PrefillGroup:
    """Prompts prefilled together, left-padded to one length and run in column chunks (chunk k sees chunks < k)."""

    prompt_lengths: np.ndarray  # [R]
    input_ids: np.ndarray  # [R, L] left-padded
    position_ids: np.ndarray  # [R, L]
    attention_mask: np.ndarray  # [R, L]
    cache: list[np.ndarray]  # 2 * layers arrays [R, kv, done, hd]
    done: int = 0  # columns already run
    last_logits: np.ndarray | None = None  # [R, V] once every column has run

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def columns(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def finished(self) -> bool:
        return self.done == self.columns


class OnnxRunner:
    """One InferenceSession of a decoder-with-past and the model facts read from its signature."""

    def __init__(self, model_path: Path | str, intra_op_threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        inputs = {node.name: node for node in self.session.get_inputs()}
        self.num_layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        if self.num_layers == 0 or "input_ids" not in inputs:
            raise ValueError(f"{model_path} is not a decoder with past: inputs are {sorted(inputs)}")
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]
        self.present_names = [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]
        first_past = inputs[self.past_names[0]]
        _, self.kv_heads, _, self.head_dim = first_past.shape
        if not (isinstance(self.kv_heads, int) and isinstance(self.head_dim, int)):
            raise ValueError(f"{model_path}: past key shape {first_past.shape} needs static kv_heads and head_dim")
        if first_past.type not in ORT_TO_NUMPY:
            raise ValueError(f"{model_path}: KV cache type {first_past.type} is not supported (float or float16)")
        self.kv_dtype = np.dtype(ORT_TO_NUMPY[first_past.type])
        self.counters = RunnerCounters()
        # One probe run of two tokens tells the vocabulary size and whether logits cover every position.
        probe = self._run(np.zeros((1, 2), np.int64), np.ones((1, 2), np.int64), np.arange(2)[None],
                          self.empty_cache(1))
        self.vocab_size = int(probe[0].shape[-1])
        self.logits_all_positions = probe[0].shape[1] == 2

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token occupies across all layers (keys and values)."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.kv_dtype.itemsize

    def empty_cache(self, rows: int) -> list[np.ndarray]:
        return [np.zeros((rows, self.kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.past_names]

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: Sequence[np.ndarray]) -> list[np.ndarray]:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds.update(zip(self.past_names, cache))
        return self.session.run(None, feeds)

    def start_prefill(self, prompts: Sequence[Sequence[int]], pad_id: int) -> PrefillGroup:
        """Left-pad prompts into one group; nothing runs until prefill_step."""
        lengths = np.array([len(prompt) for prompt in prompts], dtype=np.int64)
        columns = int(lengths.max())
        input_ids = np.full((len(prompts), columns), pad_id, dtype=np.int64)
        position_ids = np.zeros((len(prompts), columns), dtype=np.int64)
        attention_mask = np.zeros((len(prompts), columns), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            start = columns - len(prompt)
            input_ids[row, start:] = prompt
            position_ids[row, start:] = np.arange(len(prompt))
            attention_mask[row, start:] = 1
        return PrefillGroup(lengths, input_ids, position_ids, attention_mask, self.empty_cache(len(prompts)))

    def prefill_step(self, group: PrefillGroup, max_tokens: int) -> int:
        """Run the group's next chunk of at most max_tokens tokens (at least one column); returns tokens run."""
        width = min(group.columns - group.done, max(1, max_tokens // group.rows))
        start, end = group.done, group.done + width
        outputs = self._run(group.input_ids[:, start:end], group.attention_mask[:, :end],
                            group.position_ids[:, start:end], group.cache)
        group.cache = outputs[1:]
        group.done = end
        if group.finished:
            group.last_logits = outputs[0][:, -1, :]
        real = int(group.attention_mask[:, start:end].sum())
        self.counters.prefill_runs += 1
        self.counters.prefill_tokens += real
        self.counters.prefill_padding_tokens += group.rows * width - real
        return group.rows * width

    def prefill(self, prompts: Sequence[Sequence[int]], pad_id: int, chunk_tokens: int) -> PrefillGroup:
        """Prefill a group completely, chunk after chunk."""
        group = self.start_prefill(prompts, pad_id)
        while not group.finished:
            self.prefill_step(group, chunk_tokens)
        return group


@dataclass
class _PingPong:
    """Two flat buffers per KV array; `current` holds the cache, the spare receives the next step or layout."""

    buffers: list[list[np.ndarray]] = field(default_factory=lambda: [[], []])
    current: int = 0

    def spare(self, index: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A view of the spare buffer `index` with `shape`, growing it when too small."""
        buffers = self.buffers[1 - self.current]
        needed = int(np.prod(shape))
        if index >= len(buffers) or buffers[index].size < needed:
            # Grow by half again so a growing batch does not reallocate every step; untouched pages cost nothing.
            buffer = np.empty(needed + needed // 2, dtype)
            if index < len(buffers):
                buffers[index] = buffer
            else:
                buffers.append(buffer)
        return buffers[index][:needed].reshape(shape)

    def current_fits(self, shape: tuple[int, ...]) -> bool:
        """Whether every current buffer can hold `shape` (then the cache can grow by rows in place)."""
        needed = int(np.prod(shape))
        return bool(self.buffers[self.current]) and all(b.size >= needed for b in self.buffers[self.current])

    def current_view(self, index: int, shape: tuple[int, ...]) -> np.ndarray:
        return self.buffers[self.current][index][:int(np.prod(shape))].reshape(shape)

    def swap(self) -> None:
        self.current = 1 - self.current


class DecodeBatch:
    """The running rows' KV cache, decoded one token per row per step in one session.run.

    Rows join (`merge`) and leave (`retire`) between steps. Both work in place where the layout allows (new rows no
    wider than the batch are written after the last row; a leaving row's slot is filled by a row from the end), and
    rewrite the whole cache only when the width changes: a wider newcomer re-pads every row, and a leaving row that
    frees at least 1/TRIM_DIVISOR of the columns (padding in every remaining row) is worth trimming away.
    """

    TRIM_DIVISOR = 8

    def __init__(self, runner: OnnxRunner) -> None:
        self.runner = runner
        self.lengths = np.zeros(0, dtype=np.int64)  # real tokens of each row in the cache
        self.columns = 0
        self.cache: list[np.ndarray] = runner.empty_cache(0)
        self._buffers = _PingPong()

    @property
    def rows(self) -> int:
        return int(self.lengths.size)

    def _shape(self, rows: int, columns: int) -> tuple[int, int, int, int]:
        return rows, self.runner.kv_heads, columns, self.runner.head_dim

    def merge(self, groups: Sequence[PrefillGroup]) -> None:
        """Append the rows of finished prefill groups after the running rows, in order, padded to one width."""
        lengths = np.concatenate([self.lengths, *[group.prompt_lengths for group in groups]])
        columns = max([self.columns, *[group.columns for group in groups]])
        shape = self._shape(lengths.size, columns)
        in_place = self.rows > 0 and columns == self.columns and self._buffers.current_fits(shape)
        parts = [] if in_place else [(self.cache, self.columns)]
        parts += [(group.cache, group.columns) for group in groups]
        first_row = self.rows if in_place else 0
        written = 0
        new_cache = []
        for index in range(len(self.cache)):
            if in_place:
                target = self._buffers.current_view(index, shape)  # the running rows are already in place
            else:
                target = self._buffers.spare(index, shape, self.runner.kv_dtype)
            row = first_row
            for cache, width in parts:
                end = row + cache[index].shape[0]
                target[row:end, :, :columns - width] = 0  # padding must be finite: masked zeros times NaN is NaN
                target[row:end, :, columns - width:] = cache[index]
                row = end
            written += target[first_row:].nbytes
            new_cache.append(target)
        self.runner.counters.relayout_bytes += written
        self.cache, self.lengths, self.columns = new_cache, lengths, columns
        if not in_place:
            self._buffers.swap()

    def retire(self, keep_rows: Sequence[int]) -> list[int]:
        """Keep only `keep_rows`; returns, for each remaining row, its row number before (rows may move)."""
        keep = list(keep_rows)
        if not keep:
            self.cache, self.lengths, self.columns = self.runner.empty_cache(0), self.lengths[:0], 0
            self._buffers = _PingPong()  # an idle engine gives its KV memory back
            return []
        columns = int(self.lengths[keep].max())
        skip = self.columns - columns
        if skip * self.TRIM_DIVISOR >= self.columns:
            new_cache = []
            for index, cache in enumerate(self.cache):
                target = self._buffers.spare(index, self._shape(len(keep), columns), self.runner.kv_dtype)
                for new_row, old_row in enumerate(keep):
                    target[new_row] = cache[old_row, :, skip:]
                new_cache.append(target)
            self.runner.counters.relayout_bytes += sum(array.nbytes for array in new_cache)
            self.cache, self.lengths, self.columns = new_cache, self.lengths[keep], columns
            self._buffers.swap()
            return keep
        # In place: rows kept beyond the new row count move into the slots of rows that leave.
        order = list(range(len(keep)))
        kept = set(keep)
        holes = [row for row in range(len(keep)) if row not in kept]
        movers = [row for row in keep if row >= len(keep)]
        for hole, mover in zip(holes, movers):
            order[hole] = mover
            for cache in self.cache:
                cache[hole] = cache[mover]
            self.runner.counters.relayout_bytes += sum(cache[hole].nbytes for cache in self.cache)
        self.cache = [cache[:len(keep)] for cache in self.cache]
        self.lengths = self.lengths[order]
        return order

    @staticmethod
    def attention_mask(lengths: np.ndarray, columns: int) -> np.ndarray:
        """[rows, columns] with ones on each row's last `lengths[row]` columns (its real tokens)."""
        return (np.arange(columns)[None, :] >= columns - lengths[:, None]).astype(np.int64)

    def step(self, next_ids: np.ndarray) -> np.ndarray:
        """Feed one id per row; returns logits [rows, V] for the following token."""
        runner, rows, columns = self.runner, self.rows, self.columns
        binding = runner.session.io_binding()
        small_inputs = {"input_ids": np.ascontiguousarray(next_ids, dtype=np.int64).reshape(rows, 1),
                        "attention_mask": self.attention_mask(self.lengths + 1, columns + 1),
                        "position_ids": self.lengths.reshape(rows, 1).copy()}
        for name, array in small_inputs.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output("logits", "cpu")  # first, so it is get_outputs()[0]
        present = []
        for index, (past_name, present_name) in enumerate(zip(runner.past_names, runner.present_names)):
            past = self.cache[index]
            binding.bind_input(past_name, "cpu", 0, runner.kv_dtype, past.shape, past.ctypes.data)
            target = self._buffers.spare(index, self._shape(rows, columns + 1), runner.kv_dtype)
            binding.bind_output(present_name, "cpu", 0, runner.kv_dtype, target.shape, target.ctypes.data)
            present.append(target)
        runner.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()[:, -1, :]
        counters = runner.counters
        counters.decode_steps += 1
        counters.decode_rows += rows
        counters.decode_kv_slots += rows * (columns + 1)
        counters.decode_kv_padding_slots += int(rows * (columns + 1) - (self.lengths + 1).sum())
        counters.decode_kv_bytes += sum(past.nbytes for past in self.cache) + sum(p.nbytes for p in present)
        self.cache, self.lengths, self.columns = present, self.lengths + 1, columns + 1
        self._buffers.swap()
        return logits
