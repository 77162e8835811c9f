"""Triton replicas behind the gateway: which one takes the next request, and which are in rotation.

Each request goes to the ready replica with the fewest requests in flight (ties: the one picked least often, so an
idle pool is used round-robin). A replica leaves the rotation when its readiness check fails or a request to it
cannot connect, and comes back when a readiness check passes again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Replica:
    url: str  # gRPC host:port
    ready: bool = True
    in_flight: int = 0
    picks: int = 0


def grpc_ready(url: str, model: str, timeout: float) -> bool:
    """Whether the server at `url` answers ready for `model` (Triton's gRPC ServerReady and ModelReady)."""
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            return client.is_server_ready(client_timeout=timeout) and client.is_model_ready(model,
                                                                                          client_timeout=timeout)
        finally:
            client.close()
    except Exception:  # refused, timed out, not a Triton: out of rotation all the same
        return False


class ReplicaPool:
    """The replicas and their load; `choose` and `release` are called from the event loop, `check_all` from the
    health thread (the flags it sets are plain booleans)."""

    def __init__(self, urls: tuple[str, ...], is_ready: Callable[[str], bool]) -> None:
        self.replicas = [Replica(url) for url in urls]
        self._is_ready = is_ready
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
            replica.ready = self._is_ready(replica.url)

    def ready_count(self) -> int:
        return sum(replica.ready for replica in self.replicas)


class HealthWatch:
    """A thread asking every replica's readiness each `interval` seconds until stopped."""

    def __init__(self, pool: ReplicaPool, interval: float) -> None:
        self.pool, self.interval = pool, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-health", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.pool.check_all()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
