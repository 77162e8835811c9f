"""API keys (stored as SHA-256 hashes), the tenant each key stands for, and per-key rate limits.

A keys file (or the `TRITONLLM_API_KEYS` environment variable) holds JSON:

    {"keys": [{"sha256": "<hex of the key's SHA-256>", "tenant": "acme",
               "requests_per_second": 5, "tokens_per_minute": 20000}]}

Limits are optional (0 or absent: unlimited). `tritonllm api-key --tenant acme` makes a key and prints its entry;
only the hash is ever stored. Pure logic: no HTTP server.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tritonllm.contract import SettingsError

KEYS_ENV = "TRITONLLM_API_KEYS"
KEY_PREFIX = "sk-tllm-"
_HEX = set("0123456789abcdef")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    sha256: str
    tenant: str
    requests_per_second: float = 0.0  # 0: unlimited
    tokens_per_minute: int = 0  # prompt + completion tokens; 0: unlimited

    def validate(self, where: str) -> None:
        if len(self.sha256) != 64 or not set(self.sha256) <= _HEX:
            raise SettingsError(f"{where}.sha256 = {self.sha256!r} is not allowed; allowed: 64 lowercase hex digits "
                                "(the SHA-256 of the key, as `tritonllm api-key` prints it)")
        if not self.tenant.strip():
            raise SettingsError(f"{where}.tenant = {self.tenant!r} is not allowed; allowed: a non-empty name")
        if not 0 <= self.requests_per_second <= 1e6:
            raise SettingsError(f"{where}.requests_per_second = {self.requests_per_second!r} is not allowed; "
                                "allowed: 0 (unlimited) .. 1000000")
        if not 0 <= self.tokens_per_minute <= 10**12:
            raise SettingsError(f"{where}.tokens_per_minute = {self.tokens_per_minute!r} is not allowed; "
                                "allowed: 0 (unlimited) .. 10^12")


def parse_keys(text: str, source: str) -> tuple[ApiKey, ...]:
    """The keys of a keys document; a malformed one raises SettingsError naming `source` and the entry."""
    try:
        document = json.loads(text)
    except ValueError as error:
        raise SettingsError(f"{source} is not JSON ({error}); allowed: {{\"keys\": [{{\"sha256\", \"tenant\", "
                            "...}]}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise SettingsError(f"{source} must be a JSON object with a \"keys\" list")
    names = {"sha256": str, "tenant": str, "requests_per_second": (int, float), "tokens_per_minute": int}
    keys = []
    for index, entry in enumerate(entries):
        where = f"{source}: keys[{index}]"
        if not isinstance(entry, dict) or set(entry) - set(names) or not {"sha256", "tenant"} <= set(entry):
            raise SettingsError(f"{where} is not allowed; allowed: an object with sha256, tenant and optionally "
                                "requests_per_second, tokens_per_minute")
        for name, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, names[name]):
                raise SettingsError(f"{where}.{name} = {value!r} is not allowed; allowed: a "
                                    f"{'string' if names[name] is str else 'number'}")
        key = ApiKey(**entry)
        key.validate(where)
        keys.append(key)
    if len({key.sha256 for key in keys}) != len(keys):
        raise SettingsError(f"{source} lists one key twice")
    return tuple(keys)


def load_keys(path: Path | None) -> tuple[ApiKey, ...]:
    """Keys from `path`, else from $TRITONLLM_API_KEYS, else none (the gateway then serves without keys)."""
    if path is not None:
        try:
            return parse_keys(Path(path).read_text(encoding="utf-8"), str(path))
        except OSError as error:
            raise SettingsError(f"keys file {path} cannot be read: {error.strerror}") from None
    text = os.environ.get(KEYS_ENV)
    return parse_keys(text, f"${KEYS_ENV}") if text else ()


class TokenBucket:
    """`rate` units per second up to `capacity`; may go into debt (charged after the fact), then refuses."""

    def __init__(self, rate: float, capacity: float, clock=time.monotonic) -> None:
        self.rate, self.capacity, self.clock = rate, capacity, clock
        self.level = capacity
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def seconds_until(self, amount: float) -> float:
        """0 when `amount` is available now, else how long until it is."""
        self._refill()
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


@dataclass
class _Limits:
    requests: TokenBucket | None
    tokens: TokenBucket | None
    lock: threading.Lock = field(default_factory=threading.Lock)


class RateLimited(Exception):
    def __init__(self, limit: str, retry_after: float) -> None:
        super().__init__(limit)
        self.limit = limit
        self.retry_after_seconds = max(1, math.ceil(retry_after))


class RateLimiter:
    """Per key: requests per second (a one-second burst) and prompt+completion tokens per minute."""

    def __init__(self, keys: tuple[ApiKey, ...], clock=time.monotonic) -> None:
        self._limits = {key.sha256: _Limits(
            TokenBucket(key.requests_per_second, max(1.0, key.requests_per_second), clock)
            if key.requests_per_second else None,
            TokenBucket(key.tokens_per_minute / 60.0, key.tokens_per_minute, clock)
            if key.tokens_per_minute else None) for key in keys}

    def admit(self, key: ApiKey) -> None:
        """Counts one request, or raises RateLimited (with how long to wait) when a limit is reached."""
        limits = self._limits[key.sha256]
        with limits.lock:
            if limits.tokens is not None and (wait := limits.tokens.seconds_until(1)) > 0:
                raise RateLimited(f"tokens_per_minute ({key.tokens_per_minute})", wait)
            if limits.requests is not None:
                if (wait := limits.requests.seconds_until(1)) > 0:
                    raise RateLimited(f"requests_per_second ({key.requests_per_second:g})", wait)
                limits.requests.take(1)

    def charge_tokens(self, key: ApiKey, tokens: int) -> None:
        """Tokens a finished request used; a request that overdraws the budget delays the next ones."""
        limits = self._limits[key.sha256]
        if limits.tokens is not None:
            with limits.lock:
                limits.tokens.take(tokens)


class KeyRing:
    """Bearer token -> ApiKey. Without keys the gateway is open and every request is tenant ''."""

    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self._by_hash = {key.sha256: key for key in keys}

    @property
    def required(self) -> bool:
        return bool(self._by_hash)

    def lookup(self, authorization: str | None) -> ApiKey | None:
        """The key an `Authorization: Bearer <key>` header names, or None (missing, malformed or unknown)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._by_hash.get(hash_key(token.strip()))


OPEN_ACCESS = ApiKey(sha256="0" * 64, tenant="")  # stands for every request when no keys are configured
