"""Why a sequence stops after its latest token."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from tritonllm.python_backends.sampling import SamplingParams


class FinishReason(str, Enum):
    END_ID = "end_id"  # the end token was produced; it is not part of the output
    STOP_WORD = "stop_word"  # a stop word was completed; it stays in the output
    LENGTH = "length"  # max new tokens reached
    GRAMMAR = "grammar"  # a guided sequence's document is complete: nothing but the end could follow
    CANCELLED = "cancelled"  # the client cancelled the request
    ERROR = "error"  # the engine failed while running the sequence


def finish_reason(params: SamplingParams, generated: Sequence[int], max_new_tokens: int) -> FinishReason | None:
    """The reason to stop after the last id of `generated` (the ids produced so far, prompt excluded), or None."""
    if not generated:
        return None
    if params.end_id is not None and generated[-1] == params.end_id:
        return FinishReason.END_ID
    for word in params.stop_words:
        if len(generated) >= len(word) and tuple(generated[len(generated) - len(word):]) == word:
            return FinishReason.STOP_WORD
    if len(generated) >= max_new_tokens:
        return FinishReason.LENGTH
    return None
