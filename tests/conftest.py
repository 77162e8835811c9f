"""Shared fixtures: the bundled SmolLM2 built once per session, and a real tritonserver serving it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_build():
    """The bundled SmolLM2-135M-Instruct built for the ONNX Runtime engine (fp32); content-cached across runs."""
    from tritonllm.builders.pipeline import build

    return build(model=None, precision="fp32")


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_build) -> Path:
    return smollm2_build.hf_dir


@pytest.fixture(scope="session")
def server(smollm2_build, tmp_path_factory):
    """A real tritonserver on 127.0.0.1 serving the rendered repository (free ports)."""
    from tritonllm.server import TritonServer

    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(smollm2_build.repository_dir, log_file=log) as running:
        yield running
        assert running.is_running(), f"tritonserver died during the tests:\n{running.log_tail()}"


@pytest.fixture(params=["grpc", "http"])
def client(request, server):
    from tritonllm.client.api import LLMClient

    url = server.endpoints.grpc_url if request.param == "grpc" else server.endpoints.http_url
    return LLMClient(url, protocol=request.param)


@pytest.fixture
def grpc_client(server):
    from tritonllm.client.api import LLMClient

    return LLMClient(server.endpoints.grpc_url, protocol="grpc")
