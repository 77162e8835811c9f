"""Speculative decoding: a drafter proposes the next tokens of a sequence, the target verifies them in one pass.

The engine runs the verification (onnx_runner.OnnxDecoder.verify: each row's last token plus its drafted tokens,
scored at every position) and then samples position by position with the sequence's own sampler, accepting a
drafted token only while the target's choice at that position equals it. For greedy sequences that is exactly the
token plain decoding would have produced, so the output is the same token for token; the KV of rejected positions
is dropped (OnnxDecoder.truncate). Sampled and guided sequences do not speculate.

The scheduler (scheduler.py) decides how many tokens each sequence may draft in a step; `next_draft_limit` adapts a
sequence's limit to its measured acceptance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tritonllm.contract import EngineSettings


class PromptLookup:
    """Prompt lookup (n-gram) drafting: find the most recent earlier occurrence of the sequence's last n tokens
    (longest n first, max_ngram down to min_ngram) and propose the tokens that followed it. No model."""

    name = "prompt_lookup"  # its EngineSettings.speculative_drafter value

    def __init__(self, max_ngram: int, min_ngram: int) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens to follow `tokens` (prompt + generated); empty when no n-gram recurs."""
        if limit <= 0:
            return []
        history = np.asarray(tokens, dtype=np.int64)
        length = history.size
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            suffix = history[length - n:]
            # Candidate starts 0..length-n-1: an occurrence that ends before the suffix itself does.
            match = np.ones(length - n, dtype=bool)
            for offset in range(n):
                match &= history[offset:length - n + offset] == suffix[offset]
            starts = np.flatnonzero(match)
            if starts.size:
                follow = int(starts[-1]) + n
                return history[follow:follow + limit].tolist()
        return []


def make_drafter(settings: EngineSettings) -> PromptLookup | None:
    """The drafter `settings.speculative_drafter` names (validated; "off": None)."""
    if settings.speculative_drafter == PromptLookup.name:
        return PromptLookup(settings.prompt_lookup_max_ngram, settings.prompt_lookup_min_ngram)
    return None


def next_draft_limit(limit: int, drafted: int, accepted: int, maximum: int) -> int:
    """A sequence's draft limit after a verification: up by 2 when every drafted token was accepted, down by 1
    otherwise (the heuristic of Hugging Face's assisted generation), within 1..maximum."""
    if drafted == 0:
        return limit
    return max(1, min(maximum, limit + 2 if accepted == drafted else limit - 1))
