"""Choosing the next token of every running sequence from one batched logits array.

Greedy rows are decided for the whole batch in one vectorized argmax; sampled rows are drawn one by one in float64
from each sequence's own random generator, so a seeded request gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tritonllm.contract import input_problem
from tritonllm.python_backends.errors import InvalidArgument

# Top-p first looks at this many most likely tokens; only when they hold less than top_p of the mass does it sort the
# whole vocabulary (a full argsort of 49k float64 costs milliseconds per row).
TOP_P_PRESELECT = 1024

TokenWords = tuple[tuple[int, ...], ...]
Distribution = tuple[np.ndarray, np.ndarray]  # candidate ids, their probabilities


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. temperature 0 (or top_k 1) is greedy; top_k 0 and top_p 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: fresh entropy from the OS
    min_tokens: int = 0  # end_id is banned until this many tokens were generated
    end_id: int | None = None  # None: the sequence ends only by max tokens, stop words or cancellation
    stop_words: TokenWords = ()  # token-id sequences; generation stops after one is produced (it stays in the output)
    bad_words: TokenWords = ()  # token-id sequences that are never completed

    @classmethod
    def from_optional(cls, *, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None, seed: int | None = None, min_tokens: int | None = None,
                      end_id: int | None = None, stop_words: Sequence[Sequence[int]] = (),
                      bad_words: Sequence[Sequence[int]] = ()) -> SamplingParams:
        """Build from request inputs that may be absent.

        A request that names no sampling input is greedy (as in TensorRT-LLM); one that asks only for top_k or
        top_p samples at temperature 1.
        """
        if temperature is None:
            asks_sampling = (top_k is not None and top_k != 1) or (top_p is not None and top_p < 1.0)
            temperature = 1.0 if asks_sampling else 0.0
        return cls(temperature=float(temperature), top_k=0 if top_k is None else int(top_k),
                   top_p=1.0 if top_p is None else float(top_p), seed=None if seed is None else int(seed),
                   min_tokens=0 if min_tokens is None else int(min_tokens), end_id=end_id,
                   stop_words=tuple(tuple(int(i) for i in word) for word in stop_words),
                   bad_words=tuple(tuple(int(i) for i in word) for word in bad_words))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidArgument naming the first input out of its allowed range (tritonllm.contract.INPUT_RANGES,
        with this engine's vocabulary)."""
        for name in ("temperature", "top_k", "top_p", "seed", "min_tokens", "end_id"):
            problem = input_problem(name, getattr(self, name), vocab_size)
            if problem:
                raise InvalidArgument(problem)
        for name, words in (("stop_words", self.stop_words), ("bad_words", self.bad_words)):
            for word in words:
                _require(len(word) > 0 and all(0 <= i < vocab_size for i in word), name, list(word),
                         f"non-empty token-id lists with ids in 0..{vocab_size - 1}")


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise InvalidArgument(f"{name} = {value!r} is not allowed; allowed: {allowed}")


class Sampler:
    """Token choice for one sequence: its bans (bad words, min_tokens) and, when sampling, its own generator."""

    def __init__(self, params: SamplingParams, prompt_length: int) -> None:
        self.params = params
        self.prompt_length = prompt_length
        self.rng = np.random.default_rng(params.seed)
        self._always_banned = [word[0] for word in params.bad_words if len(word) == 1]
        self._banned_after = [(word[:-1], word[-1]) for word in params.bad_words if len(word) > 1]

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    def banned_ids(self, history: Sequence[int]) -> list[int]:
        """Ids that must not come next after `history` (prompt + generated ids)."""
        banned = list(self._always_banned)
        for prefix, last in self._banned_after:
            if len(history) >= len(prefix) and tuple(history[len(history) - len(prefix):]) == prefix:
                banned.append(last)
        end_id = self.params.end_id
        if end_id is not None and len(history) - self.prompt_length < self.params.min_tokens:
            banned.append(end_id)
        return banned

    def sample(self, logits: np.ndarray, banned: Sequence[int]) -> int:
        """Draw one id from float32 logits [V] with temperature, top-k and top-p, in float64."""
        return draw(*self.distribution(logits, banned), self.rng)

    def distribution(self, logits: np.ndarray, banned: Sequence[int]) -> Distribution:
        """The ids this sequence may draw next from float32 logits [V] and their probabilities (float64, summing to
        1) after temperature, bans, top-k and top-p: the one definition of the processing, which plain sampling
        draws from and speculative sampling (`speculative_choice`) preserves."""
        scores = logits.astype(np.float64) / self.params.temperature
        if banned:
            scores[list(banned)] = -np.inf
        top_k = self.params.top_k
        if 0 < top_k < scores.size:
            candidates = np.argpartition(-scores, top_k - 1)[:top_k]
        else:
            candidates = np.arange(scores.size)
        probs = np.exp(scores[candidates] - scores[candidates].max())
        probs /= probs.sum()
        if self.params.top_p < 1.0:
            candidates, probs = _nucleus(candidates, probs, self.params.top_p)
            probs = probs / probs.sum()
        return candidates, probs


def draw(candidates: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> int:
    """One of `candidates`, with probability proportional to its (non-negative) weight."""
    cumulative = np.cumsum(weights)
    pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(candidates[min(pick, candidates.size - 1)])


def speculative_choice(target: Distribution, drafted: int, draft: Distribution | None,
                       rng: np.random.Generator) -> int:
    """The token a sampled sequence keeps at a drafted position: standard speculative sampling (Leviathan et al.
    2023, Chen et al. 2023). Keep `drafted` with probability min(1, p(x) / q(x)), else draw from max(0, p - q)
    renormalized; the result is distributed as the target's p whatever the draft's q. `draft` None: a deterministic
    drafter (prompt lookup), q a point mass at `drafted`, so the rule keeps it with probability p(x), else draws
    from p without x. The result equals `drafted` exactly when it was kept (the residual has no mass at x)."""
    candidates, p = target
    q = np.zeros_like(p)  # the draft's probability of each target candidate
    if draft is None:
        q[candidates == drafted] = 1.0
        q_drafted = 1.0
    else:
        draft_ids, draft_probs = draft
        order = np.argsort(draft_ids)
        sorted_ids = draft_ids[order]
        at = np.minimum(np.searchsorted(sorted_ids, candidates), sorted_ids.size - 1)
        found = sorted_ids[at] == candidates
        q[found] = draft_probs[order][at[found]]
        q_drafted = float(draft_probs[draft_ids == drafted].sum())
    p_drafted = float(p[candidates == drafted].sum())
    if rng.random() * q_drafted < p_drafted:
        return drafted
    residual = np.maximum(p - q, 0.0)
    if residual.sum() <= 0.0:  # p == q up to rounding: the draw above keeps x with probability 1 but for rounding
        return drafted
    return draw(candidates, residual, rng)


def _nucleus(candidates: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest most-likely set of candidates holding at least top_p of the mass."""
    if probs.size > TOP_P_PRESELECT:
        head = np.argpartition(-probs, TOP_P_PRESELECT - 1)[:TOP_P_PRESELECT]
        if probs[head].sum() >= top_p:
            candidates, probs = candidates[head], probs[head]
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    keep = int(np.searchsorted(np.cumsum(sorted_probs), top_p, side="left")) + 1
    return candidates[order[:keep]], sorted_probs[:keep]


def sample_batch(logits: np.ndarray, samplers: Sequence[Sampler], histories: Sequence[Sequence[int]],
                 drafted: Sequence[tuple[int, Distribution | None] | None] | None = None) -> np.ndarray:
    """Next id of every row of logits [B, V]: one argmax call for all greedy rows, one draw per sampled row.

    `drafted` (per row, or None): the token a drafter proposed at this position and the draft's distribution (None
    for a deterministic drafter); a sampled row then keeps or replaces it by `speculative_choice`. Greedy rows need
    no rule: their argmax is kept, and the engine accepts a drafted token only when it equals it."""
    next_ids = np.empty(len(samplers), dtype=np.int64)
    bans = [sampler.banned_ids(history) for sampler, history in zip(samplers, histories)]
    greedy_rows = [row for row, sampler in enumerate(samplers) if sampler.greedy]
    if greedy_rows:
        greedy_logits = logits if len(greedy_rows) == len(samplers) else logits[greedy_rows]
        if any(bans[row] for row in greedy_rows):
            greedy_logits = np.array(greedy_logits, copy=True)
            for position, row in enumerate(greedy_rows):
                greedy_logits[position, bans[row]] = -np.inf
        next_ids[greedy_rows] = np.argmax(greedy_logits, axis=1)
    for row, sampler in enumerate(samplers):
        if sampler.greedy:
            continue
        proposal = drafted[row] if drafted is not None else None
        if proposal is None:
            next_ids[row] = sampler.sample(logits[row], bans[row])
        else:
            next_ids[row] = speculative_choice(sampler.distribution(logits[row], bans[row]), *proposal, sampler.rng)
    return next_ids


def words_from_list(words_list: np.ndarray | None, name: str) -> TokenWords:
    """Token-id words from TensorRT-LLM's words list [2, N]: row 0 ids, row 1 end offsets padded with -1."""
    if words_list is None:
        return ()
    if words_list.ndim != 2 or words_list.shape[0] != 2:
        raise InvalidArgument(f"{name} must have shape [2, N] (ids, end offsets), got {list(words_list.shape)}")
    ids, ends = words_list[0].tolist(), [end for end in words_list[1].tolist() if end >= 0]
    if any(later <= earlier for earlier, later in zip([0] + ends, ends)) or (ends and ends[-1] > len(ids)):
        raise InvalidArgument(f"{name}: end offsets {ends} must be increasing and at most {len(ids)}")
    return tuple(tuple(ids[start:end]) for start, end in zip([0] + ends, ends))
