"""Stateless streaming detokenizer: pieces sent with ENGINE_CONTEXT_TOKENS ids of context concatenate to the full
decode, byte for byte, with U+FFFD only for bytes that are really invalid."""

from __future__ import annotations

import random

import pytest
from support import SENTENCEPIECE_DECODERS, TEXTS, random_id_sequences, sentencepiece_style_tokenizer

from tritonllm.python_backends.detokenizer import ENGINE_CONTEXT_TOKENS, decode_piece
from tritonllm.python_backends.errors import InvalidArgument
from tritonllm.python_backends.token_bytes import TokenBytes, _byte_level_alphabet

CHAR_OF_BYTE = {byte: char for char, byte in _byte_level_alphabet().items()}


@pytest.fixture(scope="module")
def smollm2_table(smollm2_tokenizer) -> TokenBytes:
    return TokenBytes.from_tokenizer(smollm2_tokenizer)


def stream(table: TokenBytes, ids: list[int], rng: random.Random, max_piece: int = 4) -> list[str]:
    """Split `ids` into random pieces and decode each as the engine sends it: min(ENGINE_CONTEXT_TOKENS, ids sent so
    far) ids of context in front of the new ids; the last piece is final."""
    pieces, sent = [], 0
    while sent < len(ids):
        new = rng.randint(1, max_piece)
        start = max(0, sent - ENGINE_CONTEXT_TOKENS)
        end = min(len(ids), sent + new)
        pieces.append(decode_piece(table, ids[start:end], context_length=sent - start, final=end == len(ids)))
        sent = end
    return pieces


def test_streamed_texts_are_byte_exact(smollm2_tokenizer, smollm2_table):
    rng = random.Random(3)
    for text in TEXTS:
        ids = smollm2_tokenizer.encode(text, add_special_tokens=False).ids
        for _ in range(50):
            pieces = stream(smollm2_table, ids, rng)
            assert "".join(pieces) == text
            assert not any("\ufffd" in piece for piece in pieces)


def test_multi_token_characters_are_held_back_until_complete(smollm2_tokenizer, smollm2_table):
    # The worst case: a 4-byte emoji sent as its 4 single-byte tokens, one per piece.
    vocab = smollm2_tokenizer.get_vocab()
    byte_ids = [vocab[CHAR_OF_BYTE[byte]] for byte in "👍".encode()]
    assert smollm2_table.bytes_of(byte_ids) == "👍".encode()
    prefix = smollm2_tokenizer.encode("ok ", add_special_tokens=False).ids
    # ... also with a special token (no bytes) inside the emoji: the 3 pending bytes then span 4 ids.
    for emoji_ids in (byte_ids, [*byte_ids[:2], 2, *byte_ids[2:]]):
        ids = prefix + emoji_ids
        pieces = [decode_piece(smollm2_table, ids[max(0, end - 1 - ENGINE_CONTEXT_TOKENS):end],
                               context_length=min(end - 1, ENGINE_CONTEXT_TOKENS), final=end == len(ids))
                  for end in range(1, len(ids) + 1)]
        assert pieces[len(prefix):] == [""] * (len(emoji_ids) - 1) + ["👍"]
        assert "".join(pieces) == "ok 👍"


def test_incomplete_tail_becomes_one_replacement_only_when_final(smollm2_table, smollm2_tokenizer):
    vocab = smollm2_tokenizer.get_vocab()
    first_two = [vocab[CHAR_OF_BYTE[byte]] for byte in "👍".encode()[:2]]
    ids = smollm2_tokenizer.encode("ok", add_special_tokens=False).ids + first_two
    assert decode_piece(smollm2_table, ids, context_length=0, final=False) == "ok"
    assert decode_piece(smollm2_table, ids, context_length=0, final=True) == "ok\ufffd"
    # A stray continuation byte is invalid wherever it is.
    assert decode_piece(smollm2_table, [first_two[1], *ids], context_length=0, final=False) == "\ufffdok"


def test_random_ids_stream_like_the_full_decode(smollm2_tokenizer, smollm2_table):
    # Random ids cut characters anywhere; the stream still equals one decode of all bytes (and `tokenizers`).
    rng = random.Random(4)
    for ids in random_id_sequences(len(smollm2_table), count=1500, seed=5, max_length=24):
        full = smollm2_table.bytes_of(ids).decode("utf-8", "replace")
        assert full == smollm2_tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(stream(smollm2_table, ids, rng)) == full


def test_special_tokens_inside_the_stream(smollm2_tokenizer, smollm2_table):
    # Special tokens have no bytes; with at most one in any window of ENGINE_CONTEXT_TOKENS ids, the other ids of
    # the window still carry the <= 3 bytes of an incomplete character.
    rng = random.Random(6)
    for text in TEXTS:
        ids = smollm2_tokenizer.encode(text, add_special_tokens=False).ids
        with_specials = []
        for index, token_id in enumerate(ids):
            if index % ENGINE_CONTEXT_TOKENS == 0:
                with_specials.append(rng.randrange(17))
            with_specials.append(token_id)
        for _ in range(20):
            assert "".join(stream(smollm2_table, with_specials, rng)) == text


@pytest.mark.parametrize("name", ["llama", "metaspace-first", "no-strip"])
def test_sentencepiece_leading_space_is_dropped_once(name):
    tokenizer = sentencepiece_style_tokenizer(SENTENCEPIECE_DECODERS[name])
    table = TokenBytes.from_tokenizer(tokenizer)
    rng = random.Random(7)
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        expected = tokenizer.decode(ids)
        for prefix in ([], [1], [1, 2]):  # special tokens first: the first visible token still opens the text
            for _ in range(20):
                assert "".join(stream(table, prefix + ids, rng)) == expected, (text, prefix)


def test_context_length_is_checked(smollm2_table):
    with pytest.raises(InvalidArgument, match="stream_context_length must be 0..2"):
        decode_piece(smollm2_table, [5, 6], context_length=3, final=True)
    with pytest.raises(InvalidArgument, match="stream_context_length"):
        decode_piece(smollm2_table, [5, 6], context_length=-1, final=True)
