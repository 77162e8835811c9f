"""Triton adapter of the front model `llm` (decoupled): semantic cache hits are answered here, misses stream from the
ensemble over the server's own gRPC endpoint (python_backends/ensemble_stream.py says why not BLS). The logic lives
in tritonllm.python_backends.front; this file only moves tensors.

Each request is served on a worker thread so that many streams run at once (cache lookups of requests arriving
together are batched by the embedder); `execute` returns at once, as a decoupled model may.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonllm.contract import ENGINE_MODEL_PARAMETER, ENSEMBLE_URL_PARAMETER
from tritonllm.python_backends import front
from tritonllm.python_backends.cancellation import post_cancellation
from tritonllm.python_backends.ensemble_stream import EnsembleFailure, ensemble_url, stream_pieces
from tritonllm.python_backends.errors import InvalidArgument, Unavailable
from tritonllm.python_backends.semantic_cache import CacheStats
from tritonllm.python_backends.triton_io import get_input, model_setup, triton_error

MAX_CONCURRENT_REQUESTS = 256  # worker threads; they mostly wait on the ensemble's stream
ENSEMBLE_RESPONSE_TIMEOUT_SECONDS = 600.0  # between two responses of the ensemble (a queued request waits long)
# gRPC status names of an ensemble error -> the code it is passed on with (others: INTERNAL).
PASSED_ON_CODES = {"INVALID_ARGUMENT": "INVALID_ARG", "UNAVAILABLE": "UNAVAILABLE", "CANCELLED": "CANCELLED",
                   "DEADLINE_EXCEEDED": "UNAVAILABLE", "RESOURCE_EXHAUSTED": "UNAVAILABLE", "NOT_FOUND": "NOT_FOUND"}
LOOKUP_SECONDS_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0]


class CacheMetrics:
    """The cache's counters on Triton's /metrics (Prometheus names, prefix tritonllm_cache_)."""

    def __init__(self) -> None:
        family = pb_utils.MetricFamily
        self.families = []  # a family dropped by Python is removed from /metrics

        def metric(name: str, description: str, kind, **buckets):
            self.families.append(family(name=name, description=description, kind=kind))
            return self.families[-1].Metric(labels={}, **buckets)

        self.hits = metric("tritonllm_cache_hits_total", "Requests answered from the semantic cache", family.COUNTER)
        self.misses = metric("tritonllm_cache_misses_total", "Cache lookups that found no answer", family.COUNTER)
        evictions = family(name="tritonllm_cache_evictions_total", kind=family.COUNTER,
                           description="Entries dropped to stay within max_entries (reason=lru) or by TTL (reason=ttl)")
        self.families.append(evictions)
        self.lru = evictions.Metric(labels={"reason": "lru"})
        self.ttl = evictions.Metric(labels={"reason": "ttl"})
        self.rejections = metric("tritonllm_cache_verifier_rejections_total",
                                 "Candidates above the similarity threshold that the verifier refused to serve",
                                 family.COUNTER)
        self.entries = metric("tritonllm_cache_entries", "Answers held by the semantic cache", family.GAUGE)
        self.lookup_seconds = metric("tritonllm_cache_lookup_seconds", "Cache lookup latency, embedding included",
                                     family.HISTOGRAM, buckets=LOOKUP_SECONDS_BUCKETS)
        self._lock = threading.Lock()
        self._last = CacheStats(0, 0, 0, 0, 0, 0)

    # Every metric call holds self._lock: tritonserver 2.51 crashed (SIGSEGV in libtriton_python) when two request
    # threads updated metrics at the same time.
    def observe_lookup(self, seconds: float) -> None:
        with self._lock:
            self.lookup_seconds.observe(seconds)

    def update(self, stats: CacheStats) -> None:
        with self._lock:  # counters take increments: add what changed since the last update
            last, self._last = self._last, stats
            # never a negative increment (a snapshot reload resets the counts): the stub aborts tritonserver on one
            for counter, now, before in ((self.hits, stats.hits, last.hits), (self.misses, stats.misses, last.misses),
                                         (self.lru, stats.evictions, last.evictions),
                                         (self.ttl, stats.expirations, last.expirations),
                                         (self.rejections, stats.rejections, last.rejections)):
                if now > before:
                    counter.increment(now - before)
            self.entries.set(stats.entries)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters, version_dir = model_setup(args)
        self.metrics = CacheMetrics()
        self.front, loaded = front.build_front(parameters, version_dir, self.metrics.observe_lookup,
                                               self.metrics.update)
        self.ensemble = self.front.model
        self.ensemble_url = ensemble_url(parameters.get(ENSEMBLE_URL_PARAMETER))
        self.engine_model = parameters.get(ENGINE_MODEL_PARAMETER)
        if loaded.problem:
            pb_utils.Logger.log_warn(f"llm: {loaded.problem}")
        elif self.front.cache is not None:
            pb_utils.Logger.log_info(f"llm: semantic cache loaded {loaded.entries} entries")
            self.metrics.update(self.front.cache.stats())
        self.pool = ThreadPoolExecutor(MAX_CONCURRENT_REQUESTS, thread_name_prefix="llm-request")

    def execute(self, requests: list) -> None:
        for request in requests:  # inputs are read here; the answer is produced on a worker thread
            sender = request.get_response_sender()
            try:
                # Copies: the arrays view the request's shared memory, which may be freed once execute returns.
                parsed = self.front.parse({name: array.copy() for name, dtype in front.REQUEST_INPUTS.items()
                                           if (array := get_input(request, name, dtype)) is not None})
            except (InvalidArgument, Unavailable) as error:
                self.fail(sender, triton_error(error))
                continue
            self.pool.submit(self.serve, parsed, sender, request.is_cancelled)
        return None

    def serve(self, parsed: front.FrontRequest, sender, cancelled) -> None:
        try:
            outcome = self.front.serve(parsed, lambda: self.generate(parsed, cancelled),
                                       lambda reply: self.send(sender, reply), cancelled)
            pb_utils.Logger.log_verbose(f"llm: {outcome}")
        except front.Cancelled as error:
            self.fail(sender, pb_utils.TritonError(str(error), pb_utils.TritonError.CANCELLED))
        except EnsembleFailure as error:
            code = getattr(pb_utils.TritonError, PASSED_ON_CODES.get(error.status, "INTERNAL"))
            self.fail(sender, pb_utils.TritonError(str(error), code))
        except Exception as error:  # anything else still ends the stream, with the reason
            self.fail(sender, pb_utils.TritonError(f"llm: {type(error).__name__}: {error}"))
        finally:
            if self.front.cache is not None:
                self.metrics.update(self.front.cache.stats())

    def generate(self, parsed: front.FrontRequest, cancelled):
        """The ensemble's text pieces, as they stream in; a cancelled client's generation is stopped in the engine."""
        request_id = uuid.uuid4().hex
        return stream_pieces(self.ensemble_url, self.ensemble, parsed.ensemble_inputs, request_id,
                             ENSEMBLE_RESPONSE_TIMEOUT_SECONDS, cancelled,
                             lambda: bool(self.engine_model) and post_cancellation(self.engine_model, request_id))

    @staticmethod
    def send(sender, reply: front.Reply) -> None:
        response = pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([[reply.text]], dtype=np.object_)),
            pb_utils.Tensor("cache_hit", np.array([[reply.cache_hit]], dtype=np.bool_)),
            pb_utils.Tensor("cache_similarity", np.array([[reply.similarity]], dtype=np.float32)),
        ])
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if reply.final else 0)

    @staticmethod
    def fail(sender, error: pb_utils.TritonError) -> None:
        try:
            sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as send_error:  # the stream was already closed (final sent, or the client went away)
            pb_utils.Logger.log_warn(f"llm: could not report {error.message()!r}: {send_error}")

    def finalize(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.front.close()
