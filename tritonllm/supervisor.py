"""Supervision of a running tritonserver: health that tells the truth, and recovery without an operator.

tritonserver 2.51 keeps answering `/v2/health/ready` and `/v2/models/<m>/ready` with 200 after a Python stub died:
in-flight requests of that model get no answer, new ones fail ("Stub process ... is not healthy"), and an
orchestrator watching Triton's own probes never restarts the pod. So every `interval_seconds` the supervisor
- checks that the server process runs and that Triton calls every model ready,
- and runs a real request through the served path (the front model with the cache bypassed, or the ensemble):
  one token of greedy generation, which passes through every stub.
A failed check makes the server not ready at once. After `failures_to_restart` failures in a row the supervisor
restarts tritonserver on the same ports: requests in flight then fail (their connection closes) instead of
hanging, and the models come back in seconds. A probe that times out while the engine keeps producing tokens is a
busy server, not a dead one, and is not counted as a failure.

`health()` is what the health endpoint (`tritonllm serve --health-port`) answers: ready only while the last check
passed; live unless `max_failed_restarts` restarts in a row did not bring the server back (then an orchestrator
should replace the whole pod).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from tritonllm.server import ServerError, TritonServer

FRONT_MODEL = "llm"
ENSEMBLE_MODEL = "ensemble"
PROBE_PROMPT = "ping"
PROBE_TENANT = "tritonllm-supervisor"  # its prefix-cache blocks never mix with a client's
GENERATED_TOKENS_METRIC = "tritonllm_generation_tokens_total"
RESTART_STOP_SECONDS = 5.0


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    detail: str
    restarts: int
    checked_at: float  # time.time() of the last check; 0 before the first

    def as_json(self) -> dict[str, object]:
        return {"live": self.live, "ready": self.ready, "detail": self.detail, "restarts": self.restarts,
                "checked_at": self.checked_at}


def served_models(repository: Path) -> list[str]:
    """The models of a rendered repository (folders holding a config.pbtxt)."""
    return sorted(path.parent.name for path in Path(repository).glob("*/config.pbtxt"))


class Supervisor:
    def __init__(self, server: TritonServer, interval_seconds: float = 2.0, probe_timeout_seconds: float = 30.0,
                 failures_to_restart: int = 2, max_failed_restarts: int = 3,
                 on_restart: Callable[[str], None] = lambda reason: None) -> None:
        self.server = server
        self.interval_seconds, self.probe_timeout_seconds = interval_seconds, probe_timeout_seconds
        self.failures_to_restart, self.max_failed_restarts = failures_to_restart, max_failed_restarts
        self.on_restart = on_restart
        self.models = served_models(server.repository)
        self.probe_model = FRONT_MODEL if FRONT_MODEL in self.models else ENSEMBLE_MODEL
        self._lock = threading.Lock()
        self._health = Health(live=True, ready=False, detail="not checked yet", restarts=0, checked_at=0.0)
        self._failures = 0
        self._failed_restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tritonllm-supervisor", daemon=True)

    # ---- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.probe_timeout_seconds + 10)

    def health(self) -> Health:
        with self._lock:
            return self._health

    # ---- checks ---------------------------------------------------------------------------------------------------

    def check(self) -> CheckResult:
        """One look at the server: process, Triton's model readiness, one real request."""
        if not self.server.is_running():
            code = self.server.process.returncode if self.server.process is not None else None
            return CheckResult(False, f"tritonserver is not running (exit code {code})")
        base = f"http://{self.server.endpoints.http_url}"
        for model in self.models:
            try:
                reply = requests.get(f"{base}/v2/models/{model}/ready", timeout=5)
            except requests.RequestException as error:
                return CheckResult(False, f"tritonserver does not answer: {error}")
            if reply.status_code != 200:
                return CheckResult(False, f"model {model} is not ready (HTTP {reply.status_code})")
        return self._probe()

    def _probe(self) -> CheckResult:
        from tritonllm.client.api import GenerationError, GenerationParams, LLMClient

        params = GenerationParams(max_tokens=1, tenant=PROBE_TENANT,
                                  cache="bypass" if self.probe_model == FRONT_MODEL else None)
        client = LLMClient(self.server.endpoints.grpc_url, "grpc", model=self.probe_model,
                           timeout=self.probe_timeout_seconds)
        generated_before = self._generated_tokens()
        try:
            client.generate(PROBE_PROMPT, params)
        except GenerationError as error:
            if error.status == "DEADLINE_EXCEEDED" and self._generated_tokens() > generated_before:
                return CheckResult(True, f"busy: the probe waited over {self.probe_timeout_seconds:.0f} s while the "
                                         "engine kept generating")
            return CheckResult(False, f"probe request to {self.probe_model} failed: {error}")
        except Exception as error:  # connection refused, reset: the server is going down
            return CheckResult(False, f"probe request to {self.probe_model} failed: {type(error).__name__}: {error}")
        return CheckResult(True, "ok")

    def _generated_tokens(self) -> float:
        """The engine's generated-token counter (summed over its label sets); -1 when metrics are unreachable."""
        try:
            text = requests.get(self.server.endpoints.metrics_url, timeout=5).text
        except requests.RequestException:
            return -1.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(GENERATED_TOKENS_METRIC))

    # ---- loop -----------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            result = self.check()
            self._record(result)
            if not result.ok and self._failures >= self.failures_to_restart and not self._stop.is_set():
                self._restart(result.detail)
            self._stop.wait(self.interval_seconds)

    def _record(self, result: CheckResult, restarted: bool = False) -> None:
        self._failures = 0 if result.ok else self._failures + 1
        with self._lock:
            previous = self._health
            self._health = Health(live=self._failed_restarts < self.max_failed_restarts, ready=result.ok,
                                  detail=result.detail, restarts=previous.restarts + int(restarted),
                                  checked_at=time.time())

    def _restart(self, reason: str) -> None:
        self.on_restart(reason)
        # Requests waiting on a dead stub never complete: waiting Triton's whole exit timeout for them only delays
        # the recovery, so the server gets a few seconds to unload (the cache writes its snapshot), then is killed.
        self.server.stop(timeout=RESTART_STOP_SECONDS)
        try:
            self.server.start()
        except ServerError as error:
            self._failed_restarts += 1
            self._record(CheckResult(False, f"restart after '{reason}' failed: {error}"), restarted=True)
            return
        self._failed_restarts = 0
        self._record(self.check(), restarted=True)


def health_app(supervisor: Supervisor):
    """The health endpoint of a supervised server: GET /health/live and /health/ready, 200 or 503 with the
    supervisor's view as JSON (the same answer on both; the status code is what differs)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(title="tritonllm health", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health/live")
    def live() -> JSONResponse:
        health = supervisor.health()
        return JSONResponse(health.as_json(), status_code=200 if health.live else 503)

    @app.get("/health/ready")
    def ready() -> JSONResponse:
        health = supervisor.health()
        return JSONResponse(health.as_json(), status_code=200 if health.ready else 503)

    return app
