"""Opt-in capture of served prompts, per tenant, for calibrating quantized builds on real traffic (`--calib FILE`).

The front model `llm` records each request's prompt (cache hits included: they are traffic too) before serving it,
one JSON line per prompt in `<capture_dir>/tenant-<sha256(tenant)[:16]>.jsonl`: `{"prompt": ...}` for requests the
chat template wraps, `{"text": ...}` for raw ones, the record kinds `tritonllm.prompts.read_prompts` reads, so a
captured file is a calibration file as it stands. The file name is a hash, so no tenant string can choose a path;
each line also names its tenant.

Bounded three ways, each a CacheSettings field: a tenant's file stops growing at `capture_max_bytes` or
`capture_max_lines` (capture stops; nothing is rotated or deleted), and at most `capture_max_tenants` files are
written (prompts of further tenants are not captured), so the folder never exceeds
capture_max_tenants x capture_max_bytes. A file found at start counts towards its bounds. Off by default
(`capture_dir` empty): nothing is written, no folder is created.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from tritonllm.contract import CacheSettings


def capture_file_name(tenant: str) -> str:
    return f"tenant-{hashlib.sha256(tenant.encode()).hexdigest()[:16]}.jsonl"


@dataclass
class _TenantFile:
    path: Path
    size: int
    lines: int


class TrafficCapture:
    """Appends prompts to per-tenant JSONL files within the bounds of `settings` (capture_* fields)."""

    def __init__(self, settings: CacheSettings, base_dir: Path) -> None:
        self.directory = Path(settings.capture_dir)
        if not self.directory.is_absolute():
            self.directory = Path(base_dir) / self.directory
        self.max_bytes, self.max_lines = settings.capture_max_bytes, settings.capture_max_lines
        self.max_tenants = settings.capture_max_tenants
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, _TenantFile] = {}
        for path in self.directory.glob("tenant-*.jsonl"):
            data = path.read_bytes()
            self._files[path.name] = _TenantFile(path, len(data), data.count(b"\n"))
        self._lock = threading.Lock()

    def record(self, tenant: str, prompt: str, chat: bool) -> bool:
        """Append one prompt of `tenant`; False when a bound stopped it."""
        line = (json.dumps({"prompt" if chat else "text": prompt, "tenant": tenant}, ensure_ascii=False)
                + "\n").encode()
        name = capture_file_name(tenant)
        with self._lock:
            entry = self._files.get(name)
            if entry is None:
                if len(self._files) >= self.max_tenants:
                    return False
                entry = self._files[name] = _TenantFile(self.directory / name, 0, 0)
            if entry.lines >= self.max_lines or entry.size + len(line) > self.max_bytes:
                return False
            with entry.path.open("ab") as file:
                file.write(line)
            entry.size += len(line)
            entry.lines += 1
            return True
