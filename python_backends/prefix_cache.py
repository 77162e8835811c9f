"""Automatic prefix reuse: KV of prompt blocks already computed, found again by a hash chain that starts at the tenant.

A prompt is cut into blocks of `block_tokens`; block i's key hashes block i-1's key with block i's token ids, and
block 0's key hashes the tenant, so a key names the whole prefix up to its block *for one tenant*: the KV of one
tenant's prompt can never be found from another tenant's (the "prompt leakage" a shared prefix cache must avoid).
Blocks are copies (`[layers x 2, kv_heads, block_tokens, head_dim]` arrays), loaded into a sequence's slot at
admission; unused blocks are evicted least recently used within `max_tokens`.

Pure bookkeeping plus the block arrays: the scheduler decides what to look up and store, the executor's slot pool
copies KV in and out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def block_keys(tenant: str, tokens: Sequence[int], block_tokens: int, blocks: int) -> list[bytes]:
    """Keys of the first `blocks` full blocks of `tokens` for `tenant`."""
    digest = hashlib.blake2b(b"tenant:" + tenant.encode("utf-8"), digest_size=16).digest()
    keys = []
    for index in range(blocks):
        block = np.asarray(tokens[index * block_tokens:(index + 1) * block_tokens], dtype=np.int64)
        digest = hashlib.blake2b(digest + block.tobytes(), digest_size=16).digest()
        keys.append(digest)
    return keys


@dataclass
class PrefixStats:
    lookups: int = 0
    lookup_tokens: int = 0  # prompt tokens of looked-up sequences
    hit_tokens: int = 0  # of those, served from cached blocks
    stored_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    def __init__(self, block_tokens: int, max_tokens: int) -> None:
        self.block_tokens = block_tokens
        self.max_blocks = max_tokens // block_tokens if block_tokens else 0
        self._blocks: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.stats = PrefixStats()

    @property
    def enabled(self) -> bool:
        return self.max_blocks > 0

    @property
    def tokens(self) -> int:
        return len(self._blocks) * self.block_tokens

    def reusable_blocks(self, prompt_length: int) -> int:
        """Full blocks of a prompt that may come from the cache: its last token is always computed (its logits
        choose the first new token)."""
        return (prompt_length - 1) // self.block_tokens if self.enabled else 0

    def match(self, tenant: str, tokens: Sequence[int]) -> list[np.ndarray]:
        """The cached blocks that continue `tokens` from its start, in order (possibly none)."""
        if not self.enabled:
            return []
        found = []
        for key in block_keys(tenant, tokens, self.block_tokens, self.reusable_blocks(len(tokens))):
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(tokens)
        self.stats.hit_tokens += len(found) * self.block_tokens
        return found

    def missing(self, tenant: str, tokens: Sequence[int], computed: int) -> list[tuple[int, bytes]]:
        """(block index, key) of the full prompt blocks within the first `computed` tokens that are not cached."""
        if not self.enabled:
            return []
        blocks = min(computed, len(tokens)) // self.block_tokens
        return [(index, key) for index, key in enumerate(block_keys(tenant, tokens, self.block_tokens, blocks))
                if key not in self._blocks]

    def store(self, key: bytes, block: np.ndarray) -> None:
        self._blocks[key] = block
        self._blocks.move_to_end(key)
        self.stats.stored_blocks += 1
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
            self.stats.evicted_blocks += 1
