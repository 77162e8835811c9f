"""The semantic cache shared through a real redis-server: two caches stand for two replicas (no tritonserver).

The embedder is the real all-MiniLM-L6-v2 export; Redis runs on a free 127.0.0.1 port, one per module, emptied
before each test.
"""

from __future__ import annotations

import time

import pytest
import redis
from support import RedisServer

from tritonllm.contract import CACHE_REDIS_URL_ENVIRONMENT, CacheSettings, SettingsError
from tritonllm.python_backends.front import build_front
from tritonllm.python_backends.semantic_cache import CacheKey, SemanticCache
from tritonllm.python_backends.shared_cache import RedisCacheSync, redacted
from tritonllm.server import free_port

PROMPT = "How do I reset my password?"
ANSWER = b"Click 'Forgot password' on the sign-in page."


def key(tenant: str = "acme", max_tokens: int = 16) -> CacheKey:
    return CacheKey(tenant, "ensemble", (("max_tokens", max_tokens),))


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.01)


@pytest.fixture
def replica(embedder, redis_url):
    """Makes a cache synced through Redis (a replica); all of them are closed after the test."""
    redis.Redis.from_url(redis_url).flushdb()
    syncs: list[RedisCacheSync] = []

    def make(url: str = redis_url, **settings) -> RedisCacheSync:
        settings.setdefault("similarity_threshold", 0.9)
        cache = SemanticCache(CacheSettings(redis_url=url, **settings), embedder.embed_one, embedder.dimension,
                              embedder.identity)
        syncs.append(RedisCacheSync(cache, url))
        return syncs[-1]

    yield make
    for sync in syncs:
        sync.close()


def test_an_answer_stored_on_one_replica_is_a_hit_on_the_other_and_tenants_stay_apart(replica):
    a, b = replica(), replica()
    a.cache.store(key(), PROMPT, ANSWER)
    wait_until(lambda: len(b.cache) == 1)
    exact = b.cache.lookup(key(), PROMPT).hit
    paraphrase = b.cache.lookup(key(), "How can I reset my password?").hit
    assert exact.answer == ANSWER and exact.exact
    # it reads the same as PROMPT: found by its normal form, which entries of other replicas are indexed by too
    assert paraphrase.answer == ANSWER and not paraphrase.exact and paraphrase.similarity == 1.0
    assert b.cache.lookup(key(tenant="other"), PROMPT).hit is None
    assert b.cache.lookup(key(max_tokens=17), PROMPT).hit is None
    assert len(a.cache) == 1  # its own log message is not added twice


def test_a_newer_answer_replaces_the_older_one_on_every_replica(replica):
    a, b = replica(), replica()
    a.cache.store(key(), PROMPT, b"old")
    wait_until(lambda: len(b.cache) == 1)
    b.cache.store(key(), PROMPT, b"new")  # cache=refresh on the other replica
    wait_until(lambda: a.cache.lookup(key(), PROMPT).hit.answer == b"new")
    assert len(a.cache) == len(b.cache) == 1


def test_a_restarted_replica_loads_every_live_entry_and_expired_ones_are_gone(replica, redis_url):
    a = replica(ttl_seconds=3600)
    for index in range(5):
        a.cache.store(key(), f"Question number {index}?", f"answer {index}".encode())
    short = replica(ttl_seconds=0.5)
    short.cache.store(key(tenant="brief"), PROMPT, ANSWER)
    restarted = replica()
    assert restarted.loaded.entries == 6 and restarted.loaded.problem is None
    assert restarted.cache.lookup(key(), "Question number 3?").hit.answer == b"answer 3"
    time.sleep(0.6)  # Redis expires the short-lived entry itself
    assert replica().loaded.entries == 5


def test_each_replica_keeps_its_own_lru_bound(replica):
    a, small = replica(), replica(max_entries=2)
    for index in range(3):
        a.cache.store(key(), f"Question number {index}?", b"answer")
    wait_until(lambda: small.cache.stats().evictions == 1)
    assert len(small.cache) == 2 and small.cache.lookup(key(), "Question number 2?").hit is not None


def test_a_replica_started_before_redis_serves_locally_and_catches_up(replica):
    port = free_port()
    url = f"redis://:secret@127.0.0.1:{port}/0"
    early = replica(url)
    assert early.loaded.entries == 0 and f"127.0.0.1:{port}" in early.loaded.problem
    assert "secret" not in early.loaded.problem
    early.cache.store(key(), "Stored while Redis was down?", b"local")  # not shared, still served here
    assert early.cache.lookup(key(), "Stored while Redis was down?").hit.answer == b"local"
    with RedisServer(port, password="secret") as server:
        other = replica(server.url)
        other.cache.store(key(), PROMPT, ANSWER)
        wait_until(lambda: early.cache.lookup(key(), PROMPT).hit is not None)


def test_the_front_model_shares_its_cache_when_a_redis_url_is_configured(embedder_dir, redis_url, tmp_path,
                                                                         monkeypatch):
    parameters = {"embedder_path": str(embedder_dir), "ensemble_model_name": "ensemble",
                  "ensemble_inputs": "text_input,max_tokens", "redis_url": redis_url}
    front, loaded = build_front(parameters, tmp_path)
    front.close()
    assert isinstance(front.keeper, RedisCacheSync) and loaded.problem is None
    assert not (tmp_path / "cache_snapshot").exists()  # Redis keeps the entries, not a snapshot

    monkeypatch.setenv(CACHE_REDIS_URL_ENVIRONMENT, "")  # the environment wins: local cache only
    local, _ = build_front(parameters, tmp_path)
    local.close()
    assert not isinstance(local.keeper, RedisCacheSync)
    monkeypatch.setenv(CACHE_REDIS_URL_ENVIRONMENT, "cache:6379")
    with pytest.raises(SettingsError, match="cache.redis_url = 'cache:6379' is not allowed; allowed: .*redis://"):
        build_front(parameters, tmp_path)


def test_passwords_are_redacted_for_logs():
    assert redacted("redis://:secret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redacted("rediss://user:secret@cache/1") == "rediss://user:***@cache/1"
    assert redacted("redis://cache:6379") == "redis://cache:6379"
