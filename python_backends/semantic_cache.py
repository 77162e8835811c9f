"""Semantic answer cache of the front model: exact repeats by hash, paraphrases by embedding similarity.

An entry is found only inside its partition: tenant + model + every sampling parameter that changes the output
(`CacheKey`). Each partition has its own vector index, so a search can never return another tenant's answer (and every
candidate's partition is checked again before it is served).

- Exact repeats (same partition, same prompt) take a hash lookup and skip the embedder. So do prompts that read the
  same as a cached one (`cache_verifier.normal_form`: the same words up to contractions, framing, question frame,
  phrase order and inflection), once the verifier accepts the pair; they are served with similarity 1.0.
- Paraphrases: the prompt's unit vector is searched in the partition's index (retrieval); each live candidate whose
  cosine is >= `similarity_threshold` goes to the verifier (`cache_verifier.conflict`: same numbers, polarity,
  question and content words), and the best one it accepts is a hit; a candidate it refuses counts as a verifier
  rejection. Scores are exact inner products of the stored float32 vectors, so an approximate index can only cost
  recall, never serve an answer below the threshold.
- Bounded: `max_entries` with LRU eviction, `ttl_seconds` from the time an answer was stored, `max_answer_bytes`.
  Sampled answers (temperature > 0 without a seed) are neither stored nor served unless `cache_sampled`.
- Persistent: `save_snapshot` writes the live entries atomically (temp file, fsync, rename) with a SHA-256 of the
  payload; `load_snapshot` refuses a damaged or foreign file and says why, leaving the cache empty.
- Shareable: `on_store` is told of every answer stored here, and `add_stored` takes answers stored elsewhere (another
  replica's, through `shared_cache.RedisCacheSync`) with their own creation time, so TTLs agree across replicas.

Index choice (measured on this machine, 100k x 384, one thread; benchmarks/cache_eval.py prints the numbers): a flat
inner-product scan costs ~8.5 ms per query, past the 2 ms budget; faiss HNSW answers in ~0.5 ms but cannot delete,
which LRU and TTL need on every insert; IVF-Flat (trained on the partition's own vectors) answers in ~0.2-0.6 ms
with ~0.99-1.0 recall of near duplicates and deletes in microseconds. So a partition is an exact flat index while
small and becomes IVF-Flat at `ivf_min_entries`, retrained in a background thread each time it grows 4x (k-means on
at most `IVF_MAX_TRAINING_POINTS` vectors, so a training costs seconds at most).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from tritonllm.contract import CacheSettings
from tritonllm.python_backends.cache_verifier import conflict, normal_form

logger = logging.getLogger(__name__)

SNAPSHOT_MAGIC = b"tritonllm-semantic-cache 1\n"
SEARCH_CANDIDATES = 8  # the verifier may refuse the closest ones, and expired ones are skipped
IVF_MIN_ENTRIES = 8192
IVF_TRAINING_POINTS_PER_LIST = 39  # faiss' own minimum for k-means without a warning
IVF_NPROBE = 16
IVF_RETRAIN_GROWTH = 4
IVF_MAX_TRAINING_POINTS = 32768  # k-means on a sample this large takes ~2 s here; lists then grow with the partition


@dataclass(frozen=True)
class CacheKey:
    """Everything besides the prompt that decides the answer; `params` are (name, JSON value) pairs."""

    tenant: str
    model: str
    params: tuple[tuple[str, Any], ...]
    sampled: bool = False  # the answer is a random draw (temperature > 0, no seed)

    @cached_property
    def partition(self) -> str:
        canonical = json.dumps([self.tenant, self.model, sorted(self.params)], ensure_ascii=False,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Hit:
    answer: bytes
    similarity: float  # 1.0 for an exact repeat or a prompt of the same normal form
    exact: bool
    cached_prompt: str


@dataclass(frozen=True)
class Lookup:
    hit: Hit | None
    best_similarity: float  # of the closest live candidate; 0.0 when none was compared
    vector: np.ndarray | None  # the prompt's embedding when one was computed (store() reuses it)


@dataclass(frozen=True)
class CacheStats:
    entries: int
    hits: int
    misses: int
    evictions: int  # LRU, to stay within max_entries
    expirations: int  # TTL
    rejections: int  # candidates above the threshold that the verifier refused


@dataclass(frozen=True)
class StoredAnswer:
    """One cached answer as it travels between caches (a snapshot, the shared store)."""

    partition: str  # CacheKey.partition: tenant, model and parameters
    prompt: str
    answer: bytes
    vector: np.ndarray  # unit float32 embedding of the prompt
    created_at: float  # when the answer was first stored (the TTL runs from it)

    @cached_property
    def digest(self) -> str:
        """Names the (partition, prompt) pair: a newer answer to it replaces the older one."""
        return prompt_digest(self.partition, self.prompt)

    @cached_property
    def reading_digest(self) -> str:
        """Names the (partition, normal form of the prompt) pair: the prompts that read the same."""
        return reading_digest(self.partition, self.prompt)


@dataclass(frozen=True)
class SnapshotLoad:
    entries: int
    problem: str | None  # why the stored entries were not used; None when they loaded or there were none


class SnapshotError(ValueError):
    """The snapshot file is damaged, truncated or was written for another embedder."""


@dataclass
class _Entry:
    id: int
    stored: StoredAnswer

    @property
    def partition(self) -> str:
        return self.stored.partition


class SemanticCache:
    """Thread-safe answer cache; `embed(text)` must return a unit float32 vector of length `dimension`."""

    def __init__(self, settings: CacheSettings, embed: Callable[[str], np.ndarray], dimension: int,
                 vector_space: str = "", clock: Callable[[], float] = time.time,
                 ivf_min_entries: int = IVF_MIN_ENTRIES) -> None:
        settings.validate()
        self.settings = settings
        self.dimension = dimension
        self.vector_space = vector_space  # names the embedder; a snapshot from another one is refused
        self._embed = embed
        self._clock = clock
        self._ivf_min_entries = ivf_min_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._exact: dict[str, int] = {}
        self._same_reading: dict[str, int] = {}  # StoredAnswer.reading_digest -> the latest entry that reads so
        self._partitions: dict[str, PartitionIndex] = {}
        self._next_id = 0
        self._hits = self._misses = self._evictions = self._expirations = self._rejections = 0
        self.version = 0  # changes whenever the stored entries change (the autosaver compares it)
        self.on_store: Callable[[StoredAnswer], None] | None = None  # told of each answer stored here (not added)

    def __len__(self) -> int:
        return len(self._entries)

    def cacheable(self, key: CacheKey) -> bool:
        return self.settings.cache_sampled or not key.sampled

    def lookup(self, key: CacheKey, prompt: str) -> Lookup:
        """The cached answer of `prompt` (or of a paraphrase of it) in `key`'s partition, if any."""
        if not self.cacheable(key):
            return Lookup(None, 0.0, None)
        partition = key.partition
        exact = prompt_digest(partition, prompt)
        with self._lock:
            entry = self._live_entry(self._exact.get(exact))
            if entry is not None:
                return self._hit(entry, 1.0, exact=True)
            if partition not in self._partitions:  # nothing to compare with: skip the embedder
                self._misses += 1
                return Lookup(None, 0.0, None)
        same_reading = reading_digest(partition, prompt)  # outside the lock: reading a prompt takes ~0.1 ms
        with self._lock:
            entry = self._live_entry(self._same_reading.get(same_reading))
            if entry is not None and conflict(entry.stored.prompt, prompt) is None:
                return self._hit(entry, 1.0, exact=False)
        vector = self._embed(prompt)
        with self._lock:
            index = self._partitions.get(partition)
            candidates = index.search(vector, SEARCH_CANDIDATES) if index is not None else []
            best = 0.0
            for entry_id, score in candidates:
                entry = self._live_entry(entry_id)
                if entry is None or entry.partition != partition:
                    continue
                best = max(best, score)
                if score < self.settings.similarity_threshold:
                    break  # candidates come best first
                if conflict(entry.stored.prompt, prompt) is None:
                    return self._hit(entry, score, exact=False, vector=vector)
                self._rejections += 1
            self._misses += 1
            return Lookup(None, best, vector)

    def store(self, key: CacheKey, prompt: str, answer: bytes, vector: np.ndarray | None = None) -> str | None:
        """Store a completed answer (replacing the prompt's earlier one); returns why it was not stored, or None."""
        if not self.cacheable(key):
            return "sampled answers are not cached (cache_sampled is off)"
        if len(answer) > self.settings.max_answer_bytes:
            return f"answer of {len(answer)} bytes is over max_answer_bytes ({self.settings.max_answer_bytes})"
        if vector is None:
            vector = self._embed(prompt)
        stored = StoredAnswer(key.partition, prompt, answer, np.asarray(vector, dtype=np.float32), self._clock())
        with self._lock:
            self._add([stored])
        if self.on_store is not None:
            self.on_store(stored)
        return None

    def add_stored(self, answers: list[StoredAnswer]) -> int:
        """Add answers stored elsewhere (oldest first: the last ones count as most recently used); each replaces
        its prompt's earlier answer, those past the TTL are skipped, LRU keeps max_entries. Returns how many were
        added. `on_store` is not told (they are stored already)."""
        now = self._clock()
        live = [stored for stored in answers if now - stored.created_at < self.settings.ttl_seconds]
        live = list({stored.digest: stored for stored in reversed(live)}.values())[::-1]  # the last one per prompt
        live = live[-self.settings.max_entries:]
        with self._lock:
            self._add(live)
        return len(live)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._hits, self._misses, self._evictions, self._expirations,
                              self._rejections)

    def purge_expired(self) -> int:
        """Drop every entry past its TTL; returns how many."""
        with self._lock:
            now = self._clock()
            expired = [entry.id for entry in self._entries.values() if self._expired(entry, now)]
            for entry_id in expired:
                self._remove(entry_id)
            self._expirations += len(expired)
            return len(expired)

    def save_snapshot(self, path: Path) -> int:
        """Write the live entries (LRU order kept) to `path` atomically; returns how many."""
        with self._lock:
            now = self._clock()
            entries = [entry.stored for entry in self._entries.values() if not self._expired(entry, now)]
        meta = json.dumps([{"partition": entry.partition, "prompt": entry.prompt, "created_at": entry.created_at,
                            "answer": base64.b64encode(entry.answer).decode("ascii")} for entry in entries],
                          ensure_ascii=False).encode()
        vectors = (np.stack([entry.vector for entry in entries]) if entries
                   else np.zeros((0, self.dimension), dtype=np.float32)).astype("<f4").tobytes()
        checksum = hashlib.sha256(meta)
        checksum.update(vectors)
        header = {"count": len(entries), "dimension": self.dimension, "vector_space": self.vector_space,
                  "meta_bytes": len(meta), "vector_bytes": len(vectors), "sha256": checksum.hexdigest()}
        _write_atomically(Path(path), [SNAPSHOT_MAGIC, json.dumps(header).encode() + b"\n", meta, vectors])
        return len(entries)

    def load_snapshot(self, path: Path) -> SnapshotLoad:
        """Replace the cache's content with the snapshot at `path`; on any damage the cache stays empty and the
        returned `problem` says why."""
        path = Path(path)
        with self._lock:
            for entry_id in list(self._entries):
                self._remove(entry_id)
        if not path.exists():
            return SnapshotLoad(0, None)
        try:
            records, vectors = self._read_snapshot(path)
        except (OSError, SnapshotError, ValueError, KeyError, TypeError) as error:
            return SnapshotLoad(0, f"snapshot {path} was not loaded ({error}); starting with an empty cache")
        return SnapshotLoad(self.add_stored([
            StoredAnswer(record["partition"], record["prompt"], base64.b64decode(record["answer"]), vector,
                         record["created_at"]) for record, vector in zip(records, vectors)]), None)  # LRU order

    def _read_snapshot(self, path: Path) -> tuple[list[dict], np.ndarray]:
        with open(path, "rb") as file:
            if file.read(len(SNAPSHOT_MAGIC)) != SNAPSHOT_MAGIC:
                raise SnapshotError("not a tritonllm semantic cache snapshot (bad magic)")
            header = json.loads(file.readline())
            payload = file.read()
        expected = header["meta_bytes"] + header["vector_bytes"]
        if len(payload) != expected:
            raise SnapshotError(f"truncated or padded: {len(payload)} payload bytes, header says {expected}")
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise SnapshotError("checksum mismatch: the file is corrupt")
        if header["dimension"] != self.dimension or header["vector_space"] != self.vector_space:
            raise SnapshotError(f"written for embedder {header['vector_space']!r} ({header['dimension']}-d), this "
                                f"cache uses {self.vector_space!r} ({self.dimension}-d)")
        view = memoryview(payload)
        records = json.loads(bytes(view[:header["meta_bytes"]]))
        vectors = np.frombuffer(view[header["meta_bytes"]:], dtype="<f4").reshape(-1, self.dimension)
        if len(records) != header["count"] or len(vectors) != header["count"]:
            raise SnapshotError(f"header says {header['count']} entries, found {len(records)} records and "
                                f"{len(vectors)} vectors")
        return records, vectors.astype(np.float32)

    # The helpers below run with self._lock held.

    def _live_entry(self, entry_id: int | None) -> _Entry | None:
        entry = self._entries.get(entry_id) if entry_id is not None else None
        if entry is not None and self._expired(entry, self._clock()):
            self._remove(entry.id)
            self._expirations += 1
            return None
        return entry

    def _hit(self, entry: _Entry, similarity: float, exact: bool, vector: np.ndarray | None = None) -> Lookup:
        self._entries.move_to_end(entry.id)
        self._hits += 1
        return Lookup(Hit(entry.stored.answer, float(similarity), exact, entry.stored.prompt), float(similarity),
                      vector)

    def _expired(self, entry: _Entry, now: float) -> bool:
        return now - entry.stored.created_at >= self.settings.ttl_seconds

    def _add(self, answers: list[StoredAnswer]) -> None:
        """Add answers of distinct prompts, most recently used last: each replaces its prompt's earlier answer,
        the least recently used entries make room (at most max_entries are given), and each partition's index gets
        its new vectors in one call."""
        for stored in answers:
            if stored.digest in self._exact:
                self._remove(self._exact[stored.digest])
        while self._entries and len(self._entries) + len(answers) > self.settings.max_entries:
            self._remove(next(iter(self._entries)))
            self._evictions += 1
        by_partition: dict[str, list[_Entry]] = {}
        for stored in answers:
            entry = _Entry(self._next_id, stored)
            self._next_id += 1
            self._entries[entry.id] = entry
            self._exact[stored.digest] = entry.id
            self._same_reading[stored.reading_digest] = entry.id
            by_partition.setdefault(entry.partition, []).append(entry)
        for partition, entries in by_partition.items():
            index = self._partitions.get(partition)
            if index is None:
                index = self._partitions[partition] = PartitionIndex(self.dimension, self._ivf_min_entries)
            index.add([entry.id for entry in entries], np.stack([entry.stored.vector for entry in entries]))
        self.version += 1

    def _remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        del self._exact[entry.stored.digest]
        if self._same_reading.get(entry.stored.reading_digest) == entry_id:
            del self._same_reading[entry.stored.reading_digest]
        index = self._partitions[entry.partition]
        index.remove(entry_id)
        if len(index) == 0:
            del self._partitions[entry.partition]
        self.version += 1


class PartitionIndex:
    """Inner-product index of one partition: exact flat while small, IVF-Flat from `ivf_min_entries` on.

    IVF training runs on a copy of the vectors, in a background thread when `background` (the flat or older IVF
    index keeps answering meanwhile); entries added or removed during training are applied before the swap.
    """

    def __init__(self, dimension: int, ivf_min_entries: int = IVF_MIN_ENTRIES, background: bool = True) -> None:
        self.dimension = dimension
        self.ivf_min_entries = ivf_min_entries
        self.background = background
        self._lock = threading.Lock()
        self._vectors: dict[int, np.ndarray] = {}
        self._index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        self._trained_size = 0  # entries the current IVF was trained on; 0 while flat
        self._training = False

    def __len__(self) -> int:
        return len(self._vectors)

    @property
    def kind(self) -> str:
        return "ivf" if self._trained_size else "flat"

    def add(self, entry_ids: list[int], vectors: np.ndarray) -> None:
        """Add unit vectors [len(entry_ids), dimension] under their entry ids."""
        with self._lock:
            self._vectors.update(zip(entry_ids, vectors))
            self._index.add_with_ids(vectors, np.array(entry_ids, dtype=np.int64))
            due = len(self._vectors) >= max(self.ivf_min_entries, IVF_RETRAIN_GROWTH * self._trained_size)
            if not due or self._training:
                return
            self._training = True
        if self.background:
            threading.Thread(target=self.train, name="cache-index-training", daemon=True).start()
        else:
            self.train()

    def remove(self, entry_id: int) -> None:
        with self._lock:
            del self._vectors[entry_id]
            self._index.remove_ids(np.array([entry_id], dtype=np.int64))

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Up to `k` (entry id, cosine) pairs, best first."""
        with self._lock:
            scores, ids = self._index.search(vector.reshape(1, -1), k)
        return [(int(entry_id), float(score)) for entry_id, score in zip(ids[0], scores[0]) if entry_id >= 0]

    def train(self) -> None:
        """(Re)build the IVF index from the current vectors and swap it in."""
        try:
            with self._lock:
                ids = np.fromiter(self._vectors, dtype=np.int64, count=len(self._vectors))
                vectors = np.stack(list(self._vectors.values()))
            sample = vectors[np.random.default_rng(0).permutation(len(vectors))[:IVF_MAX_TRAINING_POINTS]]
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dimension), self.dimension,
                                     max(1, len(sample) // IVF_TRAINING_POINTS_PER_LIST), faiss.METRIC_INNER_PRODUCT)
            ivf.nprobe = IVF_NPROBE
            ivf.train(sample)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # O(1) remove_ids
            ivf.add_with_ids(vectors, ids)
            with self._lock:
                trained = set(ids.tolist())
                added = [entry_id for entry_id in self._vectors if entry_id not in trained]
                removed = [entry_id for entry_id in trained if entry_id not in self._vectors]
                if added:
                    ivf.add_with_ids(np.stack([self._vectors[entry_id] for entry_id in added]),
                                     np.array(added, dtype=np.int64))
                if removed:
                    ivf.remove_ids(np.array(removed, dtype=np.int64))
                self._index, self._trained_size = ivf, len(ids)
        except Exception:  # the current index keeps serving; the next insert past the size limit retries
            logger.exception("semantic cache: training the IVF index failed")
        finally:
            with self._lock:
                self._training = False


class Autosaver:
    """Saves the cache every `interval_seconds` when it changed (and drops expired entries); `close` saves once more."""

    def __init__(self, cache: SemanticCache, path: Path, interval_seconds: float,
                 on_error: Callable[[str], None] = logger.error) -> None:
        self.cache, self.path, self.interval_seconds, self.on_error = cache, Path(path), interval_seconds, on_error
        self._saved_version = cache.version
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-autosave", daemon=True)
        self._thread.start()

    def save_if_changed(self) -> None:
        self.cache.purge_expired()
        version = self.cache.version
        if version == self._saved_version:
            return
        try:
            self.cache.save_snapshot(self.path)
            self._saved_version = version
        except OSError as error:
            self.on_error(f"semantic cache snapshot {self.path} could not be written: {error}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.save_if_changed()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            self.save_if_changed()


def prompt_digest(partition: str, prompt: str) -> str:
    return hashlib.sha256(f"{partition}\0{prompt}".encode()).hexdigest()


def reading_digest(partition: str, prompt: str) -> str:
    return hashlib.sha256(f"{partition}\0{normal_form(prompt)!r}".encode()).hexdigest()


def _write_atomically(path: Path, parts: list[bytes]) -> None:
    """A reader sees the old file or the new one, never a mix: write a temp file, fsync it, rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            for part in parts:
                file.write(part)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
