"""The build cache's size budget: content-keyed entries pile up with every model, setting and code version, so the
least recently used go first once the cache is over `$TRITONLLM_CACHE_MAX_GB` (default DEFAULT_MAX_GB).

An entry is a top-level folder of the cache (`build-*`, `decoder-*`, `hf-*`, `models`, ...); its modification time
is its last use, refreshed by `mark_used` whenever a build reuses or makes it. An entry used within IN_USE_SECONDS
is never evicted: a server may be running from it. Sizes count each file once, however many hard links it has (a
build folder links its artifacts, so removing it frees only what no other entry links). Folders whose names start
with "." are staging folders (files.atomic_dir); one older than IN_USE_SECONDS was left by a process that died and
is removed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError

MAX_GB_ENVIRONMENT = "TRITONLLM_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0
IN_USE_SECONDS = 3600.0


def max_bytes_from_environment() -> int:
    """The budget in bytes: $TRITONLLM_CACHE_MAX_GB (a number >= 0), else DEFAULT_MAX_GB."""
    text = os.environ.get(MAX_GB_ENVIRONMENT, "").strip()
    if not text:
        return int(DEFAULT_MAX_GB * 1e9)
    try:
        gigabytes = float(text)
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0:  # also refuses nan
        raise BuildError(f"${MAX_GB_ENVIRONMENT} = {text!r}; allowed: a number of GB >= 0 (0 keeps only entries "
                         f"used in the last {IN_USE_SECONDS / 3600:g} h)")
    return int(gigabytes * 1e9)


@dataclass(frozen=True)
class Entry:
    path: Path
    last_used: float


def mark_used(root: Path, paths: Iterable[Path | None]) -> None:
    """Refresh the last use of the cache entries that hold `paths` (paths outside `root` are ignored)."""
    root = Path(root).resolve()
    for path in paths:
        if path is None:
            continue
        try:
            relative = Path(path).resolve().relative_to(root)
        except ValueError:
            continue
        if relative.parts:
            entry = root / relative.parts[0]
            if entry.exists():
                os.utime(entry)


def _files(folder: Path) -> Iterable[os.stat_result]:
    for directory, _, names in os.walk(folder):
        for name in names:
            try:
                yield os.lstat(os.path.join(directory, name))
            except FileNotFoundError:  # removed meanwhile by another process
                continue


def cache_bytes(root: Path) -> int:
    """Disk bytes of everything under `root`, each file once."""
    seen: dict[tuple[int, int], int] = {}
    for status in _files(root):
        seen[(status.st_dev, status.st_ino)] = status.st_blocks * 512
    return sum(seen.values())


def prune(root: Path, max_bytes: int, now: float | None = None) -> list[Path]:
    """Evict least recently used entries until the cache fits `max_bytes` (entries in use are kept even if it does
    not); remove dead processes' staging folders. Returns what was removed."""
    root = Path(root)
    now = time.time() if now is None else now
    removed = []
    entries = []
    for path in root.iterdir():
        if not path.is_dir() or path.is_symlink():
            continue
        last_used = path.stat().st_mtime
        if now - last_used < IN_USE_SECONDS:
            continue
        if path.name.startswith("."):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        else:
            entries.append(Entry(path, last_used))
    total = cache_bytes(root)
    for entry in sorted(entries, key=lambda entry: entry.last_used):
        if total <= max_bytes:
            break
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
        total = cache_bytes(root)
    return removed
