"""Prompt -> engine inputs: tokenization, chat template, stop/bad word lists, validation.

Mirrors NVIDIA tensorrtllm_backend's preprocessing model so the engine inputs are the same for the ONNX Runtime engine
and TensorRT-LLM: the prompt is encoded with the tokenizer's special tokens (`add_special_tokens=True`), and each stop
or bad word is encoded alone without special tokens. Stop and bad words are matched by the engine on token ids, so a
word stops generation only when the model emits that same tokenization (with byte-level BPE, "Paris" and " Paris" are
different tokens; send both if both matter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from tritonllm.contract import EMPTY_PROMPT, input_problem
from tritonllm.python_backends.chat import encode_user_turn
from tritonllm.python_backends.errors import InvalidArgument


@dataclass(frozen=True)
class PreparedRequest:
    """Engine inputs of one prompt (no batch dim)."""

    input_ids: np.ndarray  # int32 [prompt tokens]
    request_output_len: int
    stop_words: np.ndarray  # int32 [2, N]: TensorRT-LLM words list
    bad_words: np.ndarray  # int32 [2, N]
    end_id: int
    pad_id: int


def to_word_list(words_ids: list[list[int]]) -> np.ndarray:
    """TensorRT-LLM words list [2, max(1, N)]: row 0 all ids concatenated (padded with 0), row 1 end offsets (padded
    with -1). No words gives [[0], [-1]], like tensorrtllm_backend's `_to_word_list_format`."""
    flat = [token_id for ids in words_ids for token_id in ids]
    width = max(1, len(flat))
    words = np.zeros((2, width), dtype=np.int32)
    words[1] = -1
    words[0, : len(flat)] = flat
    ends = np.cumsum([len(ids) for ids in words_ids], dtype=np.int64)
    words[1, : len(ends)] = ends
    return words


def _decode_utf8(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument(
            f"{name} must be UTF-8 text; byte 0x{data[error.start]:02x} at offset {error.start} is not valid UTF-8"
        ) from None


class Preprocessor:
    """Tokenizes prompts for one model; `prepare` checks a request against the model context."""

    def __init__(self, tokenizer_dir: str | Path, max_context_length: int) -> None:
        if max_context_length < 2:
            raise ValueError(f"max_context_length must be >= 2 (prompt + one new token), got {max_context_length}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.max_context_length = max_context_length
        self.vocab_size = len(self.tokenizer)
        self.default_end_id = self._generation_eos(Path(tokenizer_dir))
        if self.default_end_id is None:
            self.default_end_id = self.tokenizer.eos_token_id
        if self.default_end_id is None:
            raise ValueError(f"{tokenizer_dir}: neither generation_config.json nor the tokenizer names an EOS token")
        pad = self.tokenizer.pad_token_id
        self.default_pad_id = self.default_end_id if pad is None else pad

    @staticmethod
    def _generation_eos(tokenizer_dir: Path) -> int | None:
        """EOS of generation_config.json (the first one when it lists several), the model's own end of a turn."""
        config = tokenizer_dir / "generation_config.json"
        if not config.is_file():
            return None
        eos = json.loads(config.read_text()).get("eos_token_id")
        return eos[0] if isinstance(eos, list) and eos else eos

    def prepare(
        self,
        query: bytes,
        max_tokens: int | None,
        stop_words: list[bytes] | None = None,
        bad_words: list[bytes] | None = None,
        end_id: int | None = None,
        pad_id: int | None = None,
        apply_chat_template: bool = False,
    ) -> PreparedRequest:
        """Validate and tokenize one request; `max_tokens=None` means the rest of the context."""
        if len(query) == 0:
            raise InvalidArgument(EMPTY_PROMPT)
        prompt_ids = self._encode_prompt(_decode_utf8(query, "text_input"), apply_chat_template)
        context = self.max_context_length
        if len(prompt_ids) >= context:
            raise InvalidArgument(
                f"text_input: prompt is {len(prompt_ids)} tokens; the model context is {context} tokens "
                f"(a prompt may have at most {context - 1} tokens)")
        room = context - len(prompt_ids)
        if max_tokens is None:
            max_tokens = room
        elif not 1 <= max_tokens <= room:
            raise InvalidArgument(
                f"max_tokens = {max_tokens} is not allowed; allowed: 1..{room} for this prompt ({len(prompt_ids)} "
                f"prompt tokens, context {context})")
        return PreparedRequest(
            input_ids=np.asarray(prompt_ids, dtype=np.int32),
            request_output_len=max_tokens,
            stop_words=to_word_list(self._encode_words(stop_words, "stop_words")),
            bad_words=to_word_list(self._encode_words(bad_words, "bad_words")),
            end_id=self._token_id(end_id, self.default_end_id, "end_id"),
            pad_id=self._token_id(pad_id, self.default_pad_id, "pad_id"),
        )

    def _encode_prompt(self, text: str, apply_chat_template: bool) -> list[int]:
        if not apply_chat_template:
            return self.tokenizer.encode(text, add_special_tokens=True)
        ids = encode_user_turn(self.tokenizer, text)
        if ids is None:
            raise InvalidArgument("apply_chat_template is true but this model's tokenizer has no chat template")
        return ids

    def _encode_words(self, words: list[bytes] | None, name: str) -> list[list[int]]:
        """Each word alone, without special tokens; empty words are skipped (they are padding of a batch)."""
        encoded = []
        for word in words or []:
            ids = self.tokenizer.encode(_decode_utf8(word, name), add_special_tokens=False)
            if ids:
                encoded.append(ids)
        return encoded

    def _token_id(self, value: int | None, default: int, name: str) -> int:
        if value is None:
            return default
        problem = input_problem(name, value, self.vocab_size)
        if problem:
            raise InvalidArgument(problem)
        return value


def stack_prepared(rows: list[PreparedRequest]) -> dict[str, np.ndarray]:
    """Output tensors of the preprocessing model for a batch of prepared rows, by tensor name; prompts are padded
    with each row's pad id and word lists with ids 0 / offsets -1."""
    longest = max(len(row.input_ids) for row in rows)
    input_ids = np.stack([
        np.pad(row.input_ids, (0, longest - len(row.input_ids)), constant_values=row.pad_id) for row in rows])

    def word_lists(name: str) -> np.ndarray:
        lists = [getattr(row, name) for row in rows]
        width = max(word_list.shape[1] for word_list in lists)
        padded = np.zeros((len(rows), 2, width), dtype=np.int32)
        padded[:, 1] = -1
        for index, word_list in enumerate(lists):
            padded[index, :, : word_list.shape[1]] = word_list
        return padded

    def column(values: list[int]) -> np.ndarray:
        return np.asarray(values, dtype=np.int32).reshape(-1, 1)

    return {
        "INPUT_ID": input_ids,
        "REQUEST_INPUT_LEN": column([len(row.input_ids) for row in rows]),
        "BAD_WORDS_IDS": word_lists("bad_words"),
        "STOP_WORDS_IDS": word_lists("stop_words"),
        "OUT_END_ID": column([row.end_id for row in rows]),
        "OUT_PAD_ID": column([row.pad_id for row in rows]),
        "OUT_REQUEST_OUTPUT_LEN": column([row.request_output_len for row in rows]),
    }
