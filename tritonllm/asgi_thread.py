"""An ASGI app served by uvicorn on a thread of the calling process, so it ends with that process (the gateway, the
supervisor's health endpoint)."""

from __future__ import annotations

import threading
import time


class ASGIStartError(RuntimeError):
    """The server did not start; the message says where."""


class ThreadedASGIServer:
    """`start()` / `stop()`; `url` is the base URL once started (port 0 picks a free one)."""

    def __init__(self, app, host: str, port: int, name: str) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> "ThreadedASGIServer":
        self._thread.start()  # uvicorn installs no signal handlers off the main thread: the caller owns them
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ASGIStartError(f"{self._thread.name} did not start on {self._server.config.host}:"
                                     f"{self._server.config.port} (port in use?)")
            time.sleep(0.02)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=30)
