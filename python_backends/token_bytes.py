"""Token id -> raw bytes, read from a Hugging Face `tokenizer.json`.

Detokenizing through the raw bytes of each token (instead of `tokenizer.decode` on slices of ids) is what keeps streamed
text byte-exact: a character split over two tokens, or a space carried by the next token, cannot get lost or turn into
U+FFFD at a piece boundary (see `detokenizer.py`).

The table is built by running every vocabulary entry through the tokenizer's own decoder configuration, one token at a
time. Supported decoder steps (alone or in a `Sequence`):

- `ByteLevel` (GPT-2, SmolLM2, Llama 3, Qwen): each character maps back to one byte through the inverse of GPT-2's
  byte-to-unicode table. A token holding a character outside that table keeps its UTF-8 bytes, as the decoder does.
- `ByteFallback`, `Replace`, `Fuse`, `Strip`, `Metaspace` (SentencePiece style: Llama 2, Mistral, Gemma): `<0xNN>`
  tokens are the byte NN, `▁` becomes a space.

SentencePiece decoders drop the space that the encoder put in front of the text: `Strip(" ", start=1)` after `Fuse`
removes one leading space of the whole text, and `Metaspace` (prepend scheme `always`/`first`) removes the `▁` of the
first token. Both only touch the first visible token of a sequence, so the table keeps a second entry for tokens whose
bytes differ when they open the text (`opening`); `bytes_of(ids, opens_text=True)` uses it for the first visible token,
which makes `bytes_of(ids)` equal to `tokenizer.decode(ids, skip_special_tokens=True)` byte for byte.

Special tokens map to b"" (like `skip_special_tokens=True`); non-special added tokens decode like vocabulary entries.
Ids outside the table map to b"", as `tokenizers` skips ids it does not know.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer


class UnsupportedTokenizer(ValueError):
    """The tokenizer's decoder cannot be expressed as a per-token byte table."""


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: the printable character standing for each byte -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of_byte = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in char_of_byte:
            char_of_byte[byte] = chr(256 + shifted)
            shifted += 1
    return {char: byte for byte, char in char_of_byte.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()
_SUPPORTED = "ByteLevel, ByteFallback, Replace, Fuse, Strip, Metaspace (alone or in a Sequence)"


def _byte_fallback_value(token: str) -> int | None:
    """The byte of a `<0xNN>` token, else None (same test as the `tokenizers` ByteFallback decoder)."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


class _DecoderSteps:
    """The decoder configuration applied to one token, as it is first in the text or not."""

    def __init__(self, decoder: dict | None) -> None:
        if decoder is None:
            raise UnsupportedTokenizer(f"the tokenizer has no decoder; supported decoders: {_SUPPORTED}")
        steps = decoder["decoders"] if decoder["type"] == "Sequence" else [decoder]
        # (kind, step, whether a Fuse step came before it): Fuse joins the tokens, so later steps see the whole text.
        self.plan = [(step["type"], step, any(earlier["type"] == "Fuse" for earlier in steps[:position]))
                     for position, step in enumerate(steps)]
        for kind, step, fused in self.plan:
            if kind == "Replace":
                pattern = step["pattern"].get("String")
                # After Fuse a pattern longer than one character could span two tokens.
                if pattern is None or (fused and len(pattern) > 1):
                    raise UnsupportedTokenizer(f"decoder step Replace with pattern {step['pattern']} is not supported")
            elif kind == "Strip":
                if step["stop"] != 0 or (fused and step["start"] > 1):
                    raise UnsupportedTokenizer(
                        f"decoder step Strip(start={step['start']}, stop={step['stop']}) is not supported: a stream "
                        "cannot strip the end of the text or more than one character from its start")
            elif kind == "Metaspace":
                if fused:
                    raise UnsupportedTokenizer("decoder step Metaspace after Fuse is not supported")
            elif kind not in ("ByteLevel", "ByteFallback", "Fuse"):
                raise UnsupportedTokenizer(f"decoder step {kind} is not supported; supported: {_SUPPORTED}")

    def apply(self, token: str, opens_text: bool) -> bytes:
        value: str | bytes = token
        for kind, step, fused in self.plan:
            if kind == "ByteFallback":
                byte = _byte_fallback_value(value) if isinstance(value, str) else None
                if byte is not None:
                    value = bytes([byte])
            elif kind == "Replace":
                pattern, content = step["pattern"]["String"], step["content"]
                value = (value.replace(pattern, content) if isinstance(value, str)
                         else value.replace(pattern.encode(), content.encode()))
            elif kind == "Strip":
                # Before Fuse it strips every token; after Fuse only the start of the whole text.
                if not fused or opens_text:
                    char = step["content"] if isinstance(value, str) else step["content"].encode()
                    for _ in range(step["start"]):
                        value = value.removeprefix(char)
            elif kind == "Metaspace":
                value = self._metaspace(step, value, opens_text)
            elif kind == "ByteLevel":
                if isinstance(value, bytes):
                    raise UnsupportedTokenizer("decoder step ByteLevel after ByteFallback on a <0xNN> token")
                if all(char in _BYTE_OF_CHAR for char in value):
                    value = bytes(_BYTE_OF_CHAR[char] for char in value)
        return value.encode("utf-8") if isinstance(value, str) else value

    @staticmethod
    def _metaspace(step: dict, value: str | bytes, opens_text: bool) -> str | bytes:
        replacement = step["replacement"]
        scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
        # `tokenizers` drops every replacement character of the first token, not only the leading one.
        new = "" if opens_text and scheme != "never" else " "
        if isinstance(value, bytes):
            return value.replace(replacement.encode(), new.encode())
        return value.replace(replacement, new)


@dataclass(frozen=True)
class TokenBytes:
    """Byte table of a tokenizer: `normal[id]` anywhere in the text; `opening[id]` where it differs as first token."""

    normal: tuple[bytes, ...]
    opening: dict[int, bytes]

    @classmethod
    def from_tokenizer_dir(cls, path: str | Path) -> TokenBytes:
        """Build the table from `<path>/tokenizer.json` (a Hugging Face fast-tokenizer folder)."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: the tokenizer folder must hold a tokenizer.json")
        return cls.from_tokenizer(Tokenizer.from_file(str(file)))

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> TokenBytes:
        steps = _DecoderSteps(json.loads(tokenizer.to_str())["decoder"])
        text_of_id = {token_id: token for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items()}
        special: set[int] = set()
        for token_id, added in tokenizer.get_added_tokens_decoder().items():
            text_of_id[token_id] = added.content
            if added.special:
                special.add(token_id)
        normal = [b""] * (max(text_of_id) + 1)
        opening: dict[int, bytes] = {}
        for token_id, token in text_of_id.items():
            if token_id in special:
                continue
            normal[token_id] = steps.apply(token, opens_text=False)
            first = steps.apply(token, opens_text=True)
            if first != normal[token_id]:
                opening[token_id] = first
        return cls(tuple(normal), opening)

    def __len__(self) -> int:
        return len(self.normal)

    def bytes_of(self, ids: Iterable[int], opens_text: bool = True) -> bytes:
        """Raw bytes of `ids`; with `opens_text`, the first visible token is decoded as the start of the text."""
        size = len(self.normal)
        pieces = []
        for token_id in ids:
            piece = self.normal[token_id] if 0 <= token_id < size else b""
            if opens_text and piece:
                piece = self.opening.get(token_id, piece)
                opens_text = False
            pieces.append(piece)
        return b"".join(pieces)
