"""The OpenAI-compatible gateway in front of a real tritonserver, spoken to with the official `openai` client.

The engine is a tiny random Llama (gibberish, deterministic under greedy decoding) with SmolLM2's tokenizer; the
repository has the front model `llm` (semantic cache, the real embedder), which the gateway picks by default. The
gateway runs in this process (uvicorn on a thread) on 127.0.0.1. Its replicas are the real server and, for the
scale-out tests, a port nobody listens on (a replica that died).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import requests
from support import engine_metric, export_tiny_llama

from tritonllm.builders import repository
from tritonllm.client.api import GenerationParams, LLMClient
from tritonllm.contract import CacheSettings, EngineSettings, GatewaySettings, RepositorySettings
from tritonllm.gateway.auth import hash_key
from tritonllm.gateway.server import GatewayServer
from tritonllm.gateway.tokens import PromptTokens, repository_tokenizer_dir
from tritonllm.python_backends.metrics import FLUSH_INTERVAL_SECONDS
from tritonllm.server import TritonServer, free_port

pytestmark = pytest.mark.server  # a tritonserver on a tiny random model: no SmolLM2 build

MODEL = "tiny-llama"
KEYS = {"alpha": {"tenant": "alpha"}, "beta": {"tenant": "beta"},
        "one-per-second": {"tenant": "slow", "requests_per_second": 1},
        "small-budget": {"tenant": "budget", "tokens_per_minute": 10}}
TRITONLLM = Path(sys.executable).parent / "tritonllm"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle on the shore."


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory, embedder_dir) -> Path:
    from tritonllm.builders.source import prepare_hf_model
    from tritonllm.paths import cache_dir

    root = tmp_path_factory.mktemp("gateway")
    settings = RepositorySettings(
        tokenizer_dir=prepare_hf_model(None, cache_dir()), onnx_dir=export_tiny_llama(root / "tiny"),
        embedder_dir=embedder_dir, cache=CacheSettings(snapshot_interval_seconds=3600.0), served_model_name=MODEL,
        engine=EngineSettings(max_batch_size=8, max_context_length=512, kv_cache_max_tokens=8192, intra_op_threads=1))
    return repository.render_repository(settings, root / "repository")


@pytest.fixture(scope="module")
def triton(tiny_repository, tmp_path_factory):
    with TritonServer(tiny_repository, log_file=tmp_path_factory.mktemp("logs") / "tritonserver.log") as server:
        yield server
        assert server.is_running(), server.log_tail()


def _keys_file(folder: Path) -> Path:
    path = folder / "keys.json"
    path.write_text(json.dumps({"keys": [{"sha256": hash_key(key), **entry} for key, entry in KEYS.items()]}))
    return path


@pytest.fixture(scope="module")
def gateway(triton, tiny_repository, tmp_path_factory):
    settings = GatewaySettings(triton_grpc_urls=(triton.endpoints.grpc_url,), served_model_name=MODEL, port=0,
                               default_max_tokens=8)
    with GatewayServer(settings, repository_tokenizer_dir(tiny_repository),
                       _keys_file(tmp_path_factory.mktemp("keys"))) as server:
        yield server


def openai_client(gateway, key: str = "alpha") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)


def native(triton, prompt: str, max_tokens: int, chat: bool) -> str:
    return LLMClient(triton.endpoints.grpc_url).generate(prompt, GenerationParams(
        max_tokens=max_tokens, apply_chat_template=chat))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_through_the_openai_client_equals_the_ensemble(gateway, triton, tiny_repository, stream):
    client = openai_client(gateway)
    messages = [{"role": "user", "content": PROMPT}]
    if stream:
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] in ("length", "stop")
        usage = chunks[-1].usage
    else:
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        text, usage = reply.choices[0].message.content, reply.usage
        assert reply.choices[0].message.role == "assistant" and reply.model == MODEL
    assert text and text == native(triton, PROMPT, 12, chat=True)
    tokenizer = PromptTokens(repository_tokenizer_dir(tiny_repository)).tokenizer
    assert usage.prompt_tokens == len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert usage.completion_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_completions_through_the_openai_client_equal_the_ensemble(gateway, triton, stream):
    client = openai_client(gateway)
    if stream:
        text = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True) if chunk.choices)
    else:
        reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
        text = reply.choices[0].text
        assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("length", "stop")
    assert text and text == native(triton, PROMPT, 10, chat=False)


def test_a_system_prompt_and_history_reach_the_model(gateway):
    client = openai_client(gateway)
    single = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            temperature=0)
    turns = client.chat.completions.create(model=MODEL, temperature=0, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert turns.usage.prompt_tokens > single.usage.prompt_tokens
    assert single.usage.completion_tokens <= 8  # default_max_tokens of the gateway


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_unknown_keys_are_refused_with_401(gateway, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for method, path in (("post", "/v1/chat/completions"), ("post", "/v1/completions"), ("get", "/v1/models")):
        reply = requests.request(method, gateway.url + path, headers=headers, timeout=30,
                                 json={"model": MODEL, "prompt": "x"})
        assert reply.status_code == 401
        assert reply.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai_client(gateway, key or "not-a-key").completions.create(model=MODEL, prompt="x")


def test_models_health_and_metrics(gateway, triton):
    assert [model.id for model in openai_client(gateway).models.list()] == [MODEL]
    assert requests.get(gateway.url + "/health", timeout=30).json()["replicas_ready"] == 1
    openai_client(gateway).completions.create(model=MODEL, prompt="metrics", max_tokens=2)
    text = requests.get(gateway.url + "/metrics", timeout=30).text
    assert 'tritonllm_gateway_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "tritonllm_gateway_request_seconds_bucket" in text and "tritonllm_gateway_active_streams 0.0" in text
    assert f'tritonllm_gateway_replica_ready{{replica="{triton.endpoints.grpc_url}"}} 1.0' in text
    assert 'tritonllm_gateway_tokens_total{kind="completion",tenant="alpha"}' in text


def _chat_requests_answered(gateway) -> float:
    from tritonllm.client.perf import parse_metrics

    return sum(sample.value for sample in parse_metrics(requests.get(gateway.url + "/metrics", timeout=30).text)
               if sample.name == "tritonllm_gateway_requests_total"
               and sample.labels == {"endpoint": "/v1/chat/completions", "status": "200"})


def test_aiperf_profiles_the_chat_endpoint_and_tritons_generate_stream(gateway, triton, tiny_repository, tmp_path):
    from tritonllm.client.aiperf import (WARMUP_REQUESTS, AiperfError, aiperf_binary, gateway_chat_target,
                                         run_aiperf, triton_generate_target)

    try:
        aiperf_binary()
    except AiperfError as missing:
        pytest.skip(str(missing))
    prompts, output_tokens = [PROMPT, "Name three rivers.", "What is a lighthouse?"], 4
    answered = _chat_requests_answered(gateway)
    for target in (gateway_chat_target(gateway.url, MODEL, api_key="alpha"),
                   triton_generate_target(triton.endpoints.http_url, "ensemble", tmp_path)):
        [level] = run_aiperf(target, repository_tokenizer_dir(tiny_repository), prompts, [2], len(prompts),
                             output_tokens, tmp_path)
        assert (level.model, level.concurrency, level.requests) == (target.name, 2, len(prompts))
        # (ITL may be 0: the gateway's `llm` answers repeats of its warm-up prompts whole, from the cache)
        assert 0 < level.ttft_s["p50"] <= level.latency_s["p50"] and level.itl_s["p50"] >= 0
        assert level.output_tokens_mean > 0
    # every request aiperf sent to the chat endpoint was answered by the gateway (none went around it)
    assert _chat_requests_answered(gateway) - answered == len(prompts) + WARMUP_REQUESTS


def test_requests_over_the_rate_limit_get_429_with_retry_after(gateway):
    body = {"model": MODEL, "prompt": "limit", "max_tokens": 2}
    replies = [requests.post(gateway.url + "/v1/completions", json=body, timeout=30,
                             headers={"Authorization": "Bearer one-per-second"}) for _ in range(3)]
    assert replies[0].status_code == 200
    limited = [reply for reply in replies[1:] if reply.status_code == 429]
    assert limited and int(limited[0].headers["Retry-After"]) >= 1
    assert limited[0].json()["error"]["code"] == "rate_limit_exceeded"
    assert "requests_per_second" in limited[0].json()["error"]["message"]

    client = openai_client(gateway, "small-budget")
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)  # ~25 tokens: over the 10 a minute
    with pytest.raises(openai.RateLimitError, match="tokens_per_minute"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert openai_client(gateway, "beta").completions.create(model=MODEL, prompt="x", max_tokens=2).choices


@pytest.mark.parametrize("field, value", [
    ("logprobs", True), ("n", 2), ("tools", [{"type": "function"}]), ("tenant", "beta"), ("temperature", "hot"),
    ("top_p", 0), ("max_tokens", 2**40), ("seed", -1), ("stop", ["a", "b", "c", "d", "e"]), ("messages", []),
    ("model", "gpt-4o")])
def test_bad_fields_are_refused_with_400_naming_the_field(gateway, field, value):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], field: value}
    reply = requests.post(gateway.url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": "Bearer alpha"})
    assert reply.status_code == (404 if field == "model" else 400)
    error = reply.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_oversized_deep_and_broken_bodies_are_refused_and_the_server_stays_up(gateway):
    headers = {"Authorization": "Bearer alpha", "Content-Type": "application/json"}
    url = gateway.url + "/v1/completions"
    deep = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert requests.post(url, data=deep, headers=headers, timeout=30).json()["error"]["code"] == "json_too_deep"
    huge = json.dumps({"model": MODEL, "prompt": "x" * 2_000_000})
    assert requests.post(url, data=huge, headers=headers, timeout=30).status_code == 413
    broken = requests.post(url, data=b'{"model": ', headers=headers, timeout=30)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    too_long = requests.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 100_000}, headers=headers,
                             timeout=30)
    assert too_long.status_code == 400 and "max_tokens" in too_long.json()["error"]["message"]
    assert openai_client(gateway).completions.create(model=MODEL, prompt="still up", max_tokens=2).choices


SIZES = {"type": "object", "properties": {"size": {"enum": ["S", "M", "L"]},
                                        "count": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["size", "count"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_and_json_object_answer_valid_json(gateway, stream):
    import jsonschema

    client = openai_client(gateway)
    messages = [{"role": "user", "content": "Pick a size and a count."}]

    def answer(**fields) -> str:
        if not stream:
            return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32,
                                                  **fields).choices[0].message.content
        return "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=32, stream=True, **fields))

    schema_format = {"type": "json_schema", "json_schema": {"name": "order", "schema": SIZES, "strict": True}}
    jsonschema.validate(json.loads(answer(response_format=schema_format)), SIZES)
    assert isinstance(json.loads(answer(response_format={"type": "json_object"})), dict)
    assert answer(extra_body={"guided_choice": ["yes", "no"]}) in ("yes", "no")


def test_a_schema_that_cannot_compile_is_a_400_naming_response_format(gateway):
    broken = {"type": "json_schema", "json_schema": {"name": "broken", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client(gateway).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                       max_tokens=8, response_format=broken)
    assert refused.value.param == "response_format" and "guided_json" in refused.value.message
    assert openai_client(gateway).completions.create(model=MODEL, prompt="still up", max_tokens=2).choices


def _prefix_hits(triton) -> float:
    """Prompt tokens the engine served from reused KV, once the requests before are flushed to /metrics."""
    time.sleep(2 * FLUSH_INTERVAL_SECONDS)
    text = requests.get(triton.endpoints.metrics_url, timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("tritonllm_prefix_cache_hit_tokens_total"))


def test_the_tenant_comes_from_the_key(gateway, triton):
    """The engine reuses a cached prompt prefix only within a tenant: a second tenant sending the same prompt gets
    no reused tokens, the first tenant again does (with another max_tokens, so the semantic cache cannot answer)."""
    prompt = PROMPT + " The tenant test."
    ask = lambda key, max_tokens=2: openai_client(gateway, key).completions.create(model=MODEL, prompt=prompt,
                                                                                   max_tokens=max_tokens)
    ask("alpha")
    before = _prefix_hits(triton)
    ask("beta")
    assert _prefix_hits(triton) == before
    ask("alpha", max_tokens=3)
    assert _prefix_hits(triton) > before


def _gateway_metric(gateway, name: str) -> float:
    text = requests.get(gateway.url + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_client_that_disconnects_mid_stream_stops_the_engine(gateway, triton):
    """The gateway's default model is `llm`: the disconnect cancels its Triton stream, and the engine itself ends
    the generation as cancelled long before its max_tokens."""
    disconnects = _gateway_metric(gateway, "tritonllm_gateway_client_disconnects_total")
    cancelled = engine_metric(triton, "tritonllm_request_finished_total", reason="cancelled")
    generated = engine_metric(triton, "tritonllm_generation_tokens_total")
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT + " Disconnect."}], "max_tokens": 400,
            "stream": True}
    with requests.post(gateway.url + "/v1/chat/completions", json=body, stream=True, timeout=30,
                       headers={"Authorization": "Bearer alpha"}) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith(b"data:"))
    deadline = time.monotonic() + 60
    while (_gateway_metric(gateway, "tritonllm_gateway_active_streams")
           or engine_metric(triton, "tritonllm_request_finished_total", reason="cancelled") == cancelled) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gateway_metric(gateway, "tritonllm_gateway_active_streams") == 0
    assert _gateway_metric(gateway, "tritonllm_gateway_client_disconnects_total") == disconnects + 1
    assert engine_metric(triton, "tritonllm_request_finished_total", reason="cancelled") == cancelled + 1
    assert engine_metric(triton, "tritonllm_generation_tokens_total") - generated < 200


def test_a_dead_replica_is_retried_around_and_left_out_of_rotation(triton, tiny_repository):
    dead = f"127.0.0.1:{free_port()}"  # a replica that was killed: nothing listens there
    settings = GatewaySettings(triton_grpc_urls=(dead, triton.endpoints.grpc_url), served_model_name=MODEL, port=0,
                               health_interval_seconds=0.2)
    with GatewayServer(settings, repository_tokenizer_dir(tiny_repository)) as server:  # no keys: open access
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        answers = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
                   .choices[0].text for _ in range(4)]
        assert answers == [native(triton, PROMPT, 3, chat=False)] * 4
        text = requests.get(server.url + "/metrics", timeout=30).text
        assert f'tritonllm_gateway_replica_ready{{replica="{dead}"}} 0.0' in text
        assert requests.get(server.url + "/health", timeout=30).json() == {
            "status": "ok", "replicas_ready": 1, "replicas": 2}


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} was not healthy within {timeout} s")


def _stopped_by_sigterm(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=90)


def test_serve_with_a_gateway_port_serves_both_and_both_die_with_the_command(tiny_repository, tmp_path):
    gateway_port, grpc_port = free_port(), free_port()
    process = subprocess.Popen(
        [str(TRITONLLM), "serve", "--repository", str(tiny_repository), "--http-port", str(free_port()),
         "--grpc-port", str(grpc_port), "--metrics-port", str(free_port()), "--gateway-port", str(gateway_port),
         "--api-keys", str(_keys_file(tmp_path))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{gateway_port}"
    try:
        _wait_healthy(url, process)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="alpha", max_retries=0)
        # served under the name the repository was built with
        assert [model.id for model in client.models.list()] == [MODEL]
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
    finally:
        assert _stopped_by_sigterm(process) == 0
    for port in (gateway_port, grpc_port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_the_gateway_command_alone_fronts_running_triton_and_stops_on_sigterm(triton, tiny_repository, tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [str(TRITONLLM), "gateway", "--triton", triton.endpoints.grpc_url, "--repository", str(tiny_repository),
         "--port", str(port), "--served-model-name", "renamed"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [model.id for model in client.models.list()] == ["renamed"]  # the flag wins over the built name
        reply = client.completions.create(model="renamed", prompt=PROMPT, max_tokens=3, temperature=0)
        assert reply.choices[0].text == native(triton, PROMPT, 3, chat=False)
    finally:
        assert _stopped_by_sigterm(process) == 0


# -- bounded, seeded fuzzing of both entry points (issue 11: bad input never kills, hangs or 500s) ----------------------

FUZZ_SEED = 20261201
FUZZ_VALUES = ("null", "0", "-1", "1", "2", "0.5", "-0.0", "1e999", "-1e999", "4294967297", "18446744073709551621",
               '""', '"x"', '"\\ud800"', '"8"', "true", "false", "[]", "{}", "[1, 2]", '["a", 3]', '{"a": 1}',
               "[" * 40 + "]" * 40, '"' + "y" * 5000 + '"')
FUZZ_FIELDS = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
               "stop", "n", "stream", "response_format", "stream_options", "guided_regex", "guided_choice",
               "ignore_eos", "min_tokens", "logprobs", "user", "tools", "unknown_field")


def _fuzzed_body(random, endpoint: str) -> bytes:
    """A JSON (or almost-JSON) body: a valid request with some fields replaced by values of any type, or a
    non-object, or cut short."""
    fields = {"model": json.dumps(MODEL), "max_tokens": "2"}
    fields["messages" if endpoint == "chat" else "prompt"] = (
        json.dumps([{"role": "user", "content": "fuzz"}]) if endpoint == "chat" else '"fuzz"')
    for name in random.sample(FUZZ_FIELDS, random.randint(0, 3)):
        fields[name] = random.choice(FUZZ_VALUES)
    body = "{" + ", ".join(f'"{name}": {value}' for name, value in fields.items()) + "}"
    shape = random.random()
    if shape < 0.05:
        body = random.choice(FUZZ_VALUES)  # not an object
    elif shape < 0.1:
        body = body[:random.randint(0, len(body))]  # cut short
    return body.encode("utf-8", "surrogatepass")


def test_fuzzed_openai_bodies_get_4xx_or_an_answer_and_never_harm_the_server(gateway):
    import random as random_module

    random = random_module.Random(FUZZ_SEED)
    headers = {"Authorization": "Bearer alpha", "Content-Type": "application/json"}
    statuses: dict[int, int] = {}
    for _ in range(160):
        endpoint = random.choice(("chat", "completion"))
        url = gateway.url + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")
        body = _fuzzed_body(random, endpoint)
        reply = requests.post(url, data=body, headers=headers, timeout=60)
        statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
        assert reply.status_code in (200, 400, 404, 413), (body[:300], reply.status_code, reply.text[:300])
        if reply.status_code != 200:
            error = reply.json()["error"]
            assert error["message"] and error["type"], body[:300]
        else:
            assert reply.text  # a whole answer, or a stream that ended
    assert statuses.get(400, 0) > 60 and statuses.get(200, 0) > 20, statuses  # the fuzzer reached both sides
    assert openai_client(gateway).completions.create(model=MODEL, prompt="still up", max_tokens=2).choices


FUZZ_NUMBERS = {"INT32": (-2**31, -1, 0, 1, 3, 255, 2**31 - 1), "UINT64": (0, 1, 2**63, 2**64 - 1),
                "FP32": (float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 0.5, 1.0, 3.4e38)}
WIRE_DTYPES = {"INT32": "int32", "UINT64": "uint64", "FP32": "float32"}


def test_fuzzed_grpc_inputs_are_answered_or_refused_by_name_and_never_hang(triton):
    """Every numeric input of the front model and the ensemble, set to extremes and NaN/inf, and sent with a wrong
    data type now and then: each request ends (an answer, or an error that names an input) and the server stays
    ready."""
    import random as random_module

    import numpy as np
    import tritonclient.grpc as grpcclient

    from tritonllm.client.api import GenerationError
    from tritonllm.contract import FRONT_INPUTS

    random = random_module.Random(FUZZ_SEED)
    numeric = [tensor for tensor in FRONT_INPUTS if tensor.wire_type in FUZZ_NUMBERS]
    kinds: dict[str, int] = {}
    for index in range(80):
        model = random.choice(("llm", "ensemble"))
        client = LLMClient(triton.endpoints.grpc_url, "grpc", model=model, timeout=60)
        chosen = random.sample(numeric, random.randint(1, 3))
        arrays = {"text_input": ("BYTES", np.array([[b"fuzz"]], dtype=object)),
                  "max_tokens": ("INT32", np.array([[2]], dtype=np.int32))}
        if model == "llm":
            arrays["cache"] = ("BYTES", np.array([[b"bypass"]], dtype=object))
        for tensor in chosen:
            wire = tensor.wire_type if random.random() > 0.1 else random.choice(("INT32", "FP32", "UINT64"))
            value = random.choice(FUZZ_NUMBERS[wire])
            arrays[tensor.name] = (wire, np.array([[value]], dtype=WIRE_DTYPES[wire]))
        try:
            list(client._grpc_events(arrays))
            kinds["answered"] = kinds.get("answered", 0) + 1
        except GenerationError as error:
            assert error.status != "DEADLINE_EXCEEDED", (model, arrays)
            assert any(name in error.message for name in arrays), (model, arrays, error.message)
            kinds["refused"] = kinds.get("refused", 0) + 1
    assert kinds.get("refused", 0) > 20 and kinds.get("answered", 0) > 5, kinds
    health = grpcclient.InferenceServerClient(triton.endpoints.grpc_url)
    assert health.is_server_ready() and all(health.is_model_ready(model) for model in ("llm", "ensemble"))
    assert native(triton, "still up", 2, chat=False) is not None
