"""Stateless, byte-exact detokenization of streamed token pieces.

An ensemble step after a decoupled engine sees only the tensors of one response, so the postprocessing model keeps no
state between the pieces of a stream. Instead, the engine repeats a few already-sent ids in front of each new piece
(`stream_context_length`), and the piece's text is what a UTF-8 incremental decoder emits for the new bytes after it
has been fed the context bytes. Concatenating the pieces of a sequence then gives exactly the text of decoding all its
ids at once: a character whose bytes span two pieces comes out whole with the second piece, and U+FFFD appears only
for bytes that are invalid, or incomplete at the end of the final piece.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from tritonllm.python_backends.errors import InvalidArgument
from tritonllm.python_backends.token_bytes import TokenBytes

# Ids of already-sent context the engine repeats in front of each streamed piece: min(ENGINE_CONTEXT_TOKENS, ids sent
# so far). The decoder state after the context is the incomplete tail of the bytes so far, at most 3 bytes (a UTF-8
# character has at most 4); every non-special token has >= 1 byte, so 3 ids always cover it. The 4th id leaves room
# for one zero-byte special token inside the window.
ENGINE_CONTEXT_TOKENS = 4


def decode_piece(table: TokenBytes, ids: Sequence[int], context_length: int, final: bool) -> str:
    """Text of `ids[context_length:]`, decoded after the context `ids[:context_length]`.

    With `final`, incomplete trailing bytes become U+FFFD; otherwise they are held back for the next piece (which
    repeats their ids as context). A context shorter than ENGINE_CONTEXT_TOKENS is the whole history of the sequence,
    so if it holds no visible token the new ids open the text (SentencePiece decoders drop its leading space).
    """
    if not 0 <= context_length <= len(ids):
        raise InvalidArgument(f"stream_context_length must be 0..{len(ids)} (the number of ids), got {context_length}")
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    # The context is decoded only to bring the decoder into the state it had after the earlier pieces.
    context = table.bytes_of(ids[:context_length], opens_text=False)
    decoder.decode(context, final=False)
    opens_text = context_length < ENGINE_CONTEXT_TOKENS and not context
    return decoder.decode(table.bytes_of(ids[context_length:], opens_text=opens_text), final=final)
