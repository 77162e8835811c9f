"""The deployment a measurement runs against: a server already running (its gRPC URL), or the bundled model built
(content-cached) and served here for the length of the measurement."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any


def bundled_build(precision: str, console: Any = None):
    """The bundled SmolLM2 built for the ONNX Runtime engine in `precision` (a `builders.pipeline.BuildResult`)."""
    from tritonllm.builders.pipeline import build

    return build(model=None, precision=precision, console=console)


def status(console: Any, text: str):
    """A `console.status(text)` spinner, or nothing without a console."""
    return console.status(text) if console is not None else nullcontext()


@contextmanager
def served(url: str | None, repository_dir: Path | None, console: Any = None) -> Iterator[str]:
    """`url` when given; else tritonserver started on `repository_dir` (free ports), stopped when the block ends."""
    if url is not None:
        yield url
        return
    from tritonllm.server import TritonServer

    with status(console, "starting tritonserver ..."):
        server = TritonServer(repository_dir).start()
    try:
        yield server.endpoints.grpc_url
    finally:
        server.stop()
