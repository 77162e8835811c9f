"""Triton adapter of the tokenizer step; the logic is tritonllm.python_backends.preprocessing."""

import numpy as np

from tritonllm.python_backends.errors import InvalidArgument
from tritonllm.python_backends.preprocessing import Preprocessor, stack_prepared
from tritonllm.python_backends.triton_io import get_input, model_setup, respond_each, row_values


class TritonPythonModel:
    def initialize(self, args):
        parameters, version_dir = model_setup(args)
        self.preprocessor = Preprocessor(version_dir / parameters["tokenizer_path"],
                                         int(parameters["max_context_length"]))

    def execute(self, requests):
        return respond_each(requests, self._prepare)

    def _prepare(self, request) -> dict:
        query = get_input(request, "QUERY", np.object_)
        if query is None:
            raise InvalidArgument("text_input is required: send the prompt as BYTES [1] (UTF-8)")
        batch = query.shape[0]
        queries = row_values(query, batch, "QUERY", None)
        requested_tokens = get_input(request, "REQUEST_OUTPUT_LEN", np.int32)
        if requested_tokens is None:
            raise InvalidArgument("max_tokens is required: send the number of tokens to generate as INT32 [1]")
        max_tokens = row_values(requested_tokens, batch, "REQUEST_OUTPUT_LEN", None)
        end_ids = row_values(get_input(request, "END_ID", np.int32), batch, "END_ID", None)
        pad_ids = row_values(get_input(request, "PAD_ID", np.int32), batch, "PAD_ID", None)
        chat = row_values(get_input(request, "APPLY_CHAT_TEMPLATE", np.bool_), batch, "APPLY_CHAT_TEMPLATE", False)
        stop_words = get_input(request, "STOP_WORDS_DICT", np.object_)
        bad_words = get_input(request, "BAD_WORDS_DICT", np.object_)
        rows = [
            self.preprocessor.prepare(
                query=queries[row],
                max_tokens=max_tokens[row],
                stop_words=None if stop_words is None else stop_words[row].reshape(-1).tolist(),
                bad_words=None if bad_words is None else bad_words[row].reshape(-1).tolist(),
                end_id=end_ids[row],
                pad_id=pad_ids[row],
                apply_chat_template=chat[row],
            )
            for row in range(batch)
        ]
        return stack_prepared(rows)
