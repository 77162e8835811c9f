"""The front model `llm` with its semantic cache, served by a real tritonserver.

The engine is a tiny random Llama exported to ONNX (its text is gibberish but deterministic under greedy decoding);
the tokenizer is the bundled SmolLM2's and the embedder the real all-MiniLM-L6-v2 export. Whether a request reached
the engine is read from Triton's own statistics of the `engine` model.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from support import engine_metric, export_tiny_llama

from tritonllm.builders import repository
from tritonllm.contract import CacheSettings, EngineSettings, RepositorySettings
from tritonllm.client.api import GenerationError, GenerationParams, LLMClient
from tritonllm.server import TritonServer

pytestmark = pytest.mark.server  # a tritonserver on a tiny random model: no SmolLM2 build

PROMPT = "How do I reset my password?"
PARAMS = GenerationParams(max_tokens=8, apply_chat_template=True)


@pytest.fixture(scope="module")
def cache_repository(tmp_path_factory, embedder_dir) -> Path:
    from tritonllm.builders.source import prepare_hf_model
    from tritonllm.paths import cache_dir

    root = tmp_path_factory.mktemp("cache-server")
    settings = RepositorySettings(
        tokenizer_dir=prepare_hf_model(None, cache_dir()), onnx_dir=export_tiny_llama(root / "tiny"),
        embedder_dir=embedder_dir,
        engine=EngineSettings(max_batch_size=8, max_context_length=512, kv_cache_max_tokens=8192, intra_op_threads=1),
        cache=CacheSettings(similarity_threshold=0.9, snapshot_interval_seconds=3600.0))
    return repository.render_repository(settings, root / "repository")


@pytest.fixture(scope="module")
def front_server(cache_repository, tmp_path_factory):
    with TritonServer(cache_repository, log_file=tmp_path_factory.mktemp("logs") / "tritonserver.log") as server:
        yield server


@pytest.fixture
def llm(front_server) -> LLMClient:
    return LLMClient(front_server.endpoints.grpc_url, "grpc", model="llm")


def engine_requests(server: TritonServer) -> int:
    """Requests the engine model has completed, from Triton's statistics."""
    stats = requests.get(f"http://{server.endpoints.http_url}/v2/models/engine/stats", timeout=10).json()
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def ask(client: LLMClient, prompt: str = PROMPT, stream: bool = True, **params) -> tuple[str, list[bool], float]:
    """(answer, cache_hit of each response, cache_similarity of the first response)."""
    chosen = GenerationParams(**{**vars(PARAMS), **params})
    events = list(client.events(prompt, chosen, stream=stream))
    return "".join(event.text for event in events), [event.cache_hit for event in events], events[0].cache_similarity


def test_a_hit_never_reaches_the_engine_and_is_byte_identical(llm, front_server):
    tenant = "identical"
    engine_before = engine_requests(front_server)
    answer, hits, _ = ask(llm, tenant=tenant)
    assert not any(hits) and engine_requests(front_server) == engine_before + 1

    streamed, streamed_hits, similarity = ask(llm, tenant=tenant)
    whole, whole_hits, _ = ask(llm, tenant=tenant, stream=False)
    http = LLMClient(front_server.endpoints.http_url, "http", model="llm")
    over_http, http_hits, _ = ask(http, tenant=tenant)
    assert (streamed, whole, over_http) == (answer, answer, answer)
    assert all(streamed_hits) and whole_hits == [True] and all(http_hits) and similarity == 1.0
    assert engine_requests(front_server) == engine_before + 1


def test_a_paraphrase_hits(llm, front_server):
    answer, _, _ = ask(llm, tenant="paraphrase")
    engine_before = engine_requests(front_server)
    # reads the same as the cached prompt (verifier's normal form): found by hash, served with similarity 1.0
    paraphrased, hits, similarity = ask(llm, "How can I reset my password?", tenant="paraphrase")
    assert paraphrased == answer and all(hits) and similarity == 1.0
    # a synonym ("largest" / "biggest") reads differently: found by the embedding, then verified
    answer, _, _ = ask(llm, "What is the biggest city in Japan?", tenant="paraphrase")
    paraphrased, hits, similarity = ask(llm, "What is the largest city in Japan?", tenant="paraphrase")
    assert paraphrased == answer and all(hits) and 0.9 <= similarity < 1.0
    assert engine_requests(front_server) == engine_before + 1


def cache_metric(server: TritonServer, name: str) -> float:
    text = requests.get(server.endpoints.metrics_url, timeout=10).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.split()[0] == name)


def test_a_near_miss_reaches_the_engine_and_a_paraphrase_does_not(llm, front_server):
    cached, near_miss = "How do I make a soft boiled egg?", "How do I make a hard boiled egg?"  # cosine 0.95
    ask(llm, cached, tenant="verifier")
    rejections = cache_metric(front_server, "tritonllm_cache_verifier_rejections_total")
    engine_before = engine_requests(front_server)
    _, hits, similarity = ask(llm, near_miss, tenant="verifier")
    assert not any(hits) and similarity >= 0.9 and engine_requests(front_server) == engine_before + 1
    assert cache_metric(front_server, "tritonllm_cache_verifier_rejections_total") == rejections + 1

    answer, _, _ = ask(llm, cached, tenant="verifier")
    paraphrased, hits, similarity = ask(llm, "Could you tell me how to make a soft boiled egg?", tenant="verifier")
    assert paraphrased == answer and all(hits) and similarity == 1.0  # the same normal form
    assert engine_requests(front_server) == engine_before + 1


@pytest.mark.parametrize("changed", [{"max_tokens": 9}, {"tenant": "someone else"}, {"seed": 5},
                                     {"apply_chat_template": False}, {"stop_words": ["zzz"]},
                                     {"guided_json": '{"type": "object"}'}])
def test_other_sampling_parameters_or_tenant_miss(llm, front_server, changed):
    ask(llm, tenant="params")
    engine_before = engine_requests(front_server)
    _, hits, _ = ask(llm, **{"tenant": "params", **changed})
    assert not any(hits) and engine_requests(front_server) == engine_before + 1


def test_bypass_and_refresh_behave_as_named(llm, front_server):
    ask(llm, tenant="modes")
    engine_before = engine_requests(front_server)
    _, bypass_hits, _ = ask(llm, tenant="modes", cache="bypass")
    _, refresh_hits, _ = ask(llm, tenant="modes", cache="refresh")
    assert not any(bypass_hits) and not any(refresh_hits)
    assert engine_requests(front_server) == engine_before + 2
    _, hits, _ = ask(llm, tenant="modes")
    assert all(hits) and engine_requests(front_server) == engine_before + 2


def test_sampled_answers_without_a_seed_are_not_cached(llm, front_server):
    engine_before = engine_requests(front_server)
    for _ in range(2):
        _, hits, _ = ask(llm, tenant="sampled", temperature=0.8)
        assert not any(hits)
    assert engine_requests(front_server) == engine_before + 2


def engine_finished(server: TritonServer) -> int:
    """Requests the engine model has finished, successfully or not."""
    stats = requests.get(f"http://{server.endpoints.http_url}/v2/models/engine/stats", timeout=10).json()
    inference = stats["model_stats"][0]["inference_stats"]
    return int(inference["success"]["count"]) + int(inference["fail"]["count"])


def test_a_cancelled_stream_stops_in_the_engine_and_is_not_stored(llm, front_server):
    cancelled_before = engine_metric(front_server, "tritonllm_request_finished_total", reason="cancelled")
    generated_before = engine_metric(front_server, "tritonllm_generation_tokens_total")
    stream = llm.stream(PROMPT, GenerationParams(max_tokens=400, apply_chat_template=True, tenant="cancel"))
    next(stream)
    stream.close()  # the client cancels the request
    deadline = time.monotonic() + 60
    while (engine_metric(front_server, "tritonllm_request_finished_total", reason="cancelled") == cancelled_before
           and time.monotonic() < deadline):
        time.sleep(0.1)  # the engine's metrics are flushed periodically
    # The engine itself ended the generation as cancelled, long before its 400 tokens.
    assert engine_metric(front_server, "tritonllm_request_finished_total", reason="cancelled") == cancelled_before + 1
    assert engine_metric(front_server, "tritonllm_generation_tokens_total") - generated_before < 200
    _, hits, _ = ask(llm, tenant="cancel", max_tokens=400)
    assert not any(hits)


def test_many_concurrent_misses_all_complete(front_server):
    """16 streams at once, each followed by the next: the front's calls to the ensemble never block each other
    (decoupled BLS from several threads deadlocked the stub in tritonserver 2.51)."""
    errors: list[Exception] = []

    def worker(index: int) -> None:
        client = LLMClient(front_server.endpoints.grpc_url, "grpc", model="llm", timeout=120)
        try:
            for turn in range(6):
                ask(client, f"Question {index}-{turn}: why?", tenant=f"many-{index}", cache="bypass",
                    max_tokens=1 + (index + turn) % 5)
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


SIZES = {"type": "object", "properties": {"size": {"enum": ["S", "M", "L"]}, "count": {"type": "integer",
                                                                                    "minimum": 1, "maximum": 9}},
         "required": ["size", "count"], "additionalProperties": False}


@pytest.mark.parametrize("model", ["ensemble", "llm"])
def test_structured_output_over_grpc_and_http_and_bad_schemas_are_invalid_arg(front_server, model):
    import jsonschema

    endpoints = front_server.endpoints
    for url, protocol in ((endpoints.grpc_url, "grpc"), (endpoints.http_url, "http")):
        client = LLMClient(url, protocol, model=model)
        for stream in (True, False):
            answer, _, _ = ask(client, "Pick a size.", stream=stream, max_tokens=32, tenant="guided",
                               guided_json=json.dumps(SIZES))
            jsonschema.validate(json.loads(answer), SIZES)
        choice, _, _ = ask(client, "Yes or no?", max_tokens=8, guided_choice='["yes", "no"]')
        assert choice in ("yes", "no")
        with pytest.raises(GenerationError, match="input guided_json is not valid JSON"):
            ask(client, max_tokens=8, guided_json='{"type": "obj')
    assert front_server.is_running()


def test_an_unknown_cache_mode_is_refused(llm):
    with pytest.raises(GenerationError, match="input cache must be one of use, bypass, refresh"):
        ask(llm, cache="sometimes")


def test_tenant_isolation_under_concurrent_load(llm, front_server):
    prompts = ["Why is the sky blue?", "How do I boil an egg?", "What is the capital of France?"]
    for prompt in prompts:
        ask(llm, prompt, tenant="owner")
    engine_before = engine_requests(front_server)
    results: list[tuple[str, str, bool]] = []
    errors: list[Exception] = []

    def worker(tenant: str) -> None:
        client = LLMClient(front_server.endpoints.grpc_url, "grpc", model="llm")
        try:
            for prompt in prompts:
                _, hits, _ = ask(client, prompt, tenant=tenant)
                results.append((tenant, prompt, all(hits)))
        except Exception as error:  # surfaced below
            errors.append(error)

    tenants = ["owner", "tenant-a", "tenant-b", "tenant-c"]
    threads = [threading.Thread(target=worker, args=(tenant,)) for tenant in tenants for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(hit for tenant, _, hit in results if tenant == "owner")
    misses = Counter((tenant, prompt) for tenant, prompt, hit in results if not hit)
    # Each other tenant generated each prompt itself at least once: the owner's entry was never served to it.
    assert all(misses[(tenant, prompt)] >= 1 for tenant in tenants[1:] for prompt in prompts)
    assert engine_requests(front_server) == engine_before + sum(misses.values())


def test_cache_metrics_are_on_the_metrics_endpoint(llm, front_server):
    ask(llm, tenant="metrics")
    ask(llm, tenant="metrics")
    text = requests.get(front_server.endpoints.metrics_url, timeout=10).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("tritonllm_cache_")}
    assert values["tritonllm_cache_hits_total"] >= 1 and values["tritonllm_cache_misses_total"] >= 1
    assert values["tritonllm_cache_entries"] >= 1 and values["tritonllm_cache_lookup_seconds_count"] >= 2
    assert 'tritonllm_cache_evictions_total{reason="lru"}' in values


def test_restart_keeps_entries_ttl_expires_them_and_a_corrupt_snapshot_starts_empty(cache_repository, front_server,
                                                                                     tmp_path):
    llm = LLMClient(front_server.endpoints.grpc_url, "grpc", model="llm")
    answer, _, _ = ask(llm, tenant="restart")
    front_server.stop()  # unloading the model writes a last snapshot
    snapshot = cache_repository / "llm" / "1" / "cache_snapshot"
    assert snapshot.is_file()

    with TritonServer(cache_repository, log_file=tmp_path / "restarted.log") as server:
        client = LLMClient(server.endpoints.grpc_url, "grpc", model="llm")
        again, hits, _ = ask(client, tenant="restart")
        assert again == answer and all(hits) and engine_requests(server) == 0

    config = cache_repository / "llm" / "config.pbtxt"
    original = config.read_text()
    shortened = original.replace('key: "ttl_seconds" value { string_value: "3600.0" }',
                                 'key: "ttl_seconds" value { string_value: "1.0" }')
    assert shortened != original
    config.write_text(shortened)  # as an operator would edit it
    time.sleep(1.5)  # every stored entry is now older than the TTL
    try:
        with TritonServer(cache_repository, log_file=tmp_path / "ttl.log") as server:
            _, hits, _ = ask(LLMClient(server.endpoints.grpc_url, "grpc", model="llm"), tenant="restart")
            assert not any(hits) and engine_requests(server) == 1
    finally:
        config.write_text(original)

    data = bytearray(snapshot.read_bytes())
    data[-50] ^= 0x01
    snapshot.write_bytes(bytes(data))
    with TritonServer(cache_repository, log_file=tmp_path / "corrupt.log") as server:
        _, hits, _ = ask(LLMClient(server.endpoints.grpc_url, "grpc", model="llm"), tenant="restart")
        assert not any(hits)
    log = (tmp_path / "corrupt.log").read_text()
    assert "checksum mismatch: the file is corrupt" in log and "starting with an empty cache" in log
