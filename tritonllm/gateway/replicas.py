"""Triton replicas behind the gateway: which one takes the next request, and which are in rotation.

Each request goes to the ready replica with the fewest requests in flight (ties: the one picked least often, so an
idle pool is used round-robin). A replica leaves the rotation when its readiness check fails or a request to it
cannot connect, and comes back when a readiness check passes again. The same check tells which Triton model of a
replica takes the requests: the first of the candidates it answers ready for (with `auto`: `llm`, else `ensemble`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Replica:
    url: str  # gRPC host:port
    model: str  # the Triton model requests go to (until a readiness check finds a preferred one ready)
    ready: bool = True
    in_flight: int = 0
    picks: int = 0


def grpc_ready_model(url: str, candidates: tuple[str, ...], timeout: float) -> str | None:
    """The first of `candidates` the server at `url` answers ready for (Triton's gRPC ServerReady and ModelReady);
    None when the server or every candidate is not ready."""
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            if not client.is_server_ready(client_timeout=timeout):
                return None
            return next((model for model in candidates if client.is_model_ready(model, client_timeout=timeout)),
                        None)
        finally:
            client.close()
    except Exception:  # refused, timed out, not a Triton: out of rotation all the same
        return None


class ReplicaPool:
    """The replicas and their load; `choose` and `release` are called from the event loop, `check_all` from the
    health thread (the flags it sets are plain booleans)."""

    def __init__(self, urls: tuple[str, ...], fallback_model: str, ready_model: Callable[[str], str | None]) -> None:
        """`ready_model(url)`: the model a replica serves requests with now, None when it is not ready;
        `fallback_model` is used until a check has found one (every repository has it)."""
        self.replicas = [Replica(url, fallback_model) for url in urls]
        self._ready_model = ready_model
        self._lock = threading.Lock()

    def choose(self, excluded: set[str]) -> Replica | None:
        """The least loaded ready replica not in `excluded`; when none is ready, the least loaded of the others
        (readiness lags behind a recovery); None when every replica was excluded."""
        with self._lock:
            candidates = [replica for replica in self.replicas if replica.url not in excluded]
            ready = [replica for replica in candidates if replica.ready] or candidates
            if not ready:
                return None
            chosen = min(ready, key=lambda replica: (replica.in_flight, replica.picks))
            chosen.in_flight += 1
            chosen.picks += 1
            return chosen

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1

    def mark_unready(self, replica: Replica) -> None:
        replica.ready = False

    def check_all(self) -> None:
        for replica in self.replicas:
            model = self._ready_model(replica.url)
            replica.ready = model is not None
            replica.model = model or replica.model

    def ready_count(self) -> int:
        return sum(replica.ready for replica in self.replicas)


class HealthWatch:
    """Every replica's readiness asked once on `start` (so the first requests go to the model found), then by a
    thread each `interval` seconds until stopped."""

    def __init__(self, pool: ReplicaPool, interval: float) -> None:
        self.pool, self.interval = pool, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-health", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.pool.check_all()

    def start(self) -> None:
        self.pool.check_all()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
