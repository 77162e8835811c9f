"""Speculative decoding: a drafter proposes the next tokens of a sequence, the target verifies them in one pass.

Drafters (a request's `speculative` input picks one; EngineSettings.speculative_drafter is the default):
- `PromptLookup`: the continuation of the longest recent n-gram match in the prompt and output; no model;
- `ModelDrafter`: a second decoder graph sharing the target's tokenizer (the int8/int4 build of the same model, or a
  smaller model), one decode step per drafted token from its own KV slots.

The engine runs the verification (onnx_runner.OnnxDecoder.verify: each row's last token plus its drafted tokens,
scored at every position) and then chooses tokens position by position with the sequence's own sampler: a greedy
sequence keeps a drafted token only while the target's argmax equals it, so its output is token for token that of
plain decoding; a sampled one keeps or replaces it by speculative sampling (sampling.speculative_choice), which
preserves the target's distribution. The KV of rejected positions is dropped (OnnxDecoder.truncate). Guided
sequences do not speculate (their mask depends on every token before).

The scheduler (scheduler.py) decides how many tokens each sequence may draft in a step; `next_draft_limit` adapts a
sequence's limit to its measured acceptance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tritonllm.python_backends.onnx_runner import OnnxDecoder
from tritonllm.python_backends.sampling import Distribution, Sampler, draw


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


class ModelDrafter:
    """Drafting with a draft model: one decode step of the draft graph per proposed token, greedy for a greedy
    sequence, drawn from the draft's distribution (with the sequence's own temperature, top-k, top-p and bans) for a
    sampled one.

    Its KV slots mirror the target's (the engine replays the scheduler's slot moves here). Each slot remembers which
    sequence's tokens its KV holds; a proposal first feeds the draft the tokens it has not seen (the whole prompt the
    first time a sequence speculates, then the tokens the target kept since: a draft rejected by the target is
    overwritten, which is the rollback) in one run, then steps once per further token. Sequences that never
    speculate (a full batch) cost the draft nothing.
    """

    name = "draft_model"  # its EngineSettings.speculative_drafter value

    def __init__(self, onnx_path, slots: int, max_length: int, intra_op_threads: int = 0) -> None:
        self.executor = OnnxDecoder(onnx_path, slots, max_length, intra_op_threads)
        self.vocab_size = self.executor.vocab_size
        self._held: list[tuple[object, list[int]] | None] = [None] * slots  # (sequence, tokens its KV holds)

    def move(self, source: int, target: int) -> None:
        """The target's slot `source` moved to `target`: so does the draft's."""
        self.executor.pool.move(source, target)
        self._held[target], self._held[source] = self._held[source], None

    def clear(self) -> None:
        self._held = [None] * len(self._held)
        self.executor.pool.lengths[:] = 0

    def propose(self, slot: int, owner: object, tokens: Sequence[int], limit: int,
                sampler: Sampler) -> tuple[list[int], list[Distribution] | None]:
        """Up to `limit` tokens to follow `tokens` (prompt + generated of `owner`, in target slot `slot`), and for a
        sampled sequence the draft's distribution at each of them."""
        if limit <= 0:
            return [], None
        held = self._held[slot]
        known = _common_prefix(held[1], tokens) if held is not None and held[0] is owner else 0
        known = min(known, len(tokens) - 1)
        logits = self.executor.extend(slot, known, tokens[known:])[0]
        history = list(tokens)
        drafted: list[int] = []
        distributions: list[Distribution] | None = None if sampler.greedy else []
        while True:
            banned = sampler.banned_ids(history)
            if distributions is None:
                if banned:
                    logits = logits.copy()
                    logits[banned] = -np.inf
                token = int(np.argmax(logits))
            else:
                distribution = sampler.distribution(logits, banned)
                distributions.append(distribution)
                token = draw(*distribution, sampler.rng)
            drafted.append(token)
            history.append(token)
            if len(drafted) == limit:
                break
            logits = self.executor.extend(slot, len(history) - 1, [token])[0]
        self._held[slot] = (owner, history[:-1])  # the last drafted token was never fed
        return drafted, distributions


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    length = min(len(first), len(second))
    differ = np.flatnonzero(np.asarray(first[:length]) != np.asarray(second[:length]))
    return int(differ[0]) if differ.size else length


def next_draft_limit(limit: int, drafted: int, accepted: int, maximum: int) -> int:
    """A sequence's draft limit after a verification: up by 2 when every drafted token was accepted, down by 1
    otherwise (the heuristic of Hugging Face's assisted generation), within 1..maximum."""
    if drafted == 0:
        return limit
    return max(1, min(maximum, limit + 2 if accepted == drafted else limit - 1))
