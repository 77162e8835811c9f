"""Token byte table (byte-exact against `tokenizers` decode) and the preprocessing logic (prompt -> engine inputs)."""

from __future__ import annotations

import numpy as np
import pytest
from support import SENTENCEPIECE_DECODERS, TEXTS, random_id_sequences, sentencepiece_style_tokenizer
from tokenizers import Tokenizer, decoders

from tritonllm.python_backends.errors import InvalidArgument
from tritonllm.python_backends.preprocessing import PreparedRequest, Preprocessor, stack_prepared, to_word_list
from tritonllm.python_backends.token_bytes import TokenBytes, UnsupportedTokenizer, _byte_level_alphabet



def with_decoder(tokenizer: Tokenizer, decoder: decoders.Decoder) -> Tokenizer:
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.decoder = decoder
    return copy


def assert_matches_decode(tokenizer: Tokenizer, table: TokenBytes, ids: list[int], exact_even_if_invalid: bool):
    reference = tokenizer.decode(ids, skip_special_tokens=True)
    if "\ufffd" in reference and not exact_even_if_invalid:
        return  # `tokenizers` ByteFallback turns every byte of an invalid run into U+FFFD; Python keeps valid ones
    assert table.bytes_of(ids).decode("utf-8", "replace") == reference, ids


def test_byte_level_alphabet_is_gpt2s():
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    assert _byte_level_alphabet() == {char: byte for byte, char in bytes_to_unicode().items()}


@pytest.mark.parametrize("decoder", ["converted-gguf", "plain-byte-level"])
def test_byte_level_table_is_byte_exact(smollm2_tokenizer, decoder):
    # The GGUF conversion writes a Sequence(ByteFallback, Fuse, Replace, ByteLevel) decoder; SmolLM2's own
    # tokenizer.json has a plain ByteLevel one. Both must give the same bytes as `tokenizers`.
    tokenizer = (smollm2_tokenizer if decoder == "converted-gguf"
                 else with_decoder(smollm2_tokenizer, decoders.ByteLevel()))
    table = TokenBytes.from_tokenizer(tokenizer)
    assert len(table) == tokenizer.get_vocab_size() == 49152
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert table.bytes_of(ids) == text.encode("utf-8")
        assert_matches_decode(tokenizer, table, ids, exact_even_if_invalid=True)
    # Random ids cut characters anywhere; Python's "replace" and Rust's from_utf8_lossy substitute alike.
    for ids in random_id_sequences(len(table), count=3000, seed=1):
        assert_matches_decode(tokenizer, table, ids, exact_even_if_invalid=True)


def test_special_tokens_and_unknown_ids_have_no_bytes(smollm2_tokenizer):
    table = TokenBytes.from_tokenizer(smollm2_tokenizer)
    specials = [token_id for token_id, added in smollm2_tokenizer.get_added_tokens_decoder().items() if added.special]
    assert specials == list(range(17))  # <|endoftext|>, <|im_start|>, <|im_end|>, ...
    hello = smollm2_tokenizer.encode("Hello", add_special_tokens=False).ids
    assert table.bytes_of([1, *hello, 2, 0]) == b"Hello"
    assert table.bytes_of([*hello, 10**6, -1]) == b"Hello"  # `tokenizers` skips ids it does not know


@pytest.mark.parametrize("name", list(SENTENCEPIECE_DECODERS))
def test_sentencepiece_table_is_byte_exact(name):
    tokenizer = sentencepiece_style_tokenizer(SENTENCEPIECE_DECODERS[name])
    table = TokenBytes.from_tokenizer(tokenizer)
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert any(tokenizer.id_to_token(token_id).startswith("<0x") for token_id in ids) or text.isascii()
        assert_matches_decode(tokenizer, table, ids, exact_even_if_invalid=False)
        assert_matches_decode(tokenizer, table, [1, *ids, 2], exact_even_if_invalid=False)  # <s> ... </s>
    for ids in random_id_sequences(len(table), count=3000, seed=2):
        assert_matches_decode(tokenizer, table, ids, exact_even_if_invalid=False)
    # Only the first visible token loses its space, and only where the decoder strips one.
    hello = tokenizer.encode("Hello").ids
    strips = name in ("llama", "metaspace-first")
    assert table.bytes_of(hello) == (b"Hello" if strips else b" Hello")
    assert table.bytes_of(hello, opens_text=False) == b" Hello"
    assert table.bytes_of([1, *hello, *hello]) == (b"Hello Hello" if strips else b" Hello Hello")


def test_unsupported_decoders_are_refused(smollm2_tokenizer, tmp_path):
    with pytest.raises(UnsupportedTokenizer, match="WordPiece is not supported"):
        TokenBytes.from_tokenizer(with_decoder(smollm2_tokenizer, decoders.WordPiece()))
    with pytest.raises(UnsupportedTokenizer, match="Strip"):  # the end of a stream is unknown
        TokenBytes.from_tokenizer(with_decoder(smollm2_tokenizer, decoders.Sequence(
            [decoders.Fuse(), decoders.Strip(" ", 0, 1)])))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TokenBytes.from_tokenizer_dir(tmp_path)


def test_table_from_folder(smollm2_tokenizer_dir, smollm2_tokenizer):
    table = TokenBytes.from_tokenizer_dir(smollm2_tokenizer_dir)
    ids = smollm2_tokenizer.encode(TEXTS[5], add_special_tokens=False).ids
    assert table.bytes_of(ids) == TEXTS[5].encode()


# --- preprocessing ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def preprocessor(smollm2_tokenizer_dir) -> Preprocessor:
    return Preprocessor(smollm2_tokenizer_dir, max_context_length=64)


def test_word_list_layout():
    assert to_word_list([]).tolist() == [[0], [-1]]
    words = to_word_list([[5, 6], [7]])
    assert words.dtype == np.int32
    assert words.tolist() == [[5, 6, 7], [2, 3, -1]]


def test_prompt_is_tokenized_like_the_tokenizer(preprocessor):
    prepared = preprocessor.prepare("Tell me a joke 🤖".encode(), max_tokens=8)
    assert prepared.input_ids.dtype == np.int32
    assert prepared.input_ids.tolist() == preprocessor.tokenizer.encode("Tell me a joke 🤖")
    assert prepared.request_output_len == 8
    assert (prepared.end_id, prepared.pad_id) == (2, 2)  # <|im_end|> from generation_config.json
    assert prepared.stop_words.tolist() == prepared.bad_words.tolist() == [[0], [-1]]


def test_chat_template_wraps_one_user_turn(preprocessor):
    prepared = preprocessor.prepare(b"What is 2+2?", max_tokens=4, apply_chat_template=True)
    text = preprocessor.tokenizer.decode(prepared.input_ids.tolist())
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")


def test_stop_and_bad_words_are_encoded_alone(preprocessor):
    encode = preprocessor.tokenizer.encode
    hello, world = encode("Hello", add_special_tokens=False), encode(" world 中", add_special_tokens=False)
    prepared = preprocessor.prepare(b"Hi", max_tokens=4, stop_words=[b"Hello", " world 中".encode(), b""],
                                    bad_words=[b"Hello"], end_id=0, pad_id=5)
    assert prepared.stop_words.tolist() == [hello + world, [len(hello), len(hello + world)] + [-1] * (
        len(hello + world) - 2)]
    assert prepared.bad_words.tolist() == [hello, [len(hello)] + [-1] * (len(hello) - 1)]
    assert (prepared.end_id, prepared.pad_id) == (0, 5)


def test_max_tokens_defaults_to_the_rest_of_the_context(preprocessor):
    prepared = preprocessor.prepare(b"Hi there", max_tokens=None)
    assert len(prepared.input_ids) + prepared.request_output_len == 64


@pytest.mark.parametrize(("kwargs", "fragments"), [
    ({"query": b""}, ["input text_input must not be empty"]),
    ({"query": b"ab\xffcd"}, ["text_input must be UTF-8", "0xff at offset 2"]),
    ({"query": "é".encode()[:1] + b"x"}, ["offset 0"]),
    ({"query": b"word" * 200}, ["prompt is {long} tokens; the model context is 64 tokens", "at most 63"]),
    ({"max_tokens": 0}, ["max_tokens = 0 is not allowed; allowed: 1..{room} for this prompt"]),
    ({"max_tokens": 1000}, ["max_tokens = 1000 is not allowed; allowed: 1..{room}"]),
    ({"end_id": 49152}, ["end_id = 49152 is not allowed", "a token id in 0..49151"]),
    ({"pad_id": -1}, ["pad_id = -1 is not allowed", "a token id in 0..49151"]),
    ({"stop_words": [b"ok", b"\xc3"]}, ["stop_words must be UTF-8", "offset 0"]),
])
def test_bad_requests_name_the_input_and_the_allowed_range(preprocessor, kwargs, fragments):
    request = {"query": b"Hi there", "max_tokens": 4} | kwargs
    counts = {"long": len(preprocessor.tokenizer.encode("word" * 200)),
              "room": 64 - len(preprocessor.tokenizer.encode("Hi there"))}
    with pytest.raises(InvalidArgument) as raised:
        preprocessor.prepare(**request)
    for fragment in fragments:
        assert fragment.format(**counts) in str(raised.value)


def test_chat_template_required_when_asked(smollm2_tokenizer_dir):
    preprocessor = Preprocessor(smollm2_tokenizer_dir, max_context_length=64)
    preprocessor.tokenizer.chat_template = None
    with pytest.raises(InvalidArgument, match="no chat template"):
        preprocessor.prepare(b"Hi", max_tokens=1, apply_chat_template=True)


def test_batch_rows_are_padded(preprocessor):
    short = preprocessor.prepare(b"Hi", max_tokens=3, pad_id=7)
    long = preprocessor.prepare(b"A longer prompt here", max_tokens=5, stop_words=[b"stop", b" here"])
    outputs = stack_prepared([short, long])
    assert {name: array.dtype for name, array in outputs.items()} == dict.fromkeys(outputs, np.dtype(np.int32))
    width = len(long.input_ids)
    assert outputs["INPUT_ID"].shape == (2, width)
    assert outputs["INPUT_ID"][0].tolist() == short.input_ids.tolist() + [7] * (width - len(short.input_ids))
    assert outputs["REQUEST_INPUT_LEN"].tolist() == [[len(short.input_ids)], [width]]
    assert outputs["OUT_REQUEST_OUTPUT_LEN"].tolist() == [[3], [5]]
    assert outputs["OUT_PAD_ID"].tolist() == [[7], [2]]
    stop_width = long.stop_words.shape[1]
    assert outputs["STOP_WORDS_IDS"].shape == (2, 2, stop_width)
    assert outputs["STOP_WORDS_IDS"][0].tolist() == [[0] * stop_width, [-1] * stop_width]
    assert outputs["STOP_WORDS_IDS"][1].tolist() == long.stop_words.tolist()
    assert outputs["BAD_WORDS_IDS"].shape == (2, 2, 1)


def test_single_row_keeps_its_shapes(preprocessor):
    prepared: PreparedRequest = preprocessor.prepare(b"Hi", max_tokens=3)
    outputs = stack_prepared([prepared])
    assert outputs["INPUT_ID"].shape == (1, len(prepared.input_ids))
    assert outputs["STOP_WORDS_IDS"].tolist() == [[[0], [-1]]]
