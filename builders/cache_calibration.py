"""Derive the semantic cache's cosine floor from the operator's error budget (`CacheSettings.max_false_hit_rate`).

The calibration pairs (`data/cache_pairs_calibration.jsonl`, the train split of `benchmarks/make_cache_pairs.py`,
`data/cache_pairs_natural_train.jsonl`, the train split of the pairs written by hand, and `data/
cache_pairs_independent_train.jsonl`, the train split of pairs written by a separate writer) are a cached prompt `a`, a new prompt `b`, a label `hit` (serving a's answer for b is right) or `miss` (a near miss)
and a category. A pair is served as in the cache: cosine(a, b) >= floor and the verifier accepts it. The derived
floor is the lowest one on a 0.01 grid from which every higher floor also keeps the false-hit rate (wrong hits / all
hits) within the budget: 1.0 when none does. `benchmarks/cache_eval.py verifier` reports held-out splits at it.

Embedding the pairs takes seconds, so a derivation is stored under the build cache, keyed by the embedder, the
pairs, the verifier's code and data and the budget.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from tritonllm.contract import CacheSettings, SettingsError
from tritonllm.paths import cache_dir
from .source import content_key

CALIBRATION_PAIRS = tuple(Path(__file__).resolve().parent / "data" / f"cache_pairs_{split}.jsonl"
                          for split in ("calibration", "natural_train", "independent_train"))
THRESHOLDS = [round(0.50 + 0.01 * step, 2) for step in range(50)]


@dataclass(frozen=True)
class Calibration:
    """A derived floor and what it serves on the calibration pairs."""

    similarity_threshold: float
    max_false_hit_rate: float
    pairs: int
    precision: float | None
    recall: float | None
    false_hit_rate: float


def load_pairs(*paths: Path) -> list[dict]:
    """The pairs of `paths` (default: the calibration pairs), in order."""
    return [json.loads(line) for path in paths or CALIBRATION_PAIRS
            for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def scored(embedder, pairs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair: cosine of the two prompts, whether it should hit, whether the verifier accepts it."""
    from tritonllm.python_backends.cache_verifier import conflict

    texts = sorted({pair["a"] for pair in pairs} | {pair["b"] for pair in pairs})
    vectors = dict(zip(texts, embedder.embed(texts)))
    cosine = np.array([float(vectors[pair["a"]] @ vectors[pair["b"]]) for pair in pairs])
    should_hit = np.array([pair["label"] == "hit" for pair in pairs])
    accepted = np.array([conflict(pair["a"], pair["b"]) is None for pair in pairs])
    return cosine, should_hit, accepted


def served_at(scores: tuple[np.ndarray, np.ndarray, np.ndarray], threshold: float) -> dict:
    """Right and wrong hits, precision, recall and false-hit rate of `scores` at floor `threshold`."""
    cosine, should_hit, accepted = scores
    served = (cosine >= threshold) & accepted
    right, wrong = int((served & should_hit).sum()), int((served & ~should_hit).sum())
    return {"pairs": len(cosine), "should_hit": int(should_hit.sum()), "right_hits": right, "wrong_hits": wrong,
            "precision": round(right / (right + wrong), 4) if right + wrong else None,
            "recall": round(right / int(should_hit.sum()), 4) if should_hit.any() else None,
            "false_hit_rate": round(wrong / (right + wrong), 4) if right + wrong else 0.0}


def threshold_table(scores: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[dict]:
    return [{"threshold": threshold, **served_at(scores, threshold)} for threshold in THRESHOLDS]


def lowest_threshold_within(table: list[dict], max_false_hit_rate: float) -> float:
    """The lowest floor from which every higher one stays within the budget (a floor that is within it only by
    luck, with a worse one above it, is not taken); 1.0 when none is."""
    safe = 1.0
    for row in reversed(table):
        if row["false_hit_rate"] > max_false_hit_rate:
            break
        safe = row["threshold"]
    return safe


def calibrate(embedder, max_false_hit_rate: float, pairs: list[dict] | None = None) -> Calibration:
    scores = scored(embedder, load_pairs() if pairs is None else pairs)
    threshold = lowest_threshold_within(threshold_table(scores), max_false_hit_rate)
    at = served_at(scores, threshold)
    return Calibration(threshold, max_false_hit_rate, at["pairs"], at["precision"], at["recall"],
                       at["false_hit_rate"])


def resolve_threshold(cache: CacheSettings, embedder_dir: Path) -> tuple[CacheSettings, Calibration | None]:
    """`cache` with the floor the repository is rendered with: the operator's when set (> 0), else derived from
    `cache.max_false_hit_rate` with the embedder in `embedder_dir` (the Calibration is returned then)."""
    if cache.similarity_threshold > 0:
        return cache, None
    from tritonllm.python_backends import cache_verifier
    from tritonllm.python_backends.embedding import Embedder

    key = "-".join(content_key(path)[:16] for path in (Path(embedder_dir), *CALIBRATION_PAIRS,
                                                       Path(cache_verifier.__file__), cache_verifier.LEXICON_FILE,
                                                       cache_verifier.EXCEPTIONS_FILE))
    stored = cache_dir() / "cache-calibration" / f"{key}-{cache.max_false_hit_rate!r}.json"
    if stored.is_file():
        calibration = Calibration(**json.loads(stored.read_text()))
    else:
        try:
            embedder = Embedder(embedder_dir, intra_op_threads=0)
        except FileNotFoundError as error:
            raise SettingsError(f"cache.similarity_threshold = 0.0 (derive it from max_false_hit_rate) needs a "
                                f"loadable embedder: {error}; allowed: a threshold > 0, or an exported embedder")
        calibration = calibrate(embedder, cache.max_false_hit_rate)
        stored.parent.mkdir(parents=True, exist_ok=True)
        partial = stored.with_name(f"{stored.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(asdict(calibration)) + "\n")
        partial.replace(stored)  # concurrent builds: each file is whole
    return replace(cache, similarity_threshold=calibration.similarity_threshold), calibration
