"""Talk to a tritonllm deployment: `generate` (whole answer) and `stream` (pieces as they come), over gRPC or HTTP.

gRPC uses tritonclient's bidirectional stream (decoupled models answer only there); HTTP uses Triton's
`/v2/models/<model>/generate_stream` (server-sent events), since `/generate` cannot serve a decoupled model.
"""

from __future__ import annotations

import json
import queue
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
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


def _check_fits(params: GenerationParams) -> None:
    for name, value in asdict(params).items():
        limits = _WIRE_LIMITS.get(_INPUT_TYPES[name][0])
        if limits is not None and isinstance(value, int) and not limits[0] <= value <= limits[1]:
            raise ValueError(f"{name} = {value} does not fit the input's {_INPUT_TYPES[name][0]} "
                             f"({limits[0]}..{limits[1]})")


def request_arrays(prompt: str | bytes, params: GenerationParams, stream: bool) -> dict[str, tuple[str, np.ndarray]]:
    """Input name -> (datatype, array with the batch dim of 1) for the ensemble contract; ValueError for an integer
    its input's data type cannot hold."""
    _check_fits(params)
    text = prompt.encode() if isinstance(prompt, str) else prompt
    arrays = {name: (_INPUT_TYPES[name][0], np.array([[value]], dtype=_INPUT_TYPES[name][1]))
              for name, value in (("text_input", text), ("stream", stream))}
    for name, value in asdict(params).items():
        if value is None:
            continue
        datatype, dtype = _INPUT_TYPES[name]
        if isinstance(value, list):
            row = [w.encode() if isinstance(w, str) else w for w in value]
            arrays[name] = (datatype, np.array([row], dtype=dtype))
        else:
            arrays[name] = (datatype, np.array([[value.encode() if isinstance(value, str) else value]], dtype=dtype))
    return arrays


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
                event, finished = _read_response(result)
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
    """tritonclient gRPC inputs (the same class serves its asyncio client) for `request_arrays`' output."""
    from tritonclient.grpc import InferInput

    inputs = []
    for name, (datatype, array) in arrays.items():
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _read_response(result) -> tuple[StreamEvent | None, bool]:
    """(the text piece of one stream response, or None for an empty final response; whether it is the last)."""
    response = result.get_response()
    event = (_event_from_arrays(result.as_numpy) if any(output.name == "text_output" for output in response.outputs)
             else None)
    return event, response.parameters["triton_final_response"].bool_param


class StreamCancelled(Exception):
    """The stream was cancelled by `AsyncStream.cancel()` while it was being read."""


class AsyncStream:
    """One streamed request from an asyncio event loop, on a tritonclient `grpc.aio` client that many requests share
    (one HTTP/2 channel per server, no thread per request). Iterate it for its events; `cancel()` from another task
    cancels the request on the server, and a read waiting then raises `StreamCancelled`."""

    def __init__(self, client, model: str, prompt: str | bytes, params: GenerationParams, stream: bool,
                 timeout: float) -> None:
        import asyncio

        self._sent = asyncio.Event()  # the request side stays open until the answer ends (or is cancelled)
        request = {"model_name": model, "inputs": infer_inputs(request_arrays(prompt, params, stream)),
                   "request_id": uuid.uuid4().hex, "parameters": {"triton_enable_empty_final_response": True}}
        self._responses = client.stream_infer(self._requests(request), stream_timeout=timeout)
        self.finished = self.cancelled = False

    async def _requests(self, request: dict):
        yield request
        await self._sent.wait()

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> StreamEvent:
        import asyncio

        from grpc import RpcError

        while not self.finished:
            try:
                result, error = await self._responses.__anext__()
            except asyncio.CancelledError:
                # grpc.aio ends a read of a call cancelled here with CancelledError; only the task's own
                # cancellation is passed on as one
                if self.cancelled and not asyncio.current_task().cancelling():
                    raise StreamCancelled from None
                raise
            except RpcError as failure:  # not reached, timed out, or a status from the server
                if self.cancelled:
                    raise StreamCancelled from None
                self._finish()
                raise GenerationError(failure.code().name, failure.details() or str(failure)) from None
            except StopAsyncIteration:
                self._finish()
                raise GenerationError("UNKNOWN", "the stream ended without a final response") from None
            if error is not None:
                self._finish()
                raise GenerationError(_grpc_status(error), error.message())
            event, last = _read_response(result)
            if last:
                self._finish()
            if event is not None:
                return event
        if self.cancelled:
            raise StreamCancelled
        raise StopAsyncIteration

    def _finish(self) -> None:
        self.finished = True
        self._sent.set()

    def cancel(self) -> None:
        """Cancels the request on the server (a no-op once the answer has ended)."""
        if not self.finished:
            self.cancelled = True
            self._finish()
            self._responses.cancel()


def _event_from_arrays(as_numpy) -> StreamEvent:
    text = b"".join(as_numpy("text_output").reshape(-1).tolist()).decode("utf-8")
    hit, similarity = as_numpy("cache_hit"), as_numpy("cache_similarity")
    return StreamEvent(text, None if hit is None else bool(hit.reshape(-1)[0]),
                       None if similarity is None else float(similarity.reshape(-1)[0]))


def _http_body(prompt: str | bytes, params: GenerationParams, stream: bool) -> dict[str, object]:
    """JSON body of Triton's generate extension: input name -> scalar, or a list for BYTES [-1] inputs."""
    _check_fits(params)
    if isinstance(prompt, bytes):
        prompt = prompt.decode("utf-8")  # JSON carries text only; send raw bytes over gRPC
    body: dict[str, object] = {"text_input": prompt, "stream": stream}
    body.update({name: value for name, value in asdict(params).items() if value is not None})
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
