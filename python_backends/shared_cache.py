"""The semantic cache shared by Triton replicas through Redis (`CacheSettings.redis_url`).

Redis 7 has no vector search, so Redis holds the entries and a log of additions; each replica keeps its own
`SemanticCache` (local faiss index, LRU, TTL) and follows the log:
- `{namespace}:entry:{digest}` is a hash (partition, prompt, answer, vector, created_at) that Redis expires when the
  TTL ends (PEXPIREAT created_at + ttl_seconds). The digest names partition + prompt, so a newer answer to the same
  prompt (cache=refresh) replaces the older one everywhere.
- `{namespace}:log` is a stream: one XADD (origin replica, digest) per stored answer, in the same MULTI as the entry,
  trimmed to about LOG_MAX_LENGTH messages. Removals are not logged: entries leave by Redis' expiry and each
  replica's own TTL and LRU bound.
- A replica publishes each answer it stores before the answer's final response goes out, and a background thread
  reads the log from its last id (XREAD BLOCK) and adds the others' entries to its local cache, keeping their
  creation time. At start, and after any lost connection, it first loads every live entry (SCAN), so a restarted
  replica loses nothing and one that was cut off catches up.
The namespace holds a digest of the embedder's identity: replicas with another embedder never see these vectors.
Tenants stay apart because the partition (tenant + model + parameters) travels with each entry and a lookup searches
only its own partition's index.

Consistency is eventual: a replica sees another's new entry once its reader has read the log message (one Redis
round trip after the XADD while connected); until then it misses and generates the answer itself. While Redis is
unreachable each replica keeps serving from (and storing into) its local cache; answers stored meanwhile stay local.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis

from tritonllm.python_backends.semantic_cache import CacheStats, SemanticCache, SnapshotLoad, StoredAnswer

logger = logging.getLogger(__name__)

LOG_MAX_LENGTH = 10_000  # messages kept in the log; a replica further behind reloads everything instead
READ_BLOCK_MILLISECONDS = 200  # how long one XREAD waits; bounds how long close() takes
READ_BATCH = 256  # log messages read (and entries fetched) at once
LOAD_BATCH = 500  # entries fetched per round trip while loading
RETRY_SECONDS = 1.0  # wait after a failed Redis call before the reader tries again
SOCKET_TIMEOUT_SECONDS = 5.0  # longer than READ_BLOCK_MILLISECONDS, or every blocking read would time out
CONNECT_TIMEOUT_SECONDS = 1.0  # a store waits at most this long for an unreachable Redis


class RedisCacheSync:
    """Keeps `cache` in sync with the Redis at `url`: publishes what it stores, adds what other replicas store.

    `loaded` says how many entries the start loaded (or why none could be: the reader then retries). `on_change`
    gets the cache's stats after the reader added entries (metrics). `close` stops the reader.
    """

    def __init__(self, cache: SemanticCache, url: str,
                 on_change: Callable[[CacheStats], None] = lambda stats: None) -> None:
        self.cache, self.on_change = cache, on_change
        self.url = redacted(url)
        self._redis = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_SECONDS,
                                           socket_connect_timeout=CONNECT_TIMEOUT_SECONDS)
        space = hashlib.sha256(f"{cache.vector_space}\0{cache.dimension}".encode()).hexdigest()[:16]
        self._namespace = f"tritonllm:cache:{space}"
        self._log = f"{self._namespace}:log"
        self._origin = uuid.uuid4().hex.encode()  # this replica's own log messages are skipped
        self._last_id = b"0-0"
        self._stop = threading.Event()
        self._connected = False
        try:
            self.loaded = SnapshotLoad(self._load_all(), None)
        except redis.RedisError as error:
            self.loaded = SnapshotLoad(0, f"shared cache {self.url} is unreachable ({error}); starting with an "
                                          "empty cache and retrying in the background")
        cache.on_store = self.publish
        self._thread = threading.Thread(target=self._follow, name="cache-redis-sync", daemon=True)
        self._thread.start()

    def publish(self, stored: StoredAnswer) -> None:
        """Write a locally stored answer and its log message to Redis (one transaction); a failure is logged and
        the answer stays local."""
        key = self._entry_key(stored.digest)
        expires_at_ms = int((stored.created_at + self.cache.settings.ttl_seconds) * 1000)
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping={"partition": stored.partition, "prompt": stored.prompt,
                                        "answer": stored.answer, "created_at": repr(stored.created_at),
                                        "vector": np.asarray(stored.vector, dtype="<f4").tobytes()})
                pipe.pexpireat(key, expires_at_ms)
                pipe.xadd(self._log, {"origin": self._origin, "digest": stored.digest}, maxlen=LOG_MAX_LENGTH,
                          approximate=True)
                pipe.execute()
        except redis.RedisError as error:
            logger.warning("semantic cache: answer not shared through %s (%s); it stays in this replica", self.url,
                           error)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._redis.close()

    def _follow(self) -> None:
        """The reader: add other replicas' entries as their log messages arrive; reload all after an outage."""
        while not self._stop.is_set():
            try:
                if not self._connected:
                    added = self._load_all()
                    logger.warning("semantic cache: connected to %s, %d entries loaded", self.url, added)
                replies = self._redis.xread({self._log: self._last_id}, count=READ_BATCH,
                                            block=READ_BLOCK_MILLISECONDS)
                for _, messages in replies:
                    self._last_id = messages[-1][0]
                    keys = [self._entry_key(fields[b"digest"].decode()) for _, fields in messages
                            if fields.get(b"origin") != self._origin]
                    if keys and self.cache.add_stored(self._fetch(keys)):
                        self.on_change(self.cache.stats())
            except redis.RedisError as error:
                if self._connected:
                    logger.warning("semantic cache: lost %s (%s); serving from this replica's cache meanwhile",
                                   self.url, error)
                self._connected = False
                self._stop.wait(RETRY_SECONDS)
            except Exception:  # a bug must not end the reader silently: log it and go on with the next messages
                logger.exception("semantic cache: reading %s failed", self.url)
                self._stop.wait(RETRY_SECONDS)

    def _load_all(self) -> int:
        """Add every live entry in Redis to the local cache; returns how many. The log position is taken first,
        so entries stored during the scan are read again from the log (adding one twice only replaces it)."""
        newest = self._redis.xrevrange(self._log, count=1)
        last_id = newest[0][0] if newest else b"0-0"
        found: list[StoredAnswer] = []
        keys = list(self._redis.scan_iter(match=self._entry_key("*"), count=LOAD_BATCH))
        for start in range(0, len(keys), LOAD_BATCH):
            found += self._fetch(keys[start:start + LOAD_BATCH])
        found.sort(key=lambda stored: stored.created_at)  # the newest become the most recently used
        added = self.cache.add_stored(found)
        self._last_id, self._connected = last_id, True
        self.on_change(self.cache.stats())
        return added

    def _fetch(self, keys: list[str | bytes]) -> list[StoredAnswer]:
        """The entries under `keys` that still exist (an expired one is simply gone)."""
        with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            rows = pipe.execute()
        found = []
        for key, row in zip(keys, rows):
            try:
                if row:
                    found.append(self._decode(row))
            except (KeyError, ValueError) as error:  # written by something else: skip it, keep the rest
                logger.warning("semantic cache: skipping malformed shared entry %r (%s)", key, error)
        return found

    def _decode(self, row: dict[bytes, bytes]) -> StoredAnswer:
        vector = np.frombuffer(row[b"vector"], dtype="<f4").astype(np.float32)
        if vector.shape != (self.cache.dimension,):
            raise ValueError(f"vector of {vector.size} values, the embedder's have {self.cache.dimension}")
        return StoredAnswer(row[b"partition"].decode(), row[b"prompt"].decode(), row[b"answer"], vector,
                            float(row[b"created_at"]))

    def _entry_key(self, digest: str) -> str:
        return f"{self._namespace}:entry:{digest}"


def redacted(url: str) -> str:
    """`url` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))
