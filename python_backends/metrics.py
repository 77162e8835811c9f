"""The engine's Prometheus metrics on Triton's `/metrics`, through the Python backend's `pb_utils.MetricFamily`.

Every metric carries the labels `model` and `version`, as Triton's own `nv_inference_*` metrics do, so dashboards
can join them. Names follow Prometheus conventions (base units, `_seconds`, `_total` for counters):

| name | type | meaning |
|---|---|---|
| `tritonllm_time_to_first_token_seconds` | histogram | engine submit -> first token sampled (streaming or not) |
| `tritonllm_inter_token_latency_seconds` | histogram | between consecutive tokens of one sequence |
| `tritonllm_prompt_tokens_total` | counter | prompt tokens admitted to prefill |
| `tritonllm_generation_tokens_total` | counter | tokens sampled (an end token included) |
| `tritonllm_request_finished_total{reason}` | counter | sequences finished, by FinishReason value |
| `tritonllm_requests_running` | gauge | sequences decoding or reading their prompt |
| `tritonllm_requests_waiting` | gauge | sequences queued for admission |
| `tritonllm_prefix_cache_lookup_tokens_total` | counter | prompt tokens looked up in the prefix cache |
| `tritonllm_prefix_cache_hit_tokens_total` | counter | of those, KV loaded from cached blocks instead of computed |
| `tritonllm_decode_tokens_total` | counter | tokens sampled by decode steps (speculative verification included) |
| `tritonllm_decode_row_steps_total` | counter | decode steps x their rows: tokens / this = tokens per target step |
| `tritonllm_speculative_draft_tokens_total{drafter}` | counter | tokens proposed by each drafter and verified |
| `tritonllm_speculative_accepted_tokens_total{drafter}` | counter | of those, kept: accepted / drafted = acceptance |
| `tritonllm_kv_cache_tokens` | gauge | tokens held in the KV slots of admitted sequences |
| `tritonllm_prefix_cache_tokens` | gauge | prompt-prefix tokens whose KV is kept for reuse |
| `tritonllm_kv_cache_reserved_tokens` | gauge | prompt + max new tokens of every admitted sequence |
| `tritonllm_kv_cache_capacity_tokens` | gauge | the KV budget (kv_cache_max_tokens) |
| `tritonllm_kv_cache_usage_ratio` | gauge | reserved / capacity: at 1 new requests wait |

Each metric update is a round trip to the Triton process (20-150 us measured here), so none happens on the engine's
loop thread: the loop only appends token timings to a buffer (`TokenTimings`), and a flush thread observes them and
refreshes counters and gauges from `Engine.stats()` every FLUSH_INTERVAL_SECONDS (metric calls release the GIL).

Two pitfalls of the 2.51 stub: a MetricFamily freed by Python takes its metrics off `/metrics` (and fails their
updates), and registering an existing name with another kind, or a negative counter increment, aborts tritonserver.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tritonllm.contract import SPECULATIVE_DRAFTERS
from tritonllm.python_backends.engine import EngineStats
from tritonllm.python_backends.stop_criteria import FinishReason

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SECONDS = 1.0
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # COUNTER, GAUGE or HISTOGRAM (the MetricFamily attribute)
    description: str
    buckets: tuple[float, ...] | None = None


TTFT = MetricSpec("tritonllm_time_to_first_token_seconds", "HISTOGRAM",
                  "Seconds from engine submit to the first sampled token", TTFT_BUCKETS)
ITL = MetricSpec("tritonllm_inter_token_latency_seconds", "HISTOGRAM",
                 "Seconds between consecutive tokens of one sequence", ITL_BUCKETS)
COUNTERS = {
    "prompt_tokens": MetricSpec("tritonllm_prompt_tokens_total", "COUNTER", "Prompt tokens admitted to prefill"),
    "generation_tokens": MetricSpec("tritonllm_generation_tokens_total", "COUNTER",
                                    "Tokens sampled by the engine (an end token included)"),
    "prefix_lookup_tokens": MetricSpec("tritonllm_prefix_cache_lookup_tokens_total", "COUNTER",
                                       "Prompt tokens looked up in the prefix cache"),
    "prefix_hit_tokens": MetricSpec("tritonllm_prefix_cache_hit_tokens_total", "COUNTER",
                                    "Prompt tokens whose KV came from the prefix cache instead of being computed"),
    "decode_tokens": MetricSpec("tritonllm_decode_tokens_total", "COUNTER",
                                "Tokens sampled by decode steps (speculative verification included)"),
    "decode_row_steps": MetricSpec("tritonllm_decode_row_steps_total", "COUNTER",
                                   "Sequences in each decode step, summed over steps (decode tokens / this = tokens "
                                   "per target step)"),
}
# One series per drafter (label `drafter`, contract.SPECULATIVE_DRAFTERS but off); keys "<key>:<drafter>".
SPECULATIVE_COUNTERS = {
    "drafted_tokens": MetricSpec("tritonllm_speculative_draft_tokens_total", "COUNTER",
                                 "Tokens proposed by the drafter and verified by the target"),
    "accepted_tokens": MetricSpec("tritonllm_speculative_accepted_tokens_total", "COUNTER",
                                  "Drafted tokens the target accepted"),
}
FINISHED = MetricSpec("tritonllm_request_finished_total", "COUNTER", "Sequences finished, by reason")
GAUGES = {
    "running": MetricSpec("tritonllm_requests_running", "GAUGE", "Sequences decoding or reading their prompt"),
    "waiting": MetricSpec("tritonllm_requests_waiting", "GAUGE", "Sequences queued for admission"),
    "kv_tokens": MetricSpec("tritonllm_kv_cache_tokens", "GAUGE", "Real tokens held in the KV cache"),
    "prefix_cached": MetricSpec("tritonllm_prefix_cache_tokens", "GAUGE",
                                "Prompt-prefix tokens whose KV is kept for reuse"),
    "kv_reserved": MetricSpec("tritonllm_kv_cache_reserved_tokens", "GAUGE",
                              "Prompt + max new tokens of every admitted sequence"),
    "kv_capacity": MetricSpec("tritonllm_kv_cache_capacity_tokens", "GAUGE", "KV cache budget in tokens"),
    "kv_usage": MetricSpec("tritonllm_kv_cache_usage_ratio", "GAUGE",
                           "Reserved KV tokens / capacity; at 1 new requests wait"),
}
ALL_METRICS = (TTFT, ITL, *COUNTERS.values(), *SPECULATIVE_COUNTERS.values(), FINISHED, *GAUGES.values())


class TokenTimings:
    """The engine's TokenTimer: buffers token timings until the flush thread drains them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._first: list[float] = []
        self._gaps: list[float] = []

    def record(self, first_token_seconds: list[float], inter_token_seconds: list[float]) -> None:
        with self._lock:
            self._first.extend(first_token_seconds)
            self._gaps.extend(inter_token_seconds)

    def drain(self) -> tuple[list[float], list[float]]:
        """(first-token seconds, inter-token seconds) recorded since the last drain."""
        with self._lock:
            drained = self._first, self._gaps
            self._first, self._gaps = [], []
        return drained


def counter_increments(previous: EngineStats | None, current: EngineStats) -> dict[str, int]:
    """What each counter moved by between two snapshots; keys are COUNTERS keys and FinishReason values.

    Only positive increments are listed: Prometheus counters never go down (and the stub aborts on a negative one).
    """
    def totals_of(stats: EngineStats) -> dict[str, int]:
        return {"prompt_tokens": stats.prompt_tokens, "generation_tokens": stats.tokens_generated,
                "prefix_lookup_tokens": stats.prefix_lookup_tokens, "prefix_hit_tokens": stats.prefix_hit_tokens,
                "decode_tokens": stats.decode_tokens, "decode_row_steps": stats.decode_row_steps,
                **{f"drafted_tokens:{drafter}": count for drafter, count in stats.drafted_by.items()},
                **{f"accepted_tokens:{drafter}": count for drafter, count in stats.accepted_by.items()},
                **stats.finished}

    totals = totals_of(current)
    before = {} if previous is None else totals_of(previous)
    moved = {key: value - before.get(key, 0) for key, value in totals.items()}
    return {key: delta for key, delta in moved.items() if delta > 0}


def gauge_values(stats: EngineStats, kv_capacity_tokens: int) -> dict[str, float]:
    """The value of each gauge (GAUGES keys) in a snapshot."""
    return {"running": stats.running + stats.prefilling, "waiting": stats.waiting,
            "kv_tokens": stats.kv_tokens_in_use, "prefix_cached": stats.prefix_cached_tokens,
            "kv_reserved": stats.kv_tokens_reserved, "kv_capacity": kv_capacity_tokens,
            "kv_usage": stats.kv_tokens_reserved / kv_capacity_tokens}


class EngineMetrics:
    """Registers the engine's metrics and keeps them current from a flush thread.

    `metric_family` is `pb_utils.MetricFamily` (passed in, so this module imports without the stub). Give
    `timings` to the Engine as its `token_timer`, then call `start(engine.stats)`; `close()` flushes a last time.
    """

    def __init__(self, metric_family: Any, model: str, version: str, kv_capacity_tokens: int) -> None:
        self.kv_capacity_tokens = kv_capacity_tokens
        self.timings = TokenTimings()
        labels = {"model": model, "version": version}
        self._families: dict[str, Any] = {}  # kept alive for as long as their metrics: see the module docstring

        def metric(spec: MetricSpec, extra_labels: dict[str, str] | None = None) -> Any:
            if spec.name not in self._families:
                self._families[spec.name] = metric_family(name=spec.name, description=spec.description,
                                                          kind=getattr(metric_family, spec.kind))
            options = {"buckets": list(spec.buckets)} if spec.buckets else {}
            return self._families[spec.name].Metric(labels={**labels, **(extra_labels or {})}, **options)

        self._ttft = metric(TTFT)
        self._itl = metric(ITL)
        self._counters = {key: metric(spec) for key, spec in COUNTERS.items()}
        self._counters |= {f"{key}:{drafter}": metric(spec, {"drafter": drafter})
                           for key, spec in SPECULATIVE_COUNTERS.items() for drafter in SPECULATIVE_DRAFTERS[1:]}
        # Every reason exists from the start at 0, so rate() and absence alerts work before the first finish.
        self._counters |= {reason.value: metric(FINISHED, {"reason": reason.value}) for reason in FinishReason}
        self._gauges = {key: metric(spec) for key, spec in GAUGES.items()}
        self._stats: Callable[[], EngineStats] | None = None
        self._last: EngineStats | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-metrics", daemon=True)

    def start(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats
        self.flush()
        self._thread.start()

    def flush(self) -> None:
        """Observe the buffered token timings; move counters and set gauges to the engine's current snapshot."""
        first, gaps = self.timings.drain()
        for seconds in first:
            self._ttft.observe(seconds)
        for seconds in gaps:
            self._itl.observe(seconds)
        stats = self._stats()
        if stats == self._last:
            return  # idle: no round trips
        for key, delta in counter_increments(self._last, stats).items():
            self._counters[key].increment(delta)
        for key, value in gauge_values(stats, self.kv_capacity_tokens).items():
            self._gauges[key].set(value)
        self._last = stats

    def close(self) -> None:
        """Stop the flush thread after a last flush; metrics are released before their families."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._stats is not None:
            self.flush()
        del self._ttft, self._itl
        self._counters.clear()
        self._gauges.clear()
        self._families.clear()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL_SECONDS):
            try:
                self.flush()
            except Exception:  # metrics must never take serving down; the next flush catches up
                log.exception("engine metrics flush failed")
