"""Sentence embeddings for the semantic cache: all-MiniLM-L6-v2 as ONNX, run with ONNX Runtime.

The folder written by `tritonllm.builders.embedder.export_embedder` holds `model.onnx` (token embeddings
`last_hidden_state` [batch, sequence, 384] from `input_ids` + `attention_mask`), `tokenizer.json` (truncation and
padding already set) and `embedder.json`. This module adds what sentence-transformers does after the transformer:
mean pooling over real tokens, then L2 normalisation, so a dot product of two vectors is their cosine.

Concurrent `embed_one` calls are coalesced: the first caller to find the model idle runs everything queued so far as
one batch (up to `max_batch`) and hands every waiter its row, so N requests arriving together cost one model run.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "embedder.json"


@dataclass
class _Waiter:
    text: str
    vector: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


class Embedder:
    """Unit-length float32 sentence vectors; thread-safe."""

    def __init__(self, model_dir: Path, intra_op_threads: int = 1, max_batch: int = 32) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        missing = [name for name in (MODEL_FILE, TOKENIZER_FILE, METADATA_FILE) if not (model_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(f"embedder folder {model_dir} lacks {', '.join(missing)}; "
                                    f"build it with tritonllm.builders.embedder.export_embedder")
        metadata = json.loads((model_dir / METADATA_FILE).read_text())
        self.dimension: int = int(metadata["dimension"])
        self.identity: str = metadata["onnx_sha256"]  # vectors of different embedders must never be compared
        self.max_batch = max_batch
        self._tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(str(model_dir / MODEL_FILE), options,
                                                     providers=["CPUExecutionProvider"])
        self._condition = threading.Condition()
        self._queue: list[_Waiter] = []
        self._running = False

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of `texts` [len(texts), dimension], computed in chunks of at most `max_batch`."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        chunks = [self._run(texts[start:start + self.max_batch]) for start in range(0, len(texts), self.max_batch)]
        return np.concatenate(chunks)

    def embed_one(self, text: str) -> np.ndarray:
        """Vector of one text [dimension]; batched with whatever other threads ask for at the same time."""
        waiter = _Waiter(text)
        with self._condition:
            self._queue.append(waiter)
        while True:
            with self._condition:
                while self._running and not waiter.done:
                    self._condition.wait()
                if waiter.done:
                    break
                # The model is idle and this text is still queued (idle implies that): lead the next batch. It may
                # not hold this text when more than max_batch were queued first; then loop and lead again.
                self._running = True
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            self._lead(batch)
        if waiter.error is not None:
            raise waiter.error
        return waiter.vector

    def _lead(self, batch: list[_Waiter]) -> None:
        try:
            vectors = self._run([queued.text for queued in batch])
            for queued, vector in zip(batch, vectors):
                queued.vector = vector
        except BaseException as error:  # every waiter of the batch must wake up, with the failure
            for queued in batch:
                queued.error = error
        finally:
            with self._condition:
                for queued in batch:
                    queued.done = True
                self._running = False
                self._condition.notify_all()

    def _run(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(list(texts))
        input_ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
        attention_mask = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
        (token_vectors,) = self._session.run(["last_hidden_state"],
                                             {"input_ids": input_ids, "attention_mask": attention_mask})
        return mean_pool_normalize(token_vectors, attention_mask)


def mean_pool_normalize(token_vectors: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling (padding excluded) followed by L2 normalisation."""
    mask = attention_mask[:, :, None].astype(np.float32)
    summed = (token_vectors * mask).sum(axis=1)
    counts = np.clip(mask.sum(axis=1), 1e-9, None)
    pooled = summed / counts
    norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
    return (pooled / norms).astype(np.float32)
