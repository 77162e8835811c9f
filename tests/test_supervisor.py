"""The supervisor: health that tells the truth after a stub dies, and recovery by itself (real tritonserver)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests
from support import export_tiny_llama

from tritonllm.asgi_thread import ThreadedASGIServer
from tritonllm.builders import repository
from tritonllm.client.api import GenerationParams, LLMClient
from tritonllm.contract import EngineSettings, RepositorySettings
from tritonllm.server import TritonServer
from tritonllm.supervisor import Supervisor, health_app, served_models

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory) -> Path:
    from tritonllm.builders.source import prepare_hf_model
    from tritonllm.paths import cache_dir

    root = tmp_path_factory.mktemp("supervised")
    settings = RepositorySettings(
        tokenizer_dir=prepare_hf_model(None, cache_dir()), onnx_dir=export_tiny_llama(root / "tiny"),
        engine=EngineSettings(max_batch_size=4, max_context_length=256, kv_cache_max_tokens=1024, intra_op_threads=1))
    return repository.render_repository(settings, root / "repository")


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds:.0f} s: {what}"
        time.sleep(0.2)


def test_served_models_are_the_folders_with_a_config(tiny_repository):
    assert served_models(tiny_repository) == ["engine", "ensemble", "postprocessing", "preprocessing"]


def test_a_killed_engine_stub_makes_the_server_not_ready_then_it_recovers_by_itself(tiny_repository, tmp_path):
    with TritonServer(tiny_repository, log_file=tmp_path / "tritonserver.log") as server:
        supervisor = Supervisor(server, interval_seconds=0.5, probe_timeout_seconds=10, failures_to_restart=2).start()
        health = ThreadedASGIServer(health_app(supervisor), "127.0.0.1", 0, "health").start()
        try:
            def status(path: str) -> int:
                return requests.get(f"{health.url}{path}", timeout=10).status_code

            wait_for(lambda: status("/health/ready") == 200, 60, "ready after start")
            assert status("/health/live") == 200
            # Triton's own readiness keeps answering 200 for a model whose stub is dead: ours must not.
            os.kill(server.stub_pids("engine")[0], signal.SIGKILL)
            wait_for(lambda: status("/health/ready") == 503, 60, "not ready once the engine's stub is dead")
            wait_for(lambda: supervisor.health().restarts == 1 and status("/health/ready") == 200, 120,
                     "ready again after a restart")
            assert status("/health/live") == 200
            answer = LLMClient(server.endpoints.grpc_url, "grpc").generate("Hello", GenerationParams(max_tokens=4))
            assert answer
        finally:
            health.stop()
            supervisor.stop()
