"""The KV cache as a pool of slots: per layer and kind one `[slots, kv_heads, max_length, head_dim]` buffer.

A sequence owns one slot from admission to retirement. GroupQueryAttention reads the past from the slot and writes
the new positions into the same buffer (past and present are one allocation), so a decode step moves only the new
tokens' keys and values. A run over several slots binds a contiguous range of them: the scheduler keeps decoding
sequences at the front (slots 0..R-1) and fills holes by moving slots (`move`), copying only the tokens a slot holds.

The buffers come from `np.zeros`, which the kernel backs with pages only when they are first written: a pool sized
for max_slots x max_length costs the memory of the tokens actually held (the engine's KV budget bounds that).
"""

from __future__ import annotations

import numpy as np


class KVSlotPool:
    def __init__(self, arrays: int, slots: int, kv_heads: int, max_length: int, head_dim: int,
                 dtype: np.dtype = np.dtype(np.float32)) -> None:
        self.slots, self.max_length = slots, max_length
        self.buffers = [np.zeros((slots, kv_heads, max_length, head_dim), dtype) for _ in range(arrays)]
        self.lengths = np.zeros(slots, dtype=np.int64)  # tokens held by each slot
        self.bytes_per_token = arrays * kv_heads * head_dim * np.dtype(dtype).itemsize
        self.bytes_copied = 0  # by moves and prefix loads/stores (the cost of compaction and reuse)

    def views(self, first: int, count: int) -> list[np.ndarray]:
        """Each buffer's slots first..first+count-1: contiguous, so they bind to ONNX Runtime without a copy."""
        return [buffer[first:first + count] for buffer in self.buffers]

    def move(self, source: int, target: int) -> None:
        """Give slot `target` the tokens of `source`; `source` is then empty."""
        length = int(self.lengths[source])
        for buffer in self.buffers:
            buffer[target, :, :length] = buffer[source, :, :length]
        self.lengths[target], self.lengths[source] = length, 0
        self.bytes_copied += length * self.bytes_per_token

    def read(self, slot: int, start: int, end: int) -> np.ndarray:
        """A copy of positions start..end-1 of `slot`: [arrays, kv_heads, end - start, head_dim]."""
        self.bytes_copied += (end - start) * self.bytes_per_token
        return np.stack([buffer[slot, :, start:end] for buffer in self.buffers])

    def write(self, slot: int, start: int, block: np.ndarray) -> None:
        """Put `block` (as `read` returns it) at positions start.. of `slot`, which then holds `start + block` tokens."""
        end = start + block.shape[2]
        for buffer, part in zip(self.buffers, block):
            buffer[slot, :, start:end] = part
        self.lengths[slot] = end
        self.bytes_copied += (end - start) * self.bytes_per_token
