"""Structured output: a request's new tokens constrained to a JSON schema, a regex, a grammar or a list of choices.

The grammar engine is llguidance (see README "Structured output" for why it, and what it costs per token):
- `GuideSpec`: what one request asked for, from its `guided_*` input (at most one of GUIDED_INPUTS).
- `GrammarCompiler` (one per engine): the tokenizer's token table, built once from token_bytes.TokenBytes (the bytes
  the detokenizer sends, so grammar and answer agree byte for byte; llguidance's own reading of a tokenizer.json
  misreads the byte-level decoder of SmolLM2's GGUF conversion), and the compiled grammars, cached by content; `compile` runs on the submitting thread (never the engine loop) and raises InvalidArgument naming the
  input and the compiler's message. Every request gets its own matcher, a cheap copy of the cached one.
- `TokenGuide`: the matcher of one sequence; the engine feeds it each sampled token.
- `MaskWorker`: the allowed-token masks of a batch's guided sequences, computed on a worker thread while the forward
  pass that needs them runs (ONNX Runtime and llguidance both release the GIL); `PendingMasks.apply` then bans
  every token the grammar does not allow, so constrained and free requests share one batch and one sampling step.

The grammar's end of text is the tokenizer's EOS in llguidance; a mask moves that permission to the request's own
`end_id` (none: the sequence ends when the document is complete). When nothing but the end may follow, the engine
finishes the sequence without spending a step on the end token.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import llguidance
import llguidance.numpy as llguidance_numpy
import numpy as np

from tritonllm.contract import GUIDED_INPUTS
from tokenizers import Tokenizer

from tritonllm.python_backends.errors import InvalidArgument
from tritonllm.python_backends.token_bytes import TokenBytes

# Request input -> llguidance grammar format. guided_grammar takes Lark or GBNF (llama.cpp) text; guided_choice a
# JSON list of strings.
GRAMMAR_FORMATS: dict[str, str] = {"guided_json": "json_schema", "guided_regex": "regex",
                                   "guided_grammar": "grammar", "guided_choice": "choice"}
assert tuple(GRAMMAR_FORMATS) == GUIDED_INPUTS, "every guided input of the contract needs a grammar format"
# JSON is written in json.dumps' style, with one space after ':' and ',' and no other whitespace: flexible whitespace
# lets a small model fill its token budget with blank lines (seen with the tiny test model) and never close the
# document. A schema's own "x-guidance" options override these.
JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
COMPILED_GRAMMARS_KEPT = 256  # distinct grammars whose compiled matcher stays cached


@dataclass(frozen=True)
class GuideSpec:
    """One request's constraint: the input it came in (a key of GRAMMAR_FORMATS) and its text."""

    input_name: str
    text: str

    @classmethod
    def from_inputs(cls, values: Mapping[str, str | None]) -> GuideSpec | None:
        """The constraint among guided_* input values (None: absent); more than one is refused."""
        given = [(name, text) for name, text in values.items() if text is not None]
        if len(given) > 1:
            raise InvalidArgument(f"inputs {', '.join(name for name, _ in given)}: send at most one of "
                                  f"{', '.join(GUIDED_INPUTS)}")
        if not given:
            return None
        name, text = given[0]
        if name not in GRAMMAR_FORMATS:
            raise InvalidArgument(f"input {name} is not a guided input; allowed: {', '.join(GUIDED_INPUTS)}")
        return cls(name, text)


class TokenGuide:
    """The grammar state of one sequence."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def advance(self, token: int) -> bool:
        """Feed the sampled token; False when the grammar does not allow it (the matcher is then broken)."""
        return bool(self.matcher.consume_token(token))

    @property
    def complete(self) -> bool:
        """Nothing but the end of text may follow."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class GrammarCompiler:
    """Grammars compiled against one tokenizer and vocabulary, cached by content."""

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int) -> None:
        tokenizer_json = Path(tokenizer_dir) / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"{tokenizer_json} not found: guided decoding needs the model's tokenizer.json")
        # n_vocab: the model's logits may have more rows than the tokenizer has tokens.
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenTable(tokenizer_json)),
                                                n_vocab=vocab_size)
        self.vocab_size = vocab_size
        self._compiled: OrderedDict[GuideSpec, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # Triton may call execute from more than one thread

    def compile(self, spec: GuideSpec) -> TokenGuide:
        """A fresh guide for `spec`; InvalidArgument when the text does not compile."""
        with self._lock:
            prototype = self._compiled.get(spec)
            if prototype is not None:
                self._compiled.move_to_end(spec)
        if prototype is None:
            prototype = self._compile(spec)
            with self._lock:
                self._compiled[spec] = prototype
                while len(self._compiled) > COMPILED_GRAMMARS_KEPT:
                    self._compiled.popitem(last=False)
        return TokenGuide(prototype.deep_copy())

    def _compile(self, spec: GuideSpec) -> llguidance.LLMatcher:
        name, text = spec.input_name, spec.text
        if name in ("guided_json", "guided_choice"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise InvalidArgument(f"input {name} is not valid JSON: {error}") from None
            if name == "guided_choice" and not (isinstance(value, list) and value
                                                 and all(isinstance(item, str) and item for item in value)):
                raise InvalidArgument(f"input {name} must be a JSON list of non-empty strings, got {text[:200]!r}")
            if name == "guided_json" and not isinstance(value, (dict, bool)):
                raise InvalidArgument(f"input {name} must be a JSON schema (an object), got {text[:200]!r}")
        try:
            grammar = (llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
                       if name == "guided_json" else llguidance.grammar_from(GRAMMAR_FORMATS[name], text))
        except ValueError as error:
            raise InvalidArgument(f"input {name} does not compile: {error}") from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidArgument(f"input {name} does not compile: {matcher.get_error().strip()}")
        return matcher


class _TokenTable:
    """What llguidance.TokenizerWrapper reads: each token's bytes, the special ones, and a string tokenizer."""

    def __init__(self, tokenizer_json: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        special = {token_id: added.content for token_id, added in self._tokenizer.get_added_tokens_decoder().items()
                   if added.special}
        if not special:
            raise ValueError(f"{tokenizer_json}: guided decoding needs a special token to mark the end of text")
        tokens = list(TokenBytes.from_tokenizer(self._tokenizer).normal)
        for token_id, content in special.items():  # b"" in the detokenizer's table; llguidance wants their names
            tokens[token_id] = content.encode("utf-8")
        self.tokens = tokens
        self.special_token_ids = sorted(special)
        # The grammar's end-of-text marker; MaskWorker moves its permission to each request's end_id, so any
        # special token serves.
        self.eos_token_id = self.special_token_ids[0]
        self.bos_token_id = None

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tokenizer.encode(text, add_special_tokens=False).ids


class PendingMasks:
    """Masks being computed for some rows of a batch; `apply` waits for them."""

    def __init__(self, rows: list[int], future: Future) -> None:
        self.rows = rows
        self._future = future

    def apply(self, logits: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """`logits[rows]` (rows of the batch the masks were started for) with disallowed tokens at -inf; a copy."""
        allowed = self._future.result()
        selected = np.array(logits[list(rows)] if len(rows) != logits.shape[0] else logits, copy=True)
        position = {row: index for index, row in enumerate(self.rows)}
        for out_row, row in enumerate(rows):
            if row in position:
                np.putmask(selected[out_row], ~allowed[position[row]], -np.inf)
        return selected


class MaskWorker:
    """Computes allowed-token masks off the engine loop's thread."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.vocab_size = compiler.vocab_size
        self.eos = compiler.tokenizer.eos_token
        self._matchers = llguidance.LLExecutor()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guided-masks")

    def start(self, guides: Sequence[TokenGuide | None], end_ids: Sequence[int | None]) -> PendingMasks | None:
        """Begin the masks of the rows that have a guide (row = position in `guides`); None when none has."""
        rows = [row for row, guide in enumerate(guides) if guide is not None]
        if not rows:
            return None
        matchers = [guides[row].matcher for row in rows]  # type: ignore[union-attr]
        ends = [end_ids[row] for row in rows]
        return PendingMasks(rows, self._thread.submit(self._allowed, matchers, ends))

    def _allowed(self, matchers: list[llguidance.LLMatcher], end_ids: list[int | None]) -> np.ndarray:
        """bool [rows, vocab]: tokens each grammar allows next, its end of text moved to the row's end_id."""
        bitmask = llguidance_numpy.allocate_token_bitmask(len(matchers), self.vocab_size)
        llguidance_numpy.fill_next_token_bitmask_par(self._matchers, list(zip(matchers, range(len(matchers)))),
                                                     bitmask)
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :self.vocab_size].astype(bool)
        may_end = allowed[:, self.eos].copy()
        allowed[:, self.eos] = False
        for row, end_id in enumerate(end_ids):
            if end_id is not None and may_end[row]:
                allowed[row, end_id] = True
        return allowed

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
