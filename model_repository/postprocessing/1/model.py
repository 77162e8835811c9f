"""Triton adapter of the detokenizer step; the logic is tritonllm.python_backends.detokenizer.

Without STREAM_CONTEXT_LENGTH / STREAM_FINAL (a TensorRT-LLM engine sends neither) every response is decoded as a
whole sequence: context 0, final.
"""

import numpy as np

from tritonllm.python_backends.detokenizer import decode_piece
from tritonllm.python_backends.errors import InvalidArgument
from tritonllm.python_backends.token_bytes import TokenBytes
from tritonllm.python_backends.triton_io import get_input, model_setup, respond_each, row_values


class TritonPythonModel:
    def initialize(self, args):
        parameters, version_dir = model_setup(args)
        self.table = TokenBytes.from_tokenizer_dir(version_dir / parameters["tokenizer_path"])

    def execute(self, requests):
        return respond_each(requests, lambda request: {"OUTPUT": self._decode(request)})

    def _decode(self, request) -> np.ndarray:
        tokens = get_input(request, "TOKENS_BATCH", np.int32, required=True)
        lengths = get_input(request, "SEQUENCE_LENGTH", np.int32, required=True)
        if tokens.ndim != 3 or lengths.shape != tokens.shape[:2]:
            raise InvalidArgument(f"TOKENS_BATCH must be [batch, beams, tokens] and SEQUENCE_LENGTH [batch, beams]; "
                                  f"got {list(tokens.shape)} and {list(lengths.shape)}")
        batch, beams, width = tokens.shape
        contexts = row_values(get_input(request, "STREAM_CONTEXT_LENGTH", np.int32), batch, "STREAM_CONTEXT_LENGTH", 0)
        finals = row_values(get_input(request, "STREAM_FINAL", np.bool_), batch, "STREAM_FINAL", True)
        text = np.empty((batch, beams), dtype=np.object_)
        for row in range(batch):
            for beam in range(beams):
                length = int(lengths[row, beam])
                if not 0 <= length <= width:
                    raise InvalidArgument(f"SEQUENCE_LENGTH must be 0..{width} (the tokens in TOKENS_BATCH), "
                                          f"got {length}")
                ids = tokens[row, beam, :length].tolist()
                text[row, beam] = decode_piece(self.table, ids, contexts[row], finals[row]).encode("utf-8")
        return text
