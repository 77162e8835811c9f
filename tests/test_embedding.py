"""The ONNX sentence embedder: export check, pooling, batching and coalescing of concurrent lookups."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tritonllm.python_backends.embedding import Embedder


def test_export_passed_the_sentence_transformers_check(embedder_dir):
    metadata = json.loads((embedder_dir / "embedder.json").read_text())
    assert metadata["check"]["sentences"] == 50
    assert metadata["check"]["min_cosine"] >= 0.9999
    assert metadata["dimension"] == 384 and metadata["max_seq_length"] == 256
    assert len(metadata["onnx_sha256"]) == 64


def test_vectors_are_unit_length_and_paraphrases_are_closer_than_other_questions(embedder):
    reset, reset_again, capital = embedder.embed(
        ["How do I reset my password?", "How can I reset my password?", "What is the capital of France?"])
    assert np.allclose([np.linalg.norm(reset), np.linalg.norm(capital)], 1.0, atol=1e-5)
    assert reset @ reset_again > 0.9
    assert reset @ capital < 0.3


def test_padding_in_a_batch_does_not_change_a_vector(embedder):
    texts = ["short", "a much longer sentence that needs many more tokens than the first one does"]
    batched = embedder.embed(texts)
    alone = np.stack([embedder.embed([text])[0] for text in texts])
    assert np.allclose(batched, alone, atol=1e-5)


def test_text_past_the_sequence_limit_is_truncated_not_refused(embedder):
    vector = embedder.embed(["word " * 2000])[0]
    assert vector.shape == (384,) and np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)


def test_embed_one_matches_embed(embedder):
    assert np.allclose(embedder.embed_one("How do I boil an egg?"), embedder.embed(["How do I boil an egg?"])[0],
                       atol=1e-6)


class BatchRecordingEmbedder(Embedder):
    """Records each model run's batch size; the first run waits until `expected_waiters` texts are queued behind it,
    so the test knows they arrived while the model was busy."""

    def __init__(self, model_dir: Path, expected_waiters: int, max_batch: int) -> None:
        super().__init__(model_dir, max_batch=max_batch)
        self.batches: list[int] = []
        self.expected_waiters = expected_waiters

    def _run(self, texts):
        if not self.batches:
            deadline = time.monotonic() + 30
            while len(self._queue) < self.expected_waiters and time.monotonic() < deadline:
                time.sleep(0.001)
        self.batches.append(len(texts))
        return super()._run(texts)


@pytest.mark.parametrize("max_batch", [32, 3])
def test_concurrent_lookups_are_coalesced_into_batches(embedder_dir, embedder, max_batch):
    texts = [f"question number {index} about caching" for index in range(9)]
    recording = BatchRecordingEmbedder(embedder_dir, expected_waiters=len(texts) - 1, max_batch=max_batch)
    results: dict[int, np.ndarray] = {}

    def lookup(index: int) -> None:
        results[index] = recording.embed_one(texts[index])

    first = threading.Thread(target=lookup, args=(0,))
    first.start()
    while not recording._running:  # the first caller leads a batch of one and holds the model
        time.sleep(0.001)
    others = [threading.Thread(target=lookup, args=(index,)) for index in range(1, len(texts))]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join()

    assert recording.batches[0] == 1
    assert sum(recording.batches) == len(texts)
    assert max(recording.batches) <= max_batch
    assert len(recording.batches) == 1 + -(-(len(texts) - 1) // max_batch)  # the 8 waiters ran in full batches
    expected = embedder.embed(texts)
    for index, vector in results.items():
        assert np.allclose(vector, expected[index], atol=1e-5)


def test_a_failed_batch_fails_every_waiter_and_the_embedder_recovers(embedder):
    with pytest.raises(TypeError):
        embedder.embed_one(None)  # the tokenizer refuses it
    assert embedder.embed_one("still works").shape == (384,)
