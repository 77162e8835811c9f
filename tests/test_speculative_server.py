"""Speculative decoding over a real tritonserver: a repository whose engine drafts with a draft model (the tiny
Llama's int8 graph for its fp32 graph, the quantized self-draft in miniature), requests choosing their drafter
through the ensemble's `speculative` input."""

from __future__ import annotations

import time

import pytest
from support import engine_metric

from tritonllm.builders import repository
from tritonllm.client.api import GenerationError, GenerationParams, LLMClient
from tritonllm.contract import CacheSettings, EngineSettings, RepositorySettings
from tritonllm.server import TritonServer

pytestmark = pytest.mark.server  # a tritonserver on a tiny random model: no SmolLM2 build

PROMPTS = ["Summarize: the cat sat on the mat. The cat sat on the mat.", "What is Triton?", "Count: 1 2 3 4 1 2 3"]


@pytest.fixture(scope="module")
def draft_server(tmp_path_factory, tiny_onnx, tiny_draft_onnx):
    from tritonllm.builders.source import prepare_hf_model
    from tritonllm.paths import cache_dir

    root = tmp_path_factory.mktemp("speculative-server")
    settings = RepositorySettings(
        tokenizer_dir=prepare_hf_model(None, cache_dir()), onnx_dir=tiny_onnx, draft_onnx_dir=tiny_draft_onnx,
        engine=EngineSettings(max_batch_size=4, max_context_length=512, kv_cache_max_tokens=4096, intra_op_threads=1,
                              speculative_drafter="draft_model", speculative_max_batch_size=4),
        cache=CacheSettings(enabled=False))
    with TritonServer(repository.render_repository(settings, root / "repository"),
                      log_file=root / "tritonserver.log") as server:
        yield server


def test_greedy_text_is_the_same_with_every_drafter_and_the_draft_model_is_counted(draft_server):
    client = LLMClient(draft_server.endpoints.grpc_url, "grpc")
    for prompt in PROMPTS:
        answers = {choice: client.generate(prompt, GenerationParams(max_tokens=24, apply_chat_template=True,
                                                                    speculative=choice))
                   for choice in (None, "off", "prompt_lookup", "draft_model")}
        assert len(set(answers.values())) == 1 and answers["off"], answers
    deadline = time.monotonic() + 10  # the engine's metrics are flushed every second
    while engine_metric(draft_server, "tritonllm_speculative_accepted_tokens_total", drafter="draft_model") == 0:
        assert time.monotonic() < deadline, "no accepted draft_model tokens in /metrics"
        time.sleep(0.5)
    assert engine_metric(draft_server, "tritonllm_speculative_draft_tokens_total", drafter="draft_model") > 0


def test_seeded_sampled_requests_speculate_and_bad_choices_are_invalid_arg(draft_server):
    client = LLMClient(draft_server.endpoints.grpc_url, "grpc")
    sampled = GenerationParams(max_tokens=24, min_tokens=24, temperature=0.9, top_p=0.95, seed=7,
                               speculative="draft_model")
    first = list(client.stream(PROMPTS[0], sampled))
    assert "".join(first) and "".join(first) == "".join(client.stream(PROMPTS[0], sampled))  # alone: reproducible
    with pytest.raises(GenerationError, match="speculative = 'eagle' is not allowed; allowed: off, prompt_lookup, "
                                              "draft_model"):
        client.generate(PROMPTS[1], GenerationParams(max_tokens=4, speculative="eagle"))  # INVALID_ARG by the engine
    assert client.generate(PROMPTS[1], GenerationParams(max_tokens=4))  # the server keeps answering
