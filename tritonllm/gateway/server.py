"""The gateway served by uvicorn on a thread of the calling process, so it ends with that process: `tritonllm serve`
runs it next to tritonserver, `tritonllm gateway` alone, the tests in-process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tritonllm.contract import GatewaySettings


class GatewayError(RuntimeError):
    """The gateway could not start; the message says why."""


class GatewayServer:
    """Use as a context manager, or `start()` / `stop()`; `url` is its base URL once started."""

    def __init__(self, settings: GatewaySettings, tokenizer_dir: Path, keys_file: Path | None = None) -> None:
        import uvicorn

        from tritonllm.gateway.app import Gateway, create_app
        from tritonllm.gateway.auth import load_keys
        from tritonllm.gateway.tokens import PromptTokens

        settings.validate()
        self.gateway = Gateway(settings, load_keys(keys_file), PromptTokens(tokenizer_dir))
        config = uvicorn.Config(create_app(self.gateway), host=settings.host, port=settings.port,
                                log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="gateway", daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> "GatewayServer":
        self._thread.start()  # uvicorn installs no signal handlers off the main thread: the caller owns them
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise GatewayError(f"the gateway did not start on {self._server.config.host}:"
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

    def __enter__(self) -> "GatewayServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
