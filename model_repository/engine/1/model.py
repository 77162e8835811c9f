"""Triton adapter of the in-flight batching engine (decoupled); the logic is tritonllm.python_backends.engine.

`execute` only converts each request into a GenerationRequest and queues it; the engine's loop thread sends the
responses (one per new token when streaming, one in all otherwise) on the request's response sender. The engine's
metrics (tritonllm.python_backends.metrics) reach Triton's /metrics from their own flush thread.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonllm.contract import (DRAFT_ONNX_PARAMETER, GUIDED_INPUTS, EngineSettings, check_decoder_precision,
                                required_parameter, settings_from_parameters)
from tritonllm.python_backends.cancellation import CancellationBoard
from tritonllm.python_backends.engine import Engine, EngineOutput, GenerationRequest
from tritonllm.python_backends.errors import InvalidArgument, Unavailable
from tritonllm.python_backends.guided import GuideSpec
from tritonllm.python_backends.metrics import EngineMetrics
from tritonllm.python_backends.sampling import SamplingParams, words_from_list
from tritonllm.python_backends.stop_criteria import FinishReason
from tritonllm.python_backends.triton_io import get_input, model_setup, row_values, triton_error

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters, version_dir = model_setup(args)
        settings = settings_from_parameters(EngineSettings, parameters, kind="onnxruntime")
        self.metrics = EngineMetrics(pb_utils.MetricFamily, args["model_name"], args["model_version"],
                                     settings.kv_cache_max_tokens)
        onnx_path = version_dir / required_parameter(parameters, "onnx_path", "engine")
        check_decoder_precision(onnx_path, settings.precision)
        # end_id comes with each request (preprocessing fills in the model's eos); pad_id needs no default: padded
        # prefill positions are masked, so the pad token never changes the text.
        # Cancellations the front model posts (Triton does not pass a client's cancel into ensemble steps).
        self.board = CancellationBoard(args["model_name"])
        draft = parameters.get(DRAFT_ONNX_PARAMETER, "")
        self.engine = Engine(onnx_path, settings, token_timer=self.metrics.timings,
                             tokenizer_dir=version_dir / required_parameter(parameters, "tokenizer_path", "engine"),
                             draft_onnx_path=version_dir / draft if draft else None)
        self.metrics.start(self.engine.stats)

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                generation = self._generation_request(request)
                request_id = request.request_id()
                self.engine.submit(generation,
                                   lambda output, sender=sender, id=request_id: self._send(sender, output, id),
                                   lambda request=request, id=request_id: self._is_cancelled(request, id))
            except (InvalidArgument, Unavailable) as error:
                sender.send(pb_utils.InferenceResponse(error=triton_error(error)), flags=FINAL)
        return None

    def finalize(self) -> None:
        self.engine.shutdown()
        self.metrics.close()
        self.board.close()

    @staticmethod
    def _generation_request(request) -> GenerationRequest:
        input_ids = get_input(request, "input_ids", np.int32, required=True)
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise InvalidArgument(f"input_ids must have shape [1, N] (one sequence per request; send one request "
                                  f"per prompt), got {list(input_ids.shape)}")

        def scalar(name: str, dtype: type, default=None, required: bool = False):
            return row_values(get_input(request, name, dtype, required), 1, name, default)[0]

        length = scalar("input_lengths", np.int32, input_ids.shape[1])
        if not 0 < length <= input_ids.shape[1]:
            raise InvalidArgument(f"input_lengths = {length} is not allowed; allowed: 1..{input_ids.shape[1]} "
                                  f"(the number of input_ids)")

        def words(name: str):
            words_list = get_input(request, name, np.int32)  # [1, 2, N]: Triton checked the batch dim
            return words_from_list(None if words_list is None else words_list[0], name)

        sampling = SamplingParams.from_optional(
            temperature=scalar("temperature", np.float32), top_k=scalar("runtime_top_k", np.int32),
            top_p=scalar("runtime_top_p", np.float32), seed=scalar("random_seed", np.uint64),
            min_tokens=scalar("min_length", np.int32), end_id=scalar("end_id", np.int32),
            stop_words=words("stop_words_list"), bad_words=words("bad_words_list"))
        tenant = scalar("tenant", np.object_, b"")
        guide = GuideSpec.from_inputs({name: _utf8(scalar(name, np.object_), name) for name in GUIDED_INPUTS})
        speculative = _utf8(scalar("speculative", np.object_), "speculative")
        return GenerationRequest(
            input_ids=input_ids[0, :length].tolist(), tenant=tenant.decode("utf-8", "replace"),
            max_new_tokens=scalar("request_output_len", np.int32, required=True),
            sampling=sampling, streaming=bool(scalar("streaming", np.bool_, False)), guide=guide,
            speculative=speculative,
            exclude_input_in_output=bool(scalar("exclude_input_in_output", np.bool_, False)))

    def _is_cancelled(self, request, request_id: str) -> bool:
        """Polled on the engine's loop thread: the board first (a socket read), then Triton (a round trip)."""
        return bool(request_id) and request_id in self.board.cancelled_ids() or request.is_cancelled()

    def _send(self, sender, output: EngineOutput, request_id: str) -> None:
        """Called on the engine's loop thread for every output of the request."""
        if output.final and request_id in self.board.cancelled_ids():
            # Stopped through the board: the front is draining the stream; an error here would end the ensemble
            # request while its earlier pieces are still in postprocessing (Triton 2.51 then never completes it).
            self.board.forget(request_id)
            sender.send(flags=FINAL)
            return
        if output.finish_reason is FinishReason.CANCELLED:
            error = pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)
        elif output.finish_reason is FinishReason.ERROR:
            error = (triton_error(output.error) if isinstance(output.error, (InvalidArgument, Unavailable))
                     else pb_utils.TritonError(str(output.error), pb_utils.TritonError.INTERNAL))
        else:
            ids = np.asarray(output.token_ids, dtype=np.int32).reshape(1, 1, -1)
            tensors = [pb_utils.Tensor("output_ids", ids),
                       pb_utils.Tensor("sequence_length", np.array([[ids.shape[-1]]], dtype=np.int32)),
                       pb_utils.Tensor("stream_context_length", np.array([[output.context_length]], dtype=np.int32)),
                       pb_utils.Tensor("stream_final", np.array([[output.final]], dtype=np.bool_))]
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if output.final else 0)
            return
        sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)


def _utf8(value: bytes | None, name: str) -> str | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"input {name} must be UTF-8 text") from None
