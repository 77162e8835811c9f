"""Engine metrics: the snapshot arithmetic and token timings on a tiny engine (no server), then the real /metrics of a
served SmolLM2 (slow): every metric is exposed and the counters move by exactly what known requests did."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tritonllm.contract import EngineSettings
from tritonllm.client.perf import scrape_metrics
from tritonllm.python_backends.engine import Engine, EngineStats, GenerationRequest
from tritonllm.python_backends.metrics import (
    ALL_METRICS, FINISHED, FLUSH_INTERVAL_SECONDS, TokenTimings, counter_increments, gauge_values,
)
from tritonllm.python_backends.sampling import SamplingParams
from tritonllm.python_backends.stop_criteria import FinishReason
from support import run_request


def stats(**changes) -> EngineStats:
    values = dict(running=0, prefilling=0, waiting=0, kv_tokens_reserved=0, kv_tokens_in_use=0, decode_steps=0,
                  prompt_tokens=0, tokens_generated=0, prefill_padding_ratio=0.0, decode_kv_bytes_per_step=0.0,
                  kv_bytes_copied=0, prefix_lookup_tokens=0, prefix_hit_tokens=0, prefix_cached_tokens=0, finished={},
                  decode_tokens=0, decode_row_steps=0, verify_runs=0, speculative_drafter="off", drafted_tokens=0,
                  accepted_tokens=0, drafted_by={}, accepted_by={})
    return EngineStats(**{**values, **changes})


def test_counter_increments_list_only_what_moved():
    before = stats(prompt_tokens=100, tokens_generated=40, finished={"length": 2})
    after = stats(prompt_tokens=150, tokens_generated=40, finished={"length": 3, "cancelled": 1})
    assert counter_increments(before, after) == {"prompt_tokens": 50, "length": 1, "cancelled": 1}
    assert counter_increments(None, before) == {"prompt_tokens": 100, "generation_tokens": 40, "length": 2}
    assert counter_increments(after, after) == {}
    drafted = stats(drafted_by={"prompt_lookup": 8, "draft_model": 5}, accepted_by={"draft_model": 4})
    assert counter_increments(None, drafted) == {"drafted_tokens:prompt_lookup": 8, "drafted_tokens:draft_model": 5,
                                                 "accepted_tokens:draft_model": 4}


def test_gauges_count_prefilling_as_running_and_usage_against_capacity():
    values = gauge_values(stats(running=3, prefilling=2, waiting=4, kv_tokens_reserved=512), 2048)
    assert values["running"] == 5 and values["waiting"] == 4
    assert values["kv_reserved"] == 512 and values["kv_capacity"] == 2048 and values["kv_usage"] == 0.25


def test_metric_names_follow_prometheus_conventions():
    for spec in ALL_METRICS:
        assert spec.name.startswith("tritonllm_")
        assert (spec.kind == "COUNTER") == spec.name.endswith("_total")
        assert spec.kind != "HISTOGRAM" or (spec.name.endswith("_seconds") and spec.buckets)


DASHBOARD = Path(__file__).resolve().parents[1] / "docker" / "grafana" / "tritonllm-dashboard.json"
ON_GPU_ONLY = ("nv_gpu_", "nv_trt_llm_")  # Triton's GPU metrics and the TensorRT-LLM backend's


def dashboard_metric_names() -> set[str]:
    """Metric names the Grafana dashboard queries (histograms as their _bucket/_sum/_count series)."""
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in panels(dashboard["panels"]) for target in panel.get("targets", [])]
    return {name for expr in expressions for name in re.findall(r"\b((?:tritonllm|nv)_[a-z0-9_]+)", expr)}


def test_dashboard_charts_every_engine_metric_and_no_unknown_one():
    queried = dashboard_metric_names()
    histogram_series = {f"{spec.name}_{suffix}" for spec in ALL_METRICS if spec.kind == "HISTOGRAM"
                        for suffix in ("bucket", "sum", "count")}
    known = {spec.name for spec in ALL_METRICS if spec.kind != "HISTOGRAM"} | histogram_series
    engine_queried = {name for name in queried if name.startswith("tritonllm_") and
                      not name.startswith("tritonllm_cache_")}
    assert engine_queried <= known
    for spec in ALL_METRICS:
        assert any(name.startswith(spec.name) for name in engine_queried), f"no panel shows {spec.name}"


def test_engine_reports_one_first_token_and_one_gap_per_later_token(tiny_onnx):
    timings = TokenTimings()
    settings = EngineSettings(max_batch_size=4, max_queue_size=16, max_context_length=256, kv_cache_max_tokens=4096,
                              prefill_chunk_tokens=64, intra_op_threads=1)
    engine = Engine(tiny_onnx, settings, token_timer=timings)
    try:
        prompts = [[5, 6, 7], list(range(10, 30)), [3] * 9]
        new_tokens = 6
        collectors = [run_request(engine, GenerationRequest(prompt, new_tokens, SamplingParams(min_tokens=new_tokens),
                                                    streaming=index % 2 == 0))
                      for index, prompt in enumerate(prompts)]
        for collector in collectors:
            collector.wait()
        first, gaps = timings.drain()
        assert len(first) == len(prompts) and len(gaps) == len(prompts) * (new_tokens - 1)
        assert all(seconds >= 0 for seconds in first + gaps)
        assert timings.drain() == ([], [])
        assert counter_increments(None, engine.stats()) == {
            "prompt_tokens": sum(len(p) for p in prompts), "generation_tokens": len(prompts) * new_tokens,
            "prefix_lookup_tokens": sum(len(p) for p in prompts), FinishReason.LENGTH.value: len(prompts),
            # one token per sequence and decode step (no speculation): tokens per target step is 1
            "decode_tokens": len(prompts) * (new_tokens - 1), "decode_row_steps": len(prompts) * (new_tokens - 1)}
    finally:
        engine.shutdown()


# ---- real server -----------------------------------------------------------------------------------------------

ENGINE_LABELS = {"model": "engine", "version": "1"}


def engine_values(url: str) -> dict[str, float]:
    """Custom metrics of the engine model by name (histograms by their _count), reasons as name:reason."""
    values = {}
    for sample in scrape_metrics(url):
        if sample.name.startswith("tritonllm_") and sample.labels.items() >= ENGINE_LABELS.items():
            reason = sample.labels.get("reason")
            values[f"{sample.name}:{reason}" if reason else sample.name] = sample.value
    return values


def settled_values(url: str) -> dict[str, float]:
    """The engine's metrics once earlier requests are flushed: equal across two flush periods, nothing running."""
    previous = engine_values(url)
    for _ in range(60):
        time.sleep(2 * FLUSH_INTERVAL_SECONDS)
        current = engine_values(url)
        if current == previous and current["tritonllm_requests_running"] == 0:
            return current
        previous = current
    raise AssertionError(f"engine metrics never settled: {current}")


@pytest.mark.server
def test_metrics_endpoint_exposes_every_engine_metric(server):
    names = {sample.name for sample in scrape_metrics(server.endpoints.metrics_url)
             if sample.labels.items() >= ENGINE_LABELS.items()}
    for spec in ALL_METRICS:
        exposed = {f"{spec.name}_count", f"{spec.name}_bucket"} if spec.kind == "HISTOGRAM" else {spec.name}
        assert exposed <= names, f"{spec.name} is missing from /metrics"
    reasons = {s.labels["reason"] for s in scrape_metrics(server.endpoints.metrics_url) if s.name == FINISHED.name}
    assert reasons == {reason.value for reason in FinishReason}


@pytest.mark.server
def test_dashboard_queries_only_metrics_the_server_exposes(server):
    exposed = {sample.name for sample in scrape_metrics(server.endpoints.metrics_url)}
    missing = {name for name in dashboard_metric_names() - exposed if not name.startswith(ON_GPU_ONLY)}
    assert not missing, f"the dashboard queries metrics this server does not expose: {sorted(missing)}"


@pytest.mark.server
def test_counters_move_by_the_tokens_of_known_requests(server, smollm2_hf_dir):
    from transformers import AutoTokenizer

    from tritonllm.client.api import GenerationParams, LLMClient

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    client = LLMClient(server.endpoints.grpc_url, protocol="grpc")
    prompts = ["The capital of France is", "Write a haiku about autumn leaves falling on a quiet pond."]
    max_tokens = [7, 12]
    url = server.endpoints.metrics_url
    before = settled_values(url)
    for prompt, tokens in zip(prompts, max_tokens):
        client.generate(prompt, GenerationParams(max_tokens=tokens, min_tokens=tokens))
    for piece in client.stream(prompts[0], GenerationParams(max_tokens=5, min_tokens=5)):
        assert isinstance(piece, str)
    after = settled_values(url)

    moved = {name: after[name] - before.get(name, 0) for name in after}
    prompt_tokens = sum(len(tokenizer.encode(p, add_special_tokens=True)) for p in prompts + prompts[:1])
    assert moved["tritonllm_prompt_tokens_total"] == prompt_tokens
    assert moved["tritonllm_generation_tokens_total"] == sum(max_tokens) + 5
    assert moved[f"{FINISHED.name}:{FinishReason.LENGTH.value}"] == 3
    assert moved["tritonllm_time_to_first_token_seconds_count"] == 3
    assert moved["tritonllm_inter_token_latency_seconds_count"] == sum(max_tokens) + 5 - 3
    assert after["tritonllm_requests_waiting"] == 0 and after["tritonllm_kv_cache_reserved_tokens"] == 0
    assert after["tritonllm_kv_cache_capacity_tokens"] > 0


@pytest.mark.server
def test_prefix_reuse_serves_a_tenant_its_own_prefixes_only_and_changes_no_text(server):
    from tritonllm.client.api import GenerationParams, LLMClient

    client = LLMClient(server.endpoints.grpc_url, protocol="grpc")
    system = ("You are the support assistant of the Harbour Street library. Opening hours are nine to five on "
              "weekdays and ten to two on Saturdays; the library is closed on Sundays and public holidays. ")
    prompt = system + "Question: can I return a book on Sunday?"
    url = server.endpoints.metrics_url

    def answer(tenant: str) -> tuple[str, float]:
        before = settled_values(url)
        text = client.generate(prompt, GenerationParams(max_tokens=12, tenant=tenant))
        return text, settled_values(url)["tritonllm_prefix_cache_hit_tokens_total"] - \
            before.get("tritonllm_prefix_cache_hit_tokens_total", 0)

    first, first_hits = answer("tenant-a")
    other, other_hits = answer("tenant-b")  # the same prompt, another tenant: nothing reused
    again, again_hits = answer("tenant-a")
    assert (first_hits, other_hits) == (0, 0)
    assert again_hits > 0
    assert first == other == again  # reused KV gives the same greedy answer
