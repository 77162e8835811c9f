"""The gateway served by uvicorn on a thread of the calling process, so it ends with that process: `tritonllm serve`
runs it next to tritonserver, `tritonllm gateway` alone, the tests in-process."""

from __future__ import annotations

import gc
from pathlib import Path

from tritonllm.asgi_thread import ASGIStartError, ThreadedASGIServer
from tritonllm.contract import GatewaySettings


class GatewayError(RuntimeError):
    """The gateway could not start; the message says why."""


class GatewayServer:
    """Use as a context manager, or `start()` / `stop()`; `url` is its base URL once started."""

    def __init__(self, settings: GatewaySettings, tokenizer_dir: Path, keys_file: Path | None = None) -> None:
        from tritonllm.gateway.app import Gateway, create_app
        from tritonllm.gateway.auth import load_keys
        from tritonllm.gateway.tokens import PromptTokens

        settings.validate()
        self.gateway = Gateway(settings, load_keys(keys_file), PromptTokens(tokenizer_dir))
        self._server = ThreadedASGIServer(create_app(self.gateway), settings.host, settings.port, "gateway")

    @property
    def url(self) -> str:
        return self._server.url

    def start(self, timeout: float = 30.0) -> "GatewayServer":
        try:
            self._server.start(timeout)
        except ASGIStartError as error:
            raise GatewayError(str(error)) from None
        # The process now holds hundreds of thousands of long-lived objects (transformers, the tokenizer, the app):
        # frozen, the cyclic collector never scans them again, where a full collection otherwise stalls the event
        # loop for ~0.2 s every few thousand requests.
        gc.freeze()
        return self

    def is_running(self) -> bool:
        return self._server.is_running()

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> "GatewayServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
