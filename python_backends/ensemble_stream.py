"""The front model's call to the ensemble: one gRPC stream to tritonserver's own endpoint per cache miss.

Why not BLS: with tritonserver 2.51 (python_backend r24.10; the code is unchanged upstream) decoupled BLS streams
from several threads of one stub can deadlock it. `exec()` takes the stub's response-iterator map lock while holding
the GIL; the stub's response thread holds that lock while it waits for one iterator's mutex; and a thread woken in
that iterator's `__next__` holds the mutex while it waits for the GIL. Seen under gdb with 16 concurrent `llm`
streams: the stub stops answering and every later `llm` request hangs. gRPC streams share no lock with each other.

`stream_pieces` yields the `text_output` bytes of each response; an error response raises `EnsembleFailure`. Triton
does not pass a cancellation on to the engine step: leaving the loop early (the client of the front cancelled)
stops the generation through cancellation.py.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from tritonllm.contract import DEFAULT_ENSEMBLE_GRPC_URL, ENSEMBLE_URL_ENVIRONMENT

# How often a stream waiting for its next response looks whether its own client has cancelled (a request queued in
# the engine sends nothing for a while).
CANCEL_POLL_SECONDS = 0.05


class EnsembleFailure(Exception):
    """The ensemble answered with an error (or not at all): `status` is the gRPC status name when Triton gave one."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


def ensemble_url(configured: str | None) -> str:
    """Where the front reaches its own server: the launcher's environment (it knows the port it chose), else the
    model's `ensemble_grpc_url` parameter, else tritonserver's default gRPC port on the loopback interface."""
    return os.environ.get(ENSEMBLE_URL_ENVIRONMENT) or configured or DEFAULT_ENSEMBLE_GRPC_URL


def stream_pieces(url: str, model: str, arrays: Mapping[str, np.ndarray], request_id: str, timeout: float,
                  cancelled: Callable[[], bool], stop_in_engine: Callable[[], bool]) -> Iterator[bytes]:
    """The text pieces of `model`'s streamed answer to `arrays` (numpy inputs, batch dimension first); ends early
    as soon as `cancelled()` (polled every CANCEL_POLL_SECONDS while waiting) holds.

    A stream left early calls `stop_in_engine()`; when that reached the engine (True), the stream is drained to the
    engine's final response rather than cancelled: in tritonserver 2.51 an ensemble request cancelled by its client
    never completes (it stays in flight, holding shutdown for the whole exit timeout)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    finished = False
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=timeout)
        client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
        deadline = time.monotonic() + timeout
        while not finished:
            try:
                result, error = responses.get(timeout=CANCEL_POLL_SECONDS)
            except queue.Empty:
                if cancelled():
                    return
                if time.monotonic() > deadline:
                    raise EnsembleFailure(f"{model} sent no response within {timeout:.0f} s", "DEADLINE_EXCEEDED")
                continue
            deadline = time.monotonic() + timeout
            if error is not None:
                finished = True
                status = error.status()
                raise EnsembleFailure(error.message(), status.removeprefix("StatusCode.") if status else None)
            response = result.get_response()
            finished = response.parameters["triton_final_response"].bool_param
            text = result.as_numpy("text_output")
            if text is not None:  # the closing response of a stream carries no tensors
                yield b"".join(text.reshape(-1).tolist())
    except grpcclient.InferenceServerException as error:  # could not reach the server at all
        raise EnsembleFailure(f"cannot stream from {model} at {url} (set {ENSEMBLE_URL_ENVIRONMENT} or the "
                              f"ensemble_grpc_url parameter to the server's gRPC address): {error.message()}",
                              "UNAVAILABLE") from None
    finally:
        client.stop_stream(cancel_requests=not finished and not stop_in_engine())
        client.close()
