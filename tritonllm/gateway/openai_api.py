"""The OpenAI wire format: request bodies checked field by field, response and stream-chunk bodies, errors.

Pure logic (standard library only): no HTTP server, no Triton. A refused request raises `APIError`, whose body is
OpenAI's `{"error": {"message", "type", "param", "code"}}` and whose message names the field and what is allowed.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Literal

from tritonllm.contract import GatewaySettings

Kind = Literal["chat", "completion"]

INT32_MAX = 2**31 - 1  # max_tokens travels as INT32: larger values would wrap in Triton
UINT64_MAX = 2**64 - 1
CHAT_ROLES = ("system", "user", "assistant")

# Structured output: OpenAI's `response_format`, and vLLM's extensions naming an ensemble guided input directly.
GUIDE_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
JSON_OBJECT_SCHEMA = '{"type": "object"}'
# Fields each endpoint serves. `user` (an end-user id for OpenAI's abuse monitoring) is accepted and not used;
# `min_tokens` and `ignore_eos` are vLLM's extensions that benchmark tools send to force the output length.
_COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user",
                  "min_tokens", "ignore_eos", *GUIDE_FIELDS)
SERVED_FIELDS: dict[Kind, tuple[str, ...]] = {
    "chat": ("messages", "max_completion_tokens", *_COMMON_FIELDS),
    "completion": ("prompt", *_COMMON_FIELDS),
}
# Fields OpenAI defines that are accepted only at the value that changes nothing (clients such as LangChain send them).
NEUTRAL_VALUES: dict[str, object] = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False,
                                     "echo": False, "best_of": 1}
TENANT_REFUSAL = "tenant is not a request field: the tenant comes from your API key"


class APIError(Exception):
    """A request the gateway refuses or could not serve, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type = error_type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Guide:
    """A structured-output constraint: the ensemble input that carries it, its text, and the field it came in."""

    input: str  # guided_json | guided_regex | guided_choice
    text: str
    param: str  # the request field, named in errors


@dataclass(frozen=True)
class GenerationRequest:
    """One OpenAI request, checked: what the gateway sends to Triton and how it answers."""

    kind: Kind
    messages: tuple[tuple[str, str], ...]  # chat: (role, text) turns; empty for completions
    prompt: str  # completions: the prompt text as sent; empty for chat (the chat template renders `messages`)
    max_tokens: int
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries `usage`
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...] | None
    min_tokens: int | None  # the end of turn is banned until this many tokens (ignore_eos: max_tokens)
    guide: Guide | None = None


# --- body -------------------------------------------------------------------------------------------------------

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")


def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays/objects in a JSON text, counted without parsing it (brackets inside strings do not
    count). Malformed text gives some number; the parser refuses it afterwards."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(1 if byte in b"[{" else -1 for byte in brackets), default=0)


def parse_body(raw: bytes, settings: GatewaySettings) -> dict[str, Any]:
    """The request body as a JSON object, refused before parsing when too large or too deeply nested."""
    if len(raw) > settings.max_body_bytes:
        raise APIError(413, f"request body is {len(raw)} bytes; allowed: at most {settings.max_body_bytes}",
                       code="request_too_large")
    depth = json_depth(raw)
    if depth > settings.max_json_depth:
        raise APIError(400, f"request body nests JSON {depth} levels deep; allowed: at most "
                            f"{settings.max_json_depth}", code="json_too_deep")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise APIError(400, f"request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    if b"\\u" in raw:  # only an escape can make a lone surrogate, which no UTF-8 text (and no prompt) holds
        for name, value in body.items():
            try:
                json.dumps({name: value}, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"{name} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
                                    "pair); allowed: text that is valid Unicode", param=name,
                               code="invalid_unicode") from None
    return body


# --- fields -----------------------------------------------------------------------------------------------------

def _refuse(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        raise _refuse(name, f"{name} = {value!r} is not allowed; allowed: {allowed}")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _refuse(name, f"{name} = {value!r} is not allowed; allowed: an integer in {low}..{high}")
    return value


def _boolean(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _refuse(param or name, f"{param or name} = {value!r} is not allowed; allowed: true or false")
    return bool(value)


def _stop(body: dict, settings: GatewaySettings) -> tuple[str, ...] | None:
    value = body.get("stop")
    if value is None:
        return None
    words = [value] if isinstance(value, str) else value
    allowed = f"a non-empty string or a list of at most {settings.max_stop_words} of them"
    if (not isinstance(words, list) or len(words) > settings.max_stop_words
            or not all(isinstance(word, str) and word for word in words)):
        raise _refuse("stop", f"stop = {value!r} is not allowed; allowed: {allowed}")
    return tuple(words) or None


def _response_format(value: object) -> Guide | None:
    allowed = ('{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name": ..., '
               '"schema": {...}}}')
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        raise _refuse("response_format", f"response_format = {value!r} is not allowed; allowed: {allowed}")
    spec = value.get("json_schema")
    if value["type"] != "json_schema":
        if set(value) != {"type"}:
            raise _refuse("response_format", f"response_format = {value!r} is not allowed; allowed: {allowed}")
        return None if value["type"] == "text" else Guide("guided_json", JSON_OBJECT_SCHEMA, "response_format")
    # `strict` is accepted either way: constrained decoding always follows the schema.
    if (set(value) != {"type", "json_schema"} or not isinstance(spec, dict)
            or set(spec) - {"name", "description", "schema", "strict"} or not isinstance(spec.get("schema"), dict)):
        raise _refuse("response_format", f"response_format = {value!r} is not allowed; allowed: {allowed}")
    return Guide("guided_json", json.dumps(spec["schema"]), "response_format")


def _guided_field(name: str, value: object) -> Guide:
    """vLLM's guided_json (a schema, or its JSON text), guided_regex (a pattern), guided_choice (strings)."""
    if name == "guided_json" and isinstance(value, (dict, str)) and value:
        return Guide(name, value if isinstance(value, str) else json.dumps(value), name)
    if name == "guided_regex" and isinstance(value, str) and value:
        return Guide(name, value, name)
    if name == "guided_choice" and isinstance(value, list) and value and all(
            isinstance(choice, str) and choice for choice in value):
        return Guide(name, json.dumps(value), name)
    allowed = {"guided_json": "a JSON schema (an object, or its JSON text)", "guided_regex": "a regular expression",
               "guided_choice": "a non-empty list of non-empty strings"}[name]
    raise _refuse(name, f"{name} = {value!r} is not allowed; allowed: {allowed}")


def _guide(body: dict) -> Guide | None:
    """The request's structured-output constraint; at most one of the guide fields may carry one."""
    sent = [name for name in GUIDE_FIELDS if body.get(name) is not None]
    if len(sent) > 1:
        raise _refuse(sent[1], f"{', '.join(sent)} were sent together; allowed: at most one of "
                               f"{', '.join(GUIDE_FIELDS)}")
    if not sent:
        return None
    name = sent[0]
    return _response_format(body[name]) if name == "response_format" else _guided_field(name, body[name])


def _text_content(content: object, param: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}
                                         for part in content):
        return "".join(part["text"] for part in content)
    raise _refuse(param, f"{param} is not allowed as sent; allowed: a string, or a list of "
                         '{"type": "text", "text": "..."} parts (this model reads text only)')


def _messages(body: dict) -> tuple[tuple[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _refuse("messages", "messages is required: a non-empty list of {\"role\", \"content\"} objects")
    turns = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _refuse(param, f"{param} must be an object with role and content")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise _refuse(f"{param}.{extra[0]}", f"{param}.{extra[0]} is not supported; allowed message fields: "
                                                 "role, content, name")
        if message.get("role") not in CHAT_ROLES:
            raise _refuse(f"{param}.role", f"{param}.role = {message.get('role')!r} is not allowed; allowed: "
                                           f"{', '.join(CHAT_ROLES)}")
        turns.append((message["role"], _text_content(message.get("content"), f"{param}.content")))
    return tuple(turns)


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _refuse("prompt", "prompt is required: a non-empty string (or a list holding exactly one; token-id "
                                "prompts are not served)")
    return prompt


def _check_fields(body: dict, kind: Kind) -> None:
    if "tenant" in body:
        raise APIError(400, TENANT_REFUSAL, param="tenant", code="unsupported_field")
    served = SERVED_FIELDS[kind]
    for name, value in body.items():
        if name in served or value is None:
            continue
        if name in NEUTRAL_VALUES:
            if value == NEUTRAL_VALUES[name] and type(value) is type(NEUTRAL_VALUES[name]):
                continue
            raise APIError(400, f"{name} = {value!r} is not supported; allowed: {NEUTRAL_VALUES[name]!r} or absent",
                           param=name, code="unsupported_value")
        raise APIError(400, f"{name} is not supported by this server; supported fields: {', '.join(served)}",
                       param=name, code="unsupported_field")


def parse_request(body: dict[str, Any], kind: Kind, settings: GatewaySettings) -> GenerationRequest:
    """Every field of an OpenAI chat or completions body checked; the first bad one raises APIError naming it."""
    _check_fields(body, kind)
    model = body.get("model")
    if model != settings.served_model_name:
        raise APIError(404, f"model {model!r} does not exist; served: {settings.served_model_name!r}",
                       param="model", code="model_not_found")
    messages = _messages(body) if kind == "chat" else ()
    prompt = _prompt(body) if kind == "completion" else ""
    max_tokens = _integer(body, "max_tokens", 1, INT32_MAX)
    if kind == "chat":  # the newer name wins when both are sent, as in OpenAI's API
        max_tokens = _integer(body, "max_completion_tokens", 1, INT32_MAX) or max_tokens
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise _refuse("stream_options", f"stream_options = {options!r} is not allowed; allowed: "
                                        '{"include_usage": true|false}')
    stream = _boolean(body, "stream")
    if options is not None and not stream:
        raise _refuse("stream_options", "stream_options is allowed only with stream: true")
    max_tokens = max_tokens or settings.default_max_tokens
    min_tokens = max_tokens if _boolean(body, "ignore_eos") else _integer(body, "min_tokens", 0, max_tokens)
    return GenerationRequest(
        kind=kind, messages=messages, prompt=prompt, max_tokens=max_tokens, min_tokens=min_tokens,
        stream=stream, include_usage=_boolean(options or {}, "include_usage", "stream_options.include_usage"),
        temperature=_number(body, "temperature", 0.0, 2.0), top_p=_number(body, "top_p", 0.0, 1.0, low_open=True),
        seed=_integer(body, "seed", 0, UINT64_MAX), stop=_stop(body, settings), guide=_guide(body))


# --- responses ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def body(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def finish_reason(request: GenerationRequest, completion_tokens: int) -> str:
    """`length` when the answer used its whole token budget, else `stop` (end of turn or a stop word)."""
    return "length" if completion_tokens >= request.max_tokens else "stop"


class ResponseWriter:
    """The bodies of one request's answer: one whole response, or stream chunks with a shared id and timestamp."""

    def __init__(self, request: GenerationRequest, model: str) -> None:
        self.request, self.model = request, model
        prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, chunk: bool, choices: list[dict], usage: Usage | None) -> dict[str, Any]:
        chat = self.request.kind == "chat"
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        body: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                                "choices": choices}
        if usage is not None:
            body["usage"] = usage.body()
        return body

    def _choice(self, text: str | None, reason: str | None, chunk: bool, role: bool = False) -> dict[str, Any]:
        if self.request.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        if chunk:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason}

    def whole(self, text: str, usage: Usage) -> dict[str, Any]:
        return self._envelope(False, [self._choice(text, finish_reason(self.request, usage.completion_tokens),
                                                   False)], usage)

    def first_chunk(self) -> dict[str, Any]:
        """Chat streams open with the assistant role (as OpenAI's do); completions with an empty text."""
        return self._envelope(True, [self._choice("" if self.request.kind == "chat" else None, None, True,
                                                  role=True)], None)

    def piece(self, text: str) -> dict[str, Any]:
        return self._envelope(True, [self._choice(text, None, True)], None)

    def last_chunks(self, usage: Usage) -> list[dict[str, Any]]:
        """The chunk with finish_reason, then (stream_options.include_usage) one with usage and no choices."""
        reason = finish_reason(self.request, usage.completion_tokens)
        chunks = [self._envelope(True, [self._choice(None, reason, True)], None)]
        if self.request.include_usage:
            chunks.append(self._envelope(True, [], usage))
        return chunks


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
