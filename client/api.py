"""Talk to a tritonllm deployment: `generate` (whole answer) and `stream` (pieces as they come), over gRPC or HTTP.

gRPC uses tritonclient's bidirectional stream (decoupled models answer only there); HTTP uses Triton's
`/v2/models/<model>/generate_stream` (server-sent events), since `/generate` cannot serve a decoupled model.
"""

from __future__ import annotations

import json
import queue
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Iterator, Literal

import numpy as np
import requests

from tritonllm.contract import FRONT_INPUTS, INT32_MAX, UINT64_MAX

Protocol = Literal["grpc", "http"]


class GenerationError(RuntimeError):
    """The server refused or failed a request. `status` is the gRPC status name or the HTTP status code."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass
class GenerationParams:
    """Optional inputs of the ensemble contract; None means "not sent" (the server default applies)."""

    max_tokens: int = 64
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    min_tokens: int | None = None
    end_id: int | None = None
    pad_id: int | None = None
    stop_words: list[str] | None = None
    bad_words: list[str] | None = None
    exclude_input_in_output: bool | None = True
    apply_chat_template: bool | None = None
    tenant: str | None = None  # scopes prefix reuse (engine) and cache entries (llm)
    # structured output, at most one: JSON schema, regex, Lark/GBNF grammar, JSON list of strings
    guided_json: str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: str | None = None
    speculative: str | None = None  # off | prompt_lookup | draft_model (ONNX Runtime engine); None: the build's
    cache: str | None = None  # front model only: use | bypass | refresh


# name -> (wire datatype, numpy dtype), from the front model's contract (a superset of the ensemble's)
_INPUT_TYPES: dict[str, tuple[str, np.dtype]] = {tensor.name: (tensor.wire_type, np.dtype(tensor.numpy_dtype))
                                                 for tensor in FRONT_INPUTS}


@dataclass
class StreamEvent:
    """One response of a stream: a text piece plus the front model's cache outputs when present."""

    text: str
    cache_hit: bool | None = None
    cache_similarity: float | None = None
    received_at: float = field(default_factory=time.perf_counter)


# Integers each wire type holds: a larger one would wrap (numpy's cast here, Triton's JSON conversion over HTTP) into
# another, possibly allowed, value; the client refuses it instead. Which values are allowed is the server's to say.
_WIRE_LIMITS = {"INT32": (-INT32_MAX - 1, INT32_MAX), "UINT64": (0, UINT64_MAX)}


def _sent_params(params: GenerationParams) -> dict[str, object]:
    """The params that are sent (not None), name -> value; ValueError for an integer its input's wire type would
    wrap. Read field by field: `asdict` would deep-copy every value."""
    sent = {}
    for param in fields(params):
        value = getattr(params, param.name)
        if value is None:
            continue
        limits = _WIRE_LIMITS.get(_INPUT_TYPES[param.name][0])
        if limits is not None and isinstance(value, int) and not limits[0] <= value <= limits[1]:
            raise ValueError(f"{param.name} = {value} does not fit the input's {_INPUT_TYPES[param.name][0]} "
                             f"({limits[0]}..{limits[1]})")
        sent[param.name] = value
    return sent


def request_values(prompt: str | bytes, params: GenerationParams, stream: bool) -> dict[str, tuple[str, list]]:
    """Input name -> (wire datatype, the values of its one row, text as UTF-8 bytes) for the ensemble contract;
    ValueError for an integer its input's data type cannot hold."""
    values = {"text_input": [prompt.encode() if isinstance(prompt, str) else prompt], "stream": [stream]}
    for name, value in _sent_params(params).items():
        values[name] = [word.encode() if isinstance(word, str) else word
                        for word in (value if isinstance(value, list) else [value])]
    return {name: (_INPUT_TYPES[name][0], row) for name, row in values.items()}


def request_arrays(prompt: str | bytes, params: GenerationParams, stream: bool) -> dict[str, tuple[str, np.ndarray]]:
    """`request_values` as arrays with the batch dim of 1: input name -> (datatype, array)."""
    return {name: (datatype, np.array([row], dtype=_INPUT_TYPES[name][1]))
            for name, (datatype, row) in request_values(prompt, params, stream).items()}


# wire datatype -> the field of Triton's InferTensorContents that carries its values
_CONTENTS_FIELDS = {"BYTES": "bytes_contents", "BOOL": "bool_contents", "INT32": "int_contents",
                    "UINT64": "uint64_contents", "FP32": "fp32_contents"}


def infer_request(model: str, prompt: str | bytes, params: GenerationParams, stream: bool):
    """The gRPC `ModelInferRequest` of one stream request, built straight from `request_values` (typed contents:
    no numpy arrays, no byte serialization), asking for the empty final response that marks a stream's end."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model, id=uuid.uuid4().hex)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    for name, (datatype, row) in request_values(prompt, params, stream).items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=(1, len(row)))
        getattr(tensor.contents, _CONTENTS_FIELDS[datatype]).extend(row)
    return request


class LLMClient:
    """Client of one model (the `ensemble`, or the front `llm` model with the semantic cache)."""

    def __init__(self, url: str, protocol: Protocol = "grpc", model: str = "ensemble", timeout: float = 300.0):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, not {protocol!r}")
        self.url, self.protocol, self.model, self.timeout = url, protocol, model, timeout

    def reachable(self, timeout: float = 3.0) -> bool:
        """Whether a TCP connection to the server's host:port opens (tells "cannot reach" from other failures)."""
        host, _, port = self.url.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):
            return False

    def generate(self, prompt: str | bytes, params: GenerationParams | None = None) -> str:
        """The whole answer, asked for with `stream=false` (one response from the engine)."""
        return "".join(event.text for event in self.events(prompt, params or GenerationParams(), stream=False))

    def stream(self, prompt: str | bytes, params: GenerationParams | None = None) -> Iterator[str]:
        for event in self.events(prompt, params or GenerationParams(), stream=True):
            yield event.text

    def events(self, prompt: str | bytes, params: GenerationParams, stream: bool = True) -> Iterator[StreamEvent]:
        """Responses as they come; closing the generator early cancels the request on the server."""
        if self.protocol == "grpc":
            yield from self._grpc_events(request_arrays(prompt, params, stream))
        else:
            yield from self._http_events(_http_body(prompt, params, stream))

    # -- gRPC ------------------------------------------------------------------------------------------------
    def _grpc_events(self, arrays: dict[str, tuple[str, np.ndarray]]) -> Iterator[StreamEvent]:
        import tritonclient.grpc as grpcclient

        responses: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=lambda result, error: responses.put((result, error)),
                            stream_timeout=self.timeout)
        finished = False
        try:
            client.async_stream_infer(self.model, infer_inputs(arrays), request_id=uuid.uuid4().hex,
                                      enable_empty_final_response=True)
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise GenerationError("DEADLINE_EXCEEDED", f"no response within {self.timeout:.0f} s") from None
                if error is not None:
                    finished = True
                    raise GenerationError(_grpc_status(error), error.message())
                event, finished = _read_response(result.get_response())
                if event is not None:
                    yield event
                if finished:
                    return
        finally:
            # Leaving early (consumer broke out of the loop) cancels the request on the server.
            client.stop_stream(cancel_requests=not finished)
            client.close()

    # -- HTTP ------------------------------------------------------------------------------------------------
    def _http_events(self, body: dict[str, object]) -> Iterator[StreamEvent]:
        url = f"http://{self.url}/v2/models/{self.model}/generate_stream"
        with requests.post(url, json=body, stream=True, timeout=self.timeout) as reply:
            if reply.status_code != 200:
                raise GenerationError(str(reply.status_code), _http_error_message(reply.text))
            for line in reply.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                payload = json.loads(line[len(b"data:"):])
                if "error" in payload:
                    raise GenerationError("400", payload["error"])
                if "text_output" in payload:
                    yield StreamEvent(payload["text_output"], payload.get("cache_hit"),
                                      payload.get("cache_similarity"))


def infer_inputs(arrays: dict[str, tuple[str, np.ndarray]]) -> list:
    """tritonclient gRPC inputs for `request_arrays`' output (the blocking client; `AsyncStream` sends protobuf)."""
    from tritonclient.grpc import InferInput

    inputs = []
    for name, (datatype, array) in arrays.items():
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _read_response(response) -> tuple[StreamEvent | None, bool]:
    """(the text piece of one stream response, a `ModelInferResponse`, or None for an empty final response; whether
    it is the last). Read from the protobuf itself: Triton sends every output in `raw_output_contents`."""
    from tritonclient.utils import deserialize_bytes_tensor

    last = response.parameters["triton_final_response"].bool_param
    raw = {output.name: contents for output, contents in zip(response.outputs, response.raw_output_contents)}
    if "text_output" not in raw:
        return None, last
    hit, similarity = raw.get("cache_hit"), raw.get("cache_similarity")
    return StreamEvent(b"".join(deserialize_bytes_tensor(raw["text_output"]).tolist()).decode("utf-8"),
                       None if hit is None else hit[0] != 0,
                       None if similarity is None else struct.unpack_from("<f", similarity)[0]), last


class StreamCancelled(Exception):
    """The stream was cancelled by `AsyncStream.cancel()` while it was being read."""


class AsyncStream:
    """One streamed request from an asyncio event loop, on a `grpc.aio` channel that many requests share (one
    HTTP/2 channel per server, no thread per request); `stub` is tritonclient's generated
    `service_pb2_grpc.GRPCInferenceServiceStub` on that channel. Iterate it for its events; `cancel()` from another
    task cancels the request on the server, and a read waiting then raises `StreamCancelled`.

    The call is driven by its own `write`/`read`/`done_writing` rather than a request iterator, which grpc.aio
    would consume in a task of its own per request."""

    def __init__(self, stub, model: str, prompt: str | bytes, params: GenerationParams, stream: bool,
                 timeout: float) -> None:
        self._unsent = infer_request(model, prompt, params, stream)
        self._call = stub.ModelStreamInfer(timeout=timeout)
        self.finished = self.cancelled = False

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> StreamEvent:
        import asyncio

        from grpc import RpcError
        from grpc.aio import EOF

        while not self.finished:
            try:
                if self._unsent is not None:
                    request, self._unsent = self._unsent, None
                    if not self._call.done():  # a call that has already failed says why on the read
                        await self._call.write(request)
                response = await self._call.read()
            except asyncio.CancelledError:
                # grpc.aio ends a read of a call cancelled here with CancelledError; only the task's own
                # cancellation is passed on as one
                if self.cancelled and not asyncio.current_task().cancelling():
                    raise StreamCancelled from None
                raise
            except RpcError as failure:  # not reached, timed out, or a status from the server
                if self.cancelled:
                    raise StreamCancelled from None
                self.finished = True
                raise GenerationError(failure.code().name, failure.details() or str(failure)) from None
            if response is EOF:
                self.finished = True
                raise GenerationError("UNKNOWN", "the stream ended without a final response")
            if response.error_message:
                await self._finish()
                # Errors inside a gRPC stream carry only a message, no status code.
                raise GenerationError("UNKNOWN", response.error_message)
            event, last = _read_response(response.infer_response)
            if last:
                await self._finish()
            if event is not None:
                return event
        if self.cancelled:
            raise StreamCancelled
        raise StopAsyncIteration

    async def _finish(self) -> None:
        """The answer has ended: the request side is closed (it stays open until then), so the server ends the
        call."""
        self.finished = True
        await self._call.done_writing()

    def cancel(self) -> None:
        """Cancels the request on the server (a no-op once the answer has ended)."""
        if not self.finished:
            self.cancelled = True
            self.finished = True
            self._call.cancel()


def _http_body(prompt: str | bytes, params: GenerationParams, stream: bool) -> dict[str, object]:
    """JSON body of Triton's generate extension: input name -> scalar, or a list for BYTES [-1] inputs."""
    if isinstance(prompt, bytes):
        prompt = prompt.decode("utf-8")  # JSON carries text only; send raw bytes over gRPC
    body: dict[str, object] = {"text_input": prompt, "stream": stream}
    body.update(_sent_params(params))
    return body


def _http_error_message(text: str) -> str:
    """Triton answers errors as JSON, or (generate_stream) as one server-sent event `data: {"error": ...}`."""
    body = text.strip().removeprefix("data:")
    try:
        return json.loads(body).get("error", text)
    except (ValueError, AttributeError):
        return text


def _grpc_status(error) -> str:
    # Errors inside a gRPC stream carry only a message (ModelStreamInferResponse.error_message), no status code.
    return (error.status() or "UNKNOWN").removeprefix("StatusCode.")
