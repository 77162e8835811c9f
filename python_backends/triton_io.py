"""Small helpers for the model.py adapters; they run inside the Triton Python backend stub.

API:
- `get_input(request, name, dtype, required=False) -> np.ndarray | None`: an input as numpy; None when absent (or
  InvalidArgument when `required`); InvalidArgument when its dtype is not `dtype`.
- `row_values(array, batch, name, default) -> list`: one Python scalar per batch row of a [B, 1] (or [B]) input,
  `default` for every row when the input is absent.
- `error_response(error) -> pb_utils.InferenceResponse`: the response carrying an InvalidArgument (INVALID_ARG) or
  Unavailable (UNAVAILABLE) error; `triton_error(error)` gives the bare `pb_utils.TritonError` (for decoupled senders).
- `model_setup(args) -> (parameters, version_dir)`: what `initialize` reads from its args.
- `respond_each(requests, outputs_of) -> list`: `execute` of a model that answers each request once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the stub, with its C++ classes attached

from tritonllm.contract import read_parameters
from tritonllm.python_backends.errors import InvalidArgument, Unavailable

# Triton's type names, so dtype errors read like the model configuration.
_TRITON_TYPE = {np.dtype(np.object_): "BYTES", np.dtype(np.bool_): "BOOL", np.dtype(np.int32): "INT32",
                np.dtype(np.int64): "INT64", np.dtype(np.uint64): "UINT64", np.dtype(np.float32): "FP32"}


def _type_name(dtype: np.dtype) -> str:
    return _TRITON_TYPE.get(np.dtype(dtype), str(dtype))


def get_input(request: Any, name: str, dtype: type, required: bool = False) -> np.ndarray | None:
    """Input `name` of `request` as numpy (BYTES inputs are object arrays of bytes)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise InvalidArgument(f"input {name} is required")
        return None
    array = tensor.as_numpy()
    if array.dtype != np.dtype(dtype):
        raise InvalidArgument(f"input {name} must be {_type_name(dtype)}, got {_type_name(array.dtype)}")
    return array


def row_values(array: np.ndarray | None, batch: int, name: str, default: Any) -> list:
    """Per-row scalar of a [B, 1] or [B] input; `default` per row when absent."""
    if array is None:
        return [default] * batch
    if array.shape[0] != batch or array.size != batch:
        raise InvalidArgument(f"input {name} must hold one value per batch row (shape [{batch}, 1]), "
                              f"got shape {list(array.shape)}")
    return array.reshape(batch).tolist()


def triton_error(error: InvalidArgument | Unavailable) -> Any:
    code = pb_utils.TritonError.UNAVAILABLE if isinstance(error, Unavailable) else pb_utils.TritonError.INVALID_ARG
    return pb_utils.TritonError(str(error), code)


def error_response(error: InvalidArgument | Unavailable) -> Any:
    return pb_utils.InferenceResponse(error=triton_error(error))


def model_setup(args: dict) -> tuple[dict[str, str], Path]:
    """The `parameters` of the model's configuration (strings) and its version folder, from `initialize`'s args."""
    parameters = read_parameters(json.loads(args["model_config"]))
    return parameters, Path(args["model_repository"]) / args["model_version"]


def respond_each(requests: list, outputs_of: Callable[[Any], dict[str, np.ndarray]]) -> list:
    """One response per request (not decoupled): the tensors `outputs_of(request)` returns by name, or the error
    response of the InvalidArgument it raised."""
    responses = []
    for request in requests:
        try:
            outputs = outputs_of(request)
        except InvalidArgument as error:
            responses.append(error_response(error))
            continue
        responses.append(pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, array) for name, array in outputs.items()]))
    return responses
