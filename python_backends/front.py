"""Logic of the front model `llm`: the ensemble's contract with a semantic cache in front of it.

Per request: parse the inputs (the ensemble contract + optional `tenant` and `cache`), then
- `cache=use` (default): look the prompt up; a hit streams the cached answer (in pieces when `stream`, else one
  response) and the ensemble is never called; a miss streams the ensemble's answer and stores it once complete.
- `cache=refresh`: skip the lookup, generate, store (replacing the cached answer).
- `cache=bypass`: generate only; the cache is neither read nor written.
An answer is stored only when the ensemble finished without error and the client did not cancel; it is stored before
the final response goes out, so a client that repeats the prompt right after the answer completes gets a hit.

Every numeric input is range-checked first (tritonllm.contract.INPUT_RANGES) and an empty prompt is refused, so a
request the ensemble would refuse is not answered from the cache either. The bounds that need the model (its
vocabulary for top_k, end_id and pad_id; max_tokens within the context) are checked by the ensemble, which a hit never
reaches: those inputs are in the cache key, so an entry is only served to a request with values the ensemble took.

The cache key holds every input that changes the text: max_tokens, temperature, top_p, top_k, seed, min_tokens,
end_id, stop/bad words, apply_chat_template, the guided_* constraint, and whether the prompt is echoed in the output;
and pad_id when given (it does not change the text, but only the ensemble checks it). The echo is derived
rather than keyed on `exclude_input_in_output`: a streamed answer never repeats the prompt (engine contract), so a
streamed request and a non-streamed one with `exclude_input_in_output` share one answer, byte for byte.

The model.py adapter turns Triton tensors into numpy arrays for `Front.parse` and supplies three callables to
`Front.serve`: `generate()` (the ensemble's text pieces, streamed), `send(Reply)` and `cancelled()`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from tritonllm import contract
from tritonllm.contract import (CACHE_MODES, CACHE_REDIS_URL_ENVIRONMENT, CALLED_MODEL_PARAMETER, EMPTY_PROMPT,
                                FORWARDED_INPUTS_PARAMETER, INPUT_RANGES, CacheSettings, input_problem,
                                required_parameter, settings_from_parameters)
from tritonllm.python_backends.cache_verifier import load_lexicon
from tritonllm.python_backends.errors import InvalidArgument
from tritonllm.python_backends.sampling import SamplingParams
from tritonllm.python_backends.semantic_cache import Autosaver, CacheKey, CacheStats, SemanticCache, SnapshotLoad
from tritonllm.python_backends.shared_cache import RedisCacheSync
from tritonllm.python_backends.traffic_capture import TrafficCapture

# Input name -> numpy dtype, from the contract: what the ensemble takes, and what the front model takes.
ENSEMBLE_INPUTS: dict[str, np.dtype] = {tensor.name: np.dtype(tensor.numpy_dtype)
                                        for tensor in contract.ENSEMBLE_INPUTS}
REQUEST_INPUTS: dict[str, np.dtype] = {tensor.name: np.dtype(tensor.numpy_dtype) for tensor in contract.FRONT_INPUTS}
SCALAR_KEY_INPUTS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "min_tokens", "end_id",
                     "apply_chat_template")
WORDS_KEY_INPUTS = ("stop_words", "bad_words")
HIT_PIECE_WORDS = 4  # a streamed hit is sent a few words per response, like a generation would arrive
DEFAULT_SNAPSHOT_FILE = "cache_snapshot"


class Cancelled(Exception):
    """The client cancelled the request; nothing was stored."""


@dataclass(frozen=True)
class FrontRequest:
    prompt: str
    stream: bool
    mode: str  # one of CACHE_MODES
    key: CacheKey
    ensemble_inputs: dict[str, np.ndarray]  # passed to the ensemble unchanged


@dataclass(frozen=True)
class Reply:
    text: bytes
    cache_hit: bool
    similarity: float  # of the cached prompt served, or of the closest one found on a miss (0.0: none compared)
    final: bool


class Front:
    """Parses requests and serves them from the cache or the ensemble; `cache` None means caching is off.

    `keeper` keeps the cache's entries beyond this process (the snapshot's Autosaver, or the shared store's
    RedisCacheSync); `close` stops it."""

    def __init__(self, cache: SemanticCache | None, model: str, keeper: Autosaver | RedisCacheSync | None = None,
                 on_lookup: Callable[[float], None] = lambda seconds: None,
                 forwarded_inputs: Iterable[str] = tuple(ENSEMBLE_INPUTS),
                 capture: TrafficCapture | None = None) -> None:
        self.cache, self.model, self.keeper, self.on_lookup = cache, model, keeper, on_lookup
        self.forwarded_inputs = frozenset(forwarded_inputs)  # the inputs the called ensemble offers
        self.capture = capture  # None: served prompts are not recorded (the default)

    def parse(self, arrays: Mapping[str, np.ndarray]) -> FrontRequest:
        """Request from input arrays (batch dim first, batch 1); raises InvalidArgument naming the bad input."""
        if "text_input" not in arrays:
            raise InvalidArgument("input text_input is required")
        if "max_tokens" not in arrays:
            raise InvalidArgument("input max_tokens is required")
        for name, array in arrays.items():
            if array.ndim == 0 or array.shape[0] != 1:
                raise InvalidArgument(f"input {name} must have batch size 1 (one prompt per request to llm), got "
                                      f"shape {list(array.shape)}")
        prompt = _text(arrays, "text_input", "")
        if not prompt:
            raise InvalidArgument(EMPTY_PROMPT)
        for name in INPUT_RANGES:
            problem = input_problem(name, _scalar(arrays, name))
            if problem:
                raise InvalidArgument(problem)
        mode = _text(arrays, "cache", "use")
        if mode not in CACHE_MODES:
            raise InvalidArgument(f"input cache must be one of {', '.join(CACHE_MODES)}; got {mode!r}")
        values = {name: _scalar(arrays, name) for name in SCALAR_KEY_INPUTS}
        stream = bool(_scalar(arrays, "stream") or False)
        prompt_in_output = not stream and not _scalar(arrays, "exclude_input_in_output")
        pad_id = _scalar(arrays, "pad_id")  # keyed only when sent: entries stored without it stay valid
        params = (*values.items(), *((name, _words(arrays, name)) for name in WORDS_KEY_INPUTS),
                  *((name, _text(arrays, name, None)) for name in contract.GUIDED_INPUTS),
                  ("prompt_in_output", prompt_in_output), *((("pad_id", pad_id),) if pad_id is not None else ()))
        greedy = SamplingParams.from_optional(temperature=values["temperature"], top_k=values["top_k"],
                                              top_p=values["top_p"]).greedy
        if not greedy:  # a seeded answer depends on the drafter (rejection sampling draws differently); greedy not
            params = (*params, ("speculative", _text(arrays, "speculative", None)))
        key = CacheKey(_text(arrays, "tenant", ""), self.model, params, sampled=not greedy and values["seed"] is None)
        ensemble_inputs = {name: array for name, array in arrays.items() if name in self.forwarded_inputs}
        if self.capture is not None:  # a parsed, valid request: what the engine would be calibrated for
            self.capture.record(key.tenant, prompt, chat=bool(values["apply_chat_template"]))
        return FrontRequest(prompt, stream, mode, key, ensemble_inputs)

    def serve(self, request: FrontRequest, generate: Callable[[], Iterable[bytes]], send: Callable[[Reply], None],
              cancelled: Callable[[], bool]) -> str:
        """Answer `request` through `send` (the last Reply has final=True); returns what happened, for logs.

        Raises Cancelled when the client cancelled, and lets errors of `generate`/`send` through; nothing is stored
        in either case.
        """
        caching = self.cache is not None and request.mode != "bypass" and self.cache.cacheable(request.key)
        lookup = None
        if caching and request.mode == "use":
            started = time.perf_counter()
            lookup = self.cache.lookup(request.key, request.prompt)
            self.on_lookup(time.perf_counter() - started)
            if lookup.hit is not None:
                for piece, final in _mark_last(answer_pieces(lookup.hit.answer, request.stream)):
                    send(Reply(piece, True, lookup.hit.similarity, final))
                return f"hit (similarity {lookup.hit.similarity:.4f})"
        similarity = lookup.best_similarity if lookup is not None else 0.0
        pieces: list[bytes] = []
        stream = generate()
        try:
            for piece in stream:
                if cancelled():
                    raise Cancelled("request cancelled by the client")
                if request.stream and pieces:
                    send(Reply(pieces[-1], False, similarity, False))  # one behind: the last carries the final flag
                pieces.append(piece)
        finally:
            if isinstance(stream, Generator):
                stream.close()  # at once, not when collected: closing the ensemble's stream cancels its request
        if cancelled():
            raise Cancelled("request cancelled by the client")
        outcome = "miss, not cached" if not caching else "miss, stored"
        if caching:
            refused = self.cache.store(request.key, request.prompt, b"".join(pieces),
                                       lookup.vector if lookup is not None else None)
            outcome = f"miss, not stored: {refused}" if refused else outcome
        last = (pieces[-1] if pieces else b"") if request.stream else b"".join(pieces)
        send(Reply(last, False, similarity, True))
        return outcome

    def close(self) -> None:
        """Stops the keeper (the autosaver after a last snapshot, or the shared store's reader)."""
        if self.keeper is not None:
            self.keeper.close()


def build_front(parameters: Mapping[str, str], version_dir: Path,
                on_lookup: Callable[[float], None] = lambda seconds: None,
                on_cache_change: Callable[[CacheStats], None] = lambda stats: None) -> tuple[Front, SnapshotLoad]:
    """The front as the llm model configuration describes it (parameters as strings; paths relative to
    `version_dir`; $TRITONLLM_CACHE_REDIS_URL wins over `redis_url`), with the stored entries loaded from the
    snapshot or the shared Redis; the SnapshotLoad says why they were not. `on_cache_change` gets the cache's stats
    when entries of other replicas arrive."""
    from tritonllm.python_backends.embedding import Embedder

    redis_url = os.environ.get(CACHE_REDIS_URL_ENVIRONMENT)
    settings = settings_from_parameters(CacheSettings, parameters,
                                        **({"redis_url": redis_url} if redis_url is not None else {}))
    model = required_parameter(parameters, CALLED_MODEL_PARAMETER, "llm")
    forwarded = [name for name in required_parameter(parameters, FORWARDED_INPUTS_PARAMETER, "llm").split(",")
                 if name in ENSEMBLE_INPUTS]
    capture = TrafficCapture(settings, version_dir) if settings.capture_dir else None
    if not settings.enabled:
        front = Front(None, model, on_lookup=on_lookup, forwarded_inputs=forwarded, capture=capture)
        return front, SnapshotLoad(0, None)
    embedder = Embedder(version_dir / required_parameter(parameters, "embedder_path", "llm"))
    load_lexicon()
    cache = SemanticCache(settings, embedder.embed_one, embedder.dimension, embedder.identity)
    if settings.redis_url:
        shared = RedisCacheSync(cache, settings.redis_url, on_cache_change)
        return Front(cache, model, shared, on_lookup, forwarded, capture), shared.loaded
    snapshot = version_dir / (settings.persist_path or DEFAULT_SNAPSHOT_FILE)  # an absolute persist_path wins
    loaded = cache.load_snapshot(snapshot)
    autosaver = Autosaver(cache, snapshot, settings.snapshot_interval_seconds)
    return Front(cache, model, autosaver, on_lookup, forwarded, capture), loaded


def answer_pieces(answer: bytes, stream: bool) -> list[bytes]:
    """The cached answer as responses: whole when not streaming, else groups of HIT_PIECE_WORDS words (split at
    ASCII whitespace, which never falls inside a UTF-8 sequence); the pieces join back to `answer` exactly."""
    if not stream:
        return [answer]
    words = re.findall(rb"\S+\s*|\s+", answer)
    return [b"".join(words[start:start + HIT_PIECE_WORDS]) for start in range(0, len(words), HIT_PIECE_WORDS)] \
        or [b""]


Item = TypeVar("Item")


def _mark_last(items: list[Item]) -> Iterator[tuple[Item, bool]]:
    for position, item in enumerate(items):
        yield item, position == len(items) - 1


def _scalar(arrays: Mapping[str, np.ndarray], name: str) -> Any:
    """The single value of an optional input as a Python scalar; None when absent."""
    array = arrays.get(name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidArgument(f"input {name} must hold one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value  # BYTES elements are plain bytes


def _text(arrays: Mapping[str, np.ndarray], name: str, default: str | None) -> str | None:
    raw = _scalar(arrays, name)
    if raw is None:
        return default
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise InvalidArgument(f"input {name} must be UTF-8 text") from None


def _words(arrays: Mapping[str, np.ndarray], name: str) -> tuple[str, ...] | None:
    array = arrays.get(name)
    if array is None:
        return None
    return tuple(item.decode("utf-8", "backslashreplace") if isinstance(item, bytes) else str(item)
                 for item in array.reshape(-1).tolist())
