"""Bad input gets INVALID_ARG with a message naming the input and what is allowed; the server keeps serving.

Over a gRPC stream Triton sends errors as a message only (ModelStreamInferResponse has no status field), so the code
is checked where the protocol carries it: HTTP generate_stream answers INVALID_ARG as 400 (UNAVAILABLE would be 503,
INTERNAL 500), and the non-decoupled preprocessing model answers unary gRPC with INVALID_ARGUMENT.
"""

from __future__ import annotations

import queue

import numpy as np
import pytest
import requests

from tritonllm.client.api import GenerationError, GenerationParams, LLMClient, request_arrays

pytestmark = [pytest.mark.server, pytest.mark.model]

MODELS = ("ensemble", "llm")
VOCAB = 49152  # SmolLM2's vocabulary


def raw_grpc(server, arrays: dict[str, tuple[str, np.ndarray]], model: str = "ensemble") -> GenerationError | None:
    """Send hand-made tensors; return the error the server answered with (None if it answered normally)."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, (datatype, array) in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.endpoints.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                return GenerationError((error.status() or "UNKNOWN").removeprefix("StatusCode."), error.message())
            if result.get_response().parameters["triton_final_response"].bool_param:
                return None
    finally:
        client.stop_stream()
        client.close()


def assert_server_still_answers(server) -> None:
    text = LLMClient(server.endpoints.grpc_url).generate("Say hi.", GenerationParams(max_tokens=4))
    assert text


def expect_invalid(server, arrays, *fragments: str, http: bool = True, model: str = "ensemble") -> None:
    """gRPC stream: the message names the input; HTTP (when JSON can carry the request): status 400, same message."""
    error = raw_grpc(server, arrays, model)
    assert error is not None, "the server accepted a bad request"
    for fragment in fragments:
        assert fragment in error.message, (fragment, error.message)
    body = http_body(arrays) if http else None
    if body is not None:
        reply = requests.post(f"http://{server.endpoints.http_url}/v2/models/{model}/generate_stream", json=body)
        assert reply.status_code == 400, reply.text
        for fragment in fragments:
            assert fragment in reply.text, (fragment, reply.text)
    assert_server_still_answers(server)


def http_body(arrays: dict[str, tuple[str, np.ndarray]]) -> dict | None:
    """The same request as generate-extension JSON, or None when JSON cannot carry it (raw bytes)."""
    body = {}
    for name, (_, array) in arrays.items():
        values = array.reshape(-1).tolist()
        if any(isinstance(v, bytes) for v in values):
            try:
                values = [v.decode("utf-8") for v in values]
            except UnicodeDecodeError:
                return None
        body[name] = values[0] if len(values) == 1 and name not in ("stop_words", "bad_words") else values
    return body


def good(prompt="Hello", **params) -> dict[str, tuple[str, np.ndarray]]:
    return request_arrays(prompt, GenerationParams(**params), stream=True)


def test_missing_text_input(server):
    arrays = good()
    del arrays["text_input"]
    expect_invalid(server, arrays, "text_input")


@pytest.mark.parametrize("model", MODELS)
def test_empty_prompt(server, model):
    expect_invalid(server, good(""), "input text_input must not be empty", model=model)


def test_prompt_longer_than_context(server):
    expect_invalid(server, good("hello " * 5000), "text_input", "2048")


@pytest.mark.parametrize("max_tokens", [0, -3, 100_000])
def test_max_tokens_out_of_range(server, max_tokens):
    expect_invalid(server, good(max_tokens=max_tokens), "max_tokens")


@pytest.mark.parametrize("name,value", [("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1)])
def test_sampling_parameter_out_of_range(server, name, value):
    expect_invalid(server, good(**{name: value}), name)


def test_wrong_dtype(server):
    arrays = good()
    arrays["max_tokens"] = ("FP32", np.array([[16.0]], np.float32))
    # gRPC only: over HTTP JSON carries no dtype, and Triton answers a number it cannot parse with 500
    expect_invalid(server, arrays, "max_tokens", http=False)


def test_non_utf8_prompt(server):
    expect_invalid(server, good(b"caf\xe9 \xff\xfe"), "text_input", "UTF-8")


def test_preprocessing_answers_invalid_argument_code(server):
    """Unary gRPC to the tokenizer step carries the status code itself."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server.endpoints.grpc_url)
    tensors = []
    for name, array in {"QUERY": np.array([[b""]], np.object_), "REQUEST_OUTPUT_LEN": np.array([[8]], np.int32)}.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == np.object_ else "INT32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("preprocessing", tensors)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input text_input must not be empty" in raised.value.message()


def test_http_bad_input_is_reported(server):
    client = LLMClient(server.endpoints.http_url, protocol="http")
    with pytest.raises(GenerationError) as raised:
        client.generate("Hello", GenerationParams(max_tokens=4, temperature=-1.0))
    assert "temperature" in raised.value.message
    assert client.generate("Say hi.", GenerationParams(max_tokens=4))


def test_bad_request_does_not_harm_concurrent_good_ones(server):
    from concurrent.futures import ThreadPoolExecutor

    client = LLMClient(server.endpoints.grpc_url)
    with ThreadPoolExecutor(4) as pool:
        goods = [pool.submit(client.generate, f"Name a color, number {i}.", GenerationParams(max_tokens=8))
                 for i in range(3)]
        bad = pool.submit(raw_grpc, server, good(top_k=-5))
        assert "top_k" in bad.result().message
        assert all(f.result() for f in goods)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name,value", [("pad_id", VOCAB), ("end_id", VOCAB), ("end_id", -1), ("top_k", VOCAB + 1),
                                        ("min_tokens", -1)])
def test_token_ids_and_counts_outside_the_vocabulary_or_range(server, model, name, value):
    expect_invalid(server, good(**{name: value}), f"{name} = {value} is not allowed", model=model)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("params", [{"pad_id": VOCAB}, {"end_id": VOCAB}, {"top_k": -1}, {"top_p": 1.5},
                                    {"max_tokens": 0}])
def test_llm_refuses_what_the_ensemble_refuses_even_when_the_answer_is_cached(server, protocol, params):
    """A cache hit never reaches the ensemble: the front itself must refuse, or not serve the entry."""
    client = LLMClient(server.endpoints.grpc_url if protocol == "grpc" else server.endpoints.http_url, protocol,
                       model="llm")
    prompt = "Name one fruit, in a single word."
    for _ in range(2):  # the second is answered from the cache
        events = list(client.events(prompt, GenerationParams(max_tokens=4), stream=False))
    assert events[-1].cache_hit
    with pytest.raises(GenerationError) as raised:
        client.generate(prompt, GenerationParams(**{"max_tokens": 4, **params}))
    assert f"{next(iter(params))} = " in raised.value.message
    if protocol == "http":
        assert raised.value.status == "400"


def test_llm_does_not_serve_an_empty_prompt_the_answer_of_a_blank_one(server):
    client = LLMClient(server.endpoints.grpc_url, model="llm")
    client.generate(" ", GenerationParams(max_tokens=2))
    with pytest.raises(GenerationError, match="input text_input must not be empty"):
        client.generate("", GenerationParams(max_tokens=2))


# Triton 2.51's HTTP front drops the high bits of a JSON integer sent for an INT32 input. A value that lands out of
# range is refused; one that lands in range (2**32 + 1 -> 1) cannot be told from a real 1 inside the server: the
# clients in front of Triton (the OpenAI gateway, LLMClient) refuse it before sending (tritonllm/contract.py).
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name,value,arrives", [("max_tokens", 2**32, 0), ("top_k", 2**31, -2**31),
                                                ("min_tokens", 2**32 - 1, -1), ("end_id", 2**31 + 5, -2**31 + 5)])
def test_http_integers_that_wrap_out_of_range_are_refused(server, model, name, value, arrives):
    body = {"text_input": "Hello", "max_tokens": 4, name: value}
    reply = requests.post(f"http://{server.endpoints.http_url}/v2/models/{model}/generate_stream", json=body)
    assert reply.status_code == 400, reply.text
    assert f"{name} = {arrives} is not allowed" in reply.text
    assert_server_still_answers(server)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("params", [{"max_tokens": 2**32 + 4}, {"top_k": 2**32 + 1}, {"seed": -1}, {"seed": 2**64}])
def test_the_client_refuses_integers_its_wire_type_would_wrap(server, protocol, params):
    client = LLMClient(server.endpoints.grpc_url if protocol == "grpc" else server.endpoints.http_url, protocol)
    with pytest.raises(ValueError, match=f"{next(iter(params))} = .* does not fit"):
        client.generate("Hello", GenerationParams(**{"max_tokens": 4, **params}))
