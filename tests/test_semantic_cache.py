"""The semantic cache and the front model's logic, with the real ONNX embedder (no server)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tritonllm.contract import CacheSettings, SettingsError
from tritonllm.python_backends.errors import InvalidArgument
from tritonllm.python_backends.front import Cancelled, Front, Reply, answer_pieces, build_front
from tritonllm.python_backends.semantic_cache import Autosaver, PartitionIndex, SemanticCache, _write_atomically


class ManualClock:
    """A clock the test moves by hand (TTL)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_cache(embedder, clock=time.time, embed=None, **settings) -> SemanticCache:
    settings.setdefault("similarity_threshold", 0.9)
    return SemanticCache(CacheSettings(**settings), embed or embedder.embed_one, embedder.dimension,
                         embedder.identity, clock=clock)


def inputs(prompt: str | bytes = "How do I reset my password?", max_tokens: int = 16, **optional) -> dict:
    """Request arrays as the adapter hands them to Front.parse (batch 1)."""
    dtypes = {"stream": np.bool_, "exclude_input_in_output": np.bool_, "apply_chat_template": np.bool_,
              "temperature": np.float32, "top_p": np.float32, "top_k": np.int32, "end_id": np.int32,
              "pad_id": np.int32, "min_tokens": np.int32, "seed": np.uint64}
    arrays = {"text_input": np.array([[prompt.encode() if isinstance(prompt, str) else prompt]], dtype=object),
              "max_tokens": np.array([[max_tokens]], dtype=np.int32)}
    for name, value in optional.items():
        if name in ("stop_words", "bad_words"):
            arrays[name] = np.array([[word.encode() for word in value]], dtype=object)
        elif name in ("tenant", "cache"):
            arrays[name] = np.array([[value.encode()]], dtype=object)
        else:
            arrays[name] = np.array([[value]], dtype=dtypes[name])
    return arrays


FRONT = Front(None, "ensemble")


def key(**optional):
    return FRONT.parse(inputs(**optional)).key


# --- the cache ---------------------------------------------------------------------------------------------------

def test_exact_repeat_hits_without_running_the_embedder(embedder):
    embedded = []
    cache = make_cache(embedder, embed=lambda text: embedded.append(text) or embedder.embed_one(text))
    cache.store(key(), "How do I reset my password?", b"Click 'Forgot password'.")
    assert embedded == ["How do I reset my password?"]
    lookup = cache.lookup(key(), "How do I reset my password?")
    assert lookup.hit.answer == b"Click 'Forgot password'." and lookup.hit.exact and lookup.hit.similarity == 1.0
    assert embedded == ["How do I reset my password?"]


def test_paraphrase_hits_and_an_unrelated_question_misses(embedder):
    cache = make_cache(embedder)
    cache.store(key(), "How do I reset my password?", b"answer")
    paraphrase = cache.lookup(key(), "How can I reset my password?")
    assert paraphrase.hit is not None and not paraphrase.hit.exact
    assert paraphrase.hit.cached_prompt == "How do I reset my password?" and paraphrase.hit.similarity >= 0.9
    unrelated = cache.lookup(key(), "What is the capital of France?")
    assert unrelated.hit is None and unrelated.best_similarity < 0.5
    assert cache.stats().hits == 1 and cache.stats().misses == 1


def test_a_prompt_that_reads_the_same_hits_without_running_the_embedder(embedder):
    embedded = []
    cache = make_cache(embedder, embed=lambda text: embedded.append(text) or embedder.embed_one(text))
    cache.store(key(), "How much does a Nintendo Switch cost?", b"about 300 dollars")
    for asked in ("What's the price of a Nintendo Switch?", "Could you tell me how much a Nintendo Switch costs?"):
        lookup = cache.lookup(key(), asked)
        assert lookup.hit.answer == b"about 300 dollars" and not lookup.hit.exact and lookup.hit.similarity == 1.0
    assert embedded == ["How much does a Nintendo Switch cost?"]
    # a near miss reads differently: it goes to the embedder (and the verifier, were its cosine above the threshold)
    assert cache.lookup(key(), "How much does a Nintendo Switch weigh?").hit is None
    assert embedded[-1] == "How much does a Nintendo Switch weigh?"


def test_the_threshold_decides_with_the_real_embedder(embedder):
    cached, asked = "How do I fix my bike?", "How do I repair my bike?"  # synonyms: another normal form
    cosine = float(embedder.embed_one(cached) @ embedder.embed_one(asked))
    for threshold, hits in ((cosine - 0.005, True), (cosine + 0.005, False)):
        cache = make_cache(embedder, similarity_threshold=round(threshold, 4))
        cache.store(key(), cached, b"10 minutes")
        assert (cache.lookup(key(), asked).hit is not None) is hits


def test_a_near_miss_with_another_number_is_not_served_despite_its_cosine(embedder):
    cache = make_cache(embedder, similarity_threshold=0.9)
    cache.store(key(), "Set an alarm for 7 am.", b"Alarm set for 7:00.")
    lookup = cache.lookup(key(), "Set an alarm for 7 pm.")
    assert lookup.best_similarity >= 0.9 and lookup.hit is None
    assert cache.stats().rejections == 1  # the verifier refused it; the cosine alone would have served it


@pytest.mark.parametrize("changed", [
    {"max_tokens": 17}, {"temperature": 0.5, "seed": 3}, {"top_k": 5, "seed": 3}, {"seed": 7}, {"min_tokens": 2},
    {"end_id": 2}, {"stop_words": ["\n"]}, {"bad_words": ["bad"]}, {"apply_chat_template": True},
    {"tenant": "other"}, {"exclude_input_in_output": True},
])
def test_any_output_changing_input_or_another_tenant_misses(embedder, changed):
    cache = make_cache(embedder)
    cache.store(key(), "How do I reset my password?", b"answer")
    assert cache.lookup(key(), "How do I reset my password?").hit is not None
    assert cache.lookup(key(**changed), "How do I reset my password?").hit is None


def test_streamed_and_non_echoing_requests_share_an_answer_but_an_echoing_one_does_not():
    streamed = key(stream=True)
    assert streamed == key(stream=True, exclude_input_in_output=False)
    assert streamed.partition == key(stream=False, exclude_input_in_output=True).partition
    assert streamed.partition != key(stream=False).partition  # echoes the prompt: other text
    # padding does not change the text, yet a sent pad_id is keyed: only the ensemble knows the vocabulary, so an
    # entry must be served only to a pad_id it took (test_pad_id_is_keyed_when_sent_...)
    assert key(pad_id=0).partition != key().partition


def test_sampled_answers_are_cached_only_when_configured_or_seeded(embedder):
    prompt = "Write a haiku about the ocean."
    cache = make_cache(embedder)
    assert "sampled" in cache.store(key(temperature=0.7), prompt, b"waves")
    assert cache.lookup(key(temperature=0.7), prompt).hit is None and len(cache) == 0
    assert cache.store(key(temperature=0.7, seed=1), prompt, b"waves") is None
    assert cache.store(key(temperature=0.7, top_k=1), prompt, b"waves") is None  # top_k 1 is greedy
    assert key(top_p=0.9).sampled and not key().sampled
    sampling_cache = make_cache(embedder, cache_sampled=True)
    assert sampling_cache.store(key(temperature=0.7), prompt, b"waves") is None
    assert sampling_cache.lookup(key(temperature=0.7), prompt).hit.answer == b"waves"


def test_lru_evicts_the_least_recently_used_entry(embedder):
    cache = make_cache(embedder, max_entries=3)
    for prompt in ("What is the capital of France?", "How do I boil an egg?", "Why is the sky blue?"):
        cache.store(key(), prompt, prompt.encode())
    assert cache.lookup(key(), "What is the capital of France?").hit is not None  # now the most recent
    cache.store(key(), "How many bones are in the human body?", b"206")
    assert len(cache) == 3 and cache.stats().evictions == 1
    assert cache.lookup(key(), "How do I boil an egg?").hit is None
    assert cache.lookup(key(), "What is the capital of France?").hit is not None


def test_ttl_expires_entries_by_the_injected_clock(embedder):
    clock = ManualClock()
    cache = make_cache(embedder, clock=clock, ttl_seconds=10)
    cache.store(key(), "How do I boil an egg?", b"10 minutes")
    clock.now += 9.9
    assert cache.lookup(key(), "How do I boil an egg?").hit is not None
    clock.now += 0.1
    assert cache.lookup(key(), "How do I boil an egg?").hit is None
    assert cache.lookup(key(), "What's the best way to boil an egg?").hit is None
    assert len(cache) == 0 and cache.stats().expirations == 1
    cache.store(key(), "Why is the sky blue?", b"Rayleigh scattering")
    clock.now += 60
    assert cache.purge_expired() == 1 and len(cache) == 0


def test_answers_over_max_answer_bytes_are_not_stored(embedder):
    cache = make_cache(embedder, max_answer_bytes=8)
    assert "max_answer_bytes" in cache.store(key(), "Why is the sky blue?", b"123456789")
    assert cache.store(key(), "Why is the sky blue?", b"12345678") is None


def test_storing_a_prompt_again_replaces_its_answer(embedder):
    cache = make_cache(embedder)
    cache.store(key(), "Why is the sky blue?", b"old")
    cache.store(key(), "Why is the sky blue?", b"new")
    assert len(cache) == 1 and cache.lookup(key(), "Why is the sky blue?").hit.answer == b"new"


def test_tenants_never_see_each_others_answers_under_concurrent_load(embedder):
    cache = make_cache(embedder, similarity_threshold=0.8)
    tenants = [f"tenant-{index}" for index in range(4)]
    prompts = ["How do I reset my password?", "How do I boil an egg?", "Why is the sky blue?",
               "What is the capital of France?"]
    paraphrases = ["How can I reset my password?", "What's the best way to boil an egg?", "Why does the sky look blue?",
                   "Which city is the capital of France?"]
    leaks, hits, errors = [], [], []

    def worker(tenant: str, offset: int) -> None:
        try:
            for round_ in range(6):
                for index, prompt in enumerate(prompts):
                    if (index + offset + round_) % 2 == 0:
                        cache.store(key(tenant=tenant), prompt, f"{tenant}|{prompt}".encode())
                    for asked in (prompt, paraphrases[index]):
                        lookup = cache.lookup(key(tenant=tenant), asked)
                        if lookup.hit is not None:
                            hits.append(1)
                            if not lookup.hit.answer.startswith(f"{tenant}|".encode()):
                                leaks.append((tenant, asked, lookup.hit.answer))
        except Exception as error:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(tenant, offset)) for tenant in tenants for offset in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not leaks
    assert len(hits) > 100
    assert len(cache) == len(tenants) * len(prompts)


# --- persistence -------------------------------------------------------------------------------------------------

def test_snapshot_round_trip_keeps_answers_partitions_and_lru_order(embedder, tmp_path):
    clock = ManualClock()
    cache = make_cache(embedder, clock=clock, max_entries=3)
    cache.store(key(), "How do I boil an egg?", "10 minutes 🥚".encode())
    cache.store(key(tenant="b"), "How do I boil an egg?", b"tenant b's answer")
    cache.store(key(), "Why is the sky blue?", b"Rayleigh scattering")
    cache.lookup(key(), "How do I boil an egg?")  # LRU order now: b, sky, egg
    assert cache.save_snapshot(tmp_path / "snapshot") == 3

    restored = make_cache(embedder, clock=clock, max_entries=3)
    assert restored.load_snapshot(tmp_path / "snapshot").entries == 3
    assert restored.lookup(key(), "What's the best way to boil an egg?").hit.answer == "10 minutes 🥚".encode()
    assert restored.lookup(key(tenant="b"), "How do I boil an egg?").hit.answer == b"tenant b's answer"
    restored.store(key(), "What is the capital of France?", b"Paris")
    assert restored.lookup(key(), "Why is the sky blue?").hit is None  # it was the least recently used


def test_entries_past_their_ttl_are_dropped_when_a_snapshot_loads(embedder, tmp_path):
    clock = ManualClock()
    cache = make_cache(embedder, clock=clock, ttl_seconds=100)
    cache.store(key(), "How do I boil an egg?", b"old")
    clock.now += 60
    cache.store(key(), "Why is the sky blue?", b"young")
    cache.save_snapshot(tmp_path / "snapshot")
    clock.now += 50
    restored = make_cache(embedder, clock=clock, ttl_seconds=100)
    assert restored.load_snapshot(tmp_path / "snapshot").entries == 1
    assert restored.lookup(key(), "Why is the sky blue?").hit.answer == b"young"


def corrupt_flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))


def corrupt_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"\x00" * 64)


@pytest.mark.parametrize("corrupt, reason", [(corrupt_flip_byte, "checksum mismatch"),
                                             (corrupt_truncate, "truncated"), (corrupt_garbage, "bad magic")])
def test_a_corrupt_snapshot_leaves_the_cache_empty_and_says_why(embedder, tmp_path, corrupt, reason):
    cache = make_cache(embedder)
    cache.store(key(), "How do I boil an egg?", b"10 minutes")
    cache.save_snapshot(tmp_path / "snapshot")
    corrupt(tmp_path / "snapshot")
    loaded = cache.load_snapshot(tmp_path / "snapshot")
    assert loaded.entries == 0 and reason in loaded.problem and "empty cache" in loaded.problem
    assert len(cache) == 0 and cache.lookup(key(), "How do I boil an egg?").hit is None


def test_a_snapshot_of_another_embedder_is_refused(embedder, tmp_path):
    cache = make_cache(embedder)
    cache.store(key(), "How do I boil an egg?", b"10 minutes")
    cache.save_snapshot(tmp_path / "snapshot")
    other = SemanticCache(CacheSettings(), embedder.embed_one, embedder.dimension, "another-embedder")
    assert "written for embedder" in other.load_snapshot(tmp_path / "snapshot").problem


def test_a_missing_snapshot_is_a_normal_empty_start(embedder, tmp_path):
    loaded = make_cache(embedder).load_snapshot(tmp_path / "absent")
    assert loaded.entries == 0 and loaded.problem is None


def test_a_write_that_dies_midway_leaves_the_previous_snapshot_and_no_temp_file(embedder, tmp_path):
    cache = make_cache(embedder)
    cache.store(key(), "How do I boil an egg?", b"10 minutes")
    cache.save_snapshot(tmp_path / "snapshot")
    before = (tmp_path / "snapshot").read_bytes()
    with pytest.raises(TypeError):
        _write_atomically(tmp_path / "snapshot", [b"partial bytes", None])  # the writer fails after some bytes
    assert (tmp_path / "snapshot").read_bytes() == before
    assert os.listdir(tmp_path) == ["snapshot"]
    assert make_cache(embedder).load_snapshot(tmp_path / "snapshot").entries == 1


def test_the_autosaver_saves_changes_and_once_more_on_close(embedder, tmp_path):
    cache = make_cache(embedder)
    saver = Autosaver(cache, tmp_path / "snapshot", interval_seconds=3600)
    saver.save_if_changed()
    assert not (tmp_path / "snapshot").exists()  # nothing changed yet
    cache.store(key(), "How do I boil an egg?", b"10 minutes")
    saver.close()
    assert make_cache(embedder).load_snapshot(tmp_path / "snapshot").entries == 1


# --- the partition index -----------------------------------------------------------------------------------------

def clustered_unit_vectors(count: int, dimension: int = 384, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, dimension))
    vectors = centers[rng.integers(0, len(centers), count)] + 0.8 * rng.standard_normal((count, dimension))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_partition_index_turns_ivf_finds_every_entry_and_never_returns_removed_ones():
    vectors = clustered_unit_vectors(1200)
    index = PartitionIndex(384, ivf_min_entries=256, background=False)
    for entry_id, vector in enumerate(vectors):
        index.add([entry_id], vector.reshape(1, -1))
    assert index.kind == "ivf" and index._trained_size == 1024  # trained at 256, retrained at 4x
    found = sum(index.search(vector, 1)[0][0] == entry_id for entry_id, vector in enumerate(vectors))
    assert found >= 0.99 * len(vectors)
    for entry_id in range(0, 1200, 7):
        index.remove(entry_id)
    for entry_id in range(0, 1200, 7):
        assert all(found_id % 7 != 0 for found_id, _ in index.search(vectors[entry_id], 4))


def test_background_training_keeps_changes_made_while_it_ran():
    vectors = clustered_unit_vectors(700, seed=1)
    index = PartitionIndex(384, ivf_min_entries=600, background=True)
    for entry_id, vector in enumerate(vectors):
        index.add([entry_id], vector.reshape(1, -1))  # training starts at 600 and runs while the last 100 arrive
    for entry_id in range(0, 100):
        index.remove(entry_id)
    deadline = time.monotonic() + 60
    while index._training and time.monotonic() < deadline:
        time.sleep(0.01)
    assert index.kind == "ivf" and len(index) == 600
    for entry_id in (100, 650, 699):
        assert index.search(vectors[entry_id], 1)[0][0] == entry_id
    assert all(found_id >= 100 for entry_id in range(0, 100, 9) for found_id, _ in index.search(vectors[entry_id], 4))


# --- the front's logic -------------------------------------------------------------------------------------------

def generation(*pieces: bytes):
    """A generate() callable that records each call and yields `pieces`."""
    calls = []

    def generate():
        calls.append(1)
        yield from pieces

    generate.calls = calls
    return generate


def serve(front: Front, arrays: dict, generate, cancelled=lambda: False) -> list[Reply]:
    replies: list[Reply] = []
    front.serve(front.parse(arrays), generate, replies.append, cancelled)
    return replies


def test_a_miss_streams_and_stores_then_a_repeat_is_a_byte_identical_hit(embedder):
    front = Front(make_cache(embedder), "ensemble")
    first = generation(b"Click ", b"'Forgot ", b"password' ", "\u00e9\u6f22 ".encode(), b"on the login page.")
    replies = serve(front, inputs(stream=True), first)
    assert [reply.final for reply in replies] == [False] * 4 + [True]
    assert not any(reply.cache_hit for reply in replies)
    answer = b"".join(reply.text for reply in replies)

    never = generation()
    streamed_hit = serve(front, inputs(stream=True), never)
    assert never.calls == [] and all(reply.cache_hit for reply in streamed_hit)
    assert len(streamed_hit) > 1 and [reply.final for reply in streamed_hit][-1]
    assert b"".join(reply.text for reply in streamed_hit) == answer
    one_response = serve(front, inputs(stream=False, exclude_input_in_output=True), never)
    assert [(reply.text, reply.cache_hit, reply.final) for reply in one_response] == [(answer, True, True)]
    paraphrased = serve(front, inputs("How can I reset my password?", stream=True), never)
    assert b"".join(reply.text for reply in paraphrased) == answer and all(reply.cache_hit for reply in paraphrased)


def test_a_cancelled_or_failed_generation_is_never_stored(embedder):
    front = Front(make_cache(embedder), "ensemble")
    with pytest.raises(Cancelled):
        serve(front, inputs(stream=True), generation(b"a", b"b"), cancelled=lambda: True)

    def failing():
        yield b"partial "
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError):
        serve(front, inputs(stream=True), failing)
    assert len(front.cache) == 0


def test_bypass_neither_reads_nor_writes_and_refresh_replaces(embedder):
    front = Front(make_cache(embedder), "ensemble")
    serve(front, inputs(), generation(b"first"))
    bypass = generation(b"fresh")
    assert serve(front, inputs(cache="bypass"), bypass)[0].text == b"fresh" and bypass.calls == [1]
    assert front.cache.stats().hits == 0 and front.cache.lookup(key(), "How do I reset my password?").hit.answer \
        == b"first"
    assert serve(front, inputs(cache="refresh"), generation(b"second"))[0].cache_hit is False
    assert serve(front, inputs(), generation())[0].text == b"second"


@pytest.mark.parametrize("arrays, message", [
    (inputs(cache="sometimes"), "input cache must be one of use, bypass, refresh"),
    (inputs(b"\xff\xfe"), "input text_input must be UTF-8"),
    ({"max_tokens": np.array([[4]], dtype=np.int32)}, "input text_input is required"),
    ({"text_input": np.array([[b"hi"]], dtype=object)}, "input max_tokens is required"),
    ({**inputs(), "text_input": np.array([[b"a"], [b"b"]], dtype=object)}, "batch size 1"),
    # refused before the cache is asked, so a request the ensemble would refuse never gets a cached answer
    (inputs(""), "input text_input must not be empty"),
    (inputs(max_tokens=0), r"max_tokens = 0 is not allowed; allowed: 1\.\.2147483647"),
    (inputs(max_tokens=-2**31), "max_tokens = -2147483648 is not allowed"),  # 2**31 wrapped by Triton's HTTP
    (inputs(top_k=-1), "top_k = -1 is not allowed"),
    (inputs(top_p=0.0), "top_p = 0.0 is not allowed; allowed: 0 < top_p <= 1"),
    (inputs(temperature=float("nan")), "temperature = nan is not allowed"),
    (inputs(temperature=float("inf")), "temperature = inf is not allowed"),
    (inputs(min_tokens=-1), "min_tokens = -1 is not allowed"),
    (inputs(end_id=-1), "end_id = -1 is not allowed"),
    (inputs(pad_id=-5), "pad_id = -5 is not allowed"),
])
def test_bad_requests_are_refused_naming_the_input(arrays, message):
    with pytest.raises(InvalidArgument, match=message):
        FRONT.parse(arrays)


def test_pad_id_is_keyed_when_sent_so_only_values_the_ensemble_took_are_served():
    assert key() == key() and key(pad_id=2) == key(pad_id=2)
    assert key(pad_id=2) != key() and key(pad_id=2) != key(pad_id=49152)


@pytest.mark.parametrize("answer", [b"", b"one", b"  leading and trailing  ", b"word " * 50,
                                    "caf\u00e9 \u6f22\u5b57 \U0001f600 ok\n\nnext".encode()])
def test_hit_pieces_join_back_to_the_answer(answer):
    assert b"".join(answer_pieces(answer, stream=True)) == answer
    assert answer_pieces(answer, stream=False) == [answer]


def test_build_front_reads_the_model_parameters_and_reports_a_corrupt_snapshot(embedder_dir, tmp_path):
    parameters = {"enabled": "true", "similarity_threshold": "0.9", "embedder_path": str(embedder_dir),
                  "ensemble_model_name": "ensemble", "snapshot_interval_seconds": "3600", "persist_path": "",
                  "ensemble_inputs": "text_input,max_tokens,stream"}
    front, loaded = build_front(parameters, tmp_path)
    assert loaded.problem is None and front.model == "ensemble"
    assert front.forwarded_inputs == {"text_input", "max_tokens", "stream"}
    assert set(front.parse(inputs(tenant="a")).ensemble_inputs) == {
        "text_input", "max_tokens"}  # the tenant is not sent to an ensemble that does not offer it
    serve(front, inputs(), generation(b"answer"))
    front.close()
    assert (tmp_path / "cache_snapshot").is_file()

    again, loaded = build_front(parameters, tmp_path)
    assert loaded.entries == 1 and serve(again, inputs(), generation())[0].cache_hit
    again.close()
    corrupt_flip_byte(tmp_path / "cache_snapshot")
    broken, loaded = build_front(parameters, tmp_path)
    broken.close()
    assert "checksum mismatch" in loaded.problem
    disabled, _ = build_front({**parameters, "enabled": "false"}, tmp_path)
    assert disabled.cache is None
    with pytest.raises(SettingsError, match="similarity_threshold"):
        build_front({**parameters, "similarity_threshold": "1.5"}, tmp_path)
