"""The build cache's size budget: content-keyed entries pile up with every model, setting and code version, so the
least recently used go first once the cache is over `$TRITONLLM_CACHE_MAX_GB` (default DEFAULT_MAX_GB).

An entry is a top-level folder of the cache that the build pipeline made (ARTIFACT_PREFIXES: a build folder is
self-contained, its artifacts hard-linked in, so no entry needs another); other folders (links into a venv, logs)
are left alone. Its modification time is its last use, refreshed by `mark_used` whenever a build reuses or makes it.
An entry is never evicted while locked (`tritonllm.paths.hold_cache_entry`: a tritonserver serving a build holds
its lock) or used within IN_USE_SECONDS. Sizes count each file once, however many hard links it has (removing a
build folder frees only what no other entry links). Staging folders (".<entry name>.*", files.atomic_dir) older than
IN_USE_SECONDS were left by a process that died and are removed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tritonllm.paths import cache_entry

from .errors import BuildError

MAX_GB_ENVIRONMENT = "TRITONLLM_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0
IN_USE_SECONDS = 3600.0
ARTIFACT_PREFIXES = ("build-", "decoder-", "draft-", "embedder-", "hf-")


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
    for path in paths:
        entry = None if path is None else cache_entry(path, root)
        if entry is not None and entry.exists():
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
        staging = path.name.startswith(".")
        if (not path.name.lstrip(".").startswith(ARTIFACT_PREFIXES) or not path.is_dir() or path.is_symlink()
                or now - path.stat().st_mtime < IN_USE_SECONDS):
            continue
        if staging:
            if _remove_unless_locked(path):
                removed.append(path)
        else:
            entries.append(Entry(path, path.stat().st_mtime))
    total = cache_bytes(root)
    for entry in sorted(entries, key=lambda entry: entry.last_used):
        if total <= max_bytes:
            break
        if _remove_unless_locked(entry.path):
            removed.append(entry.path)
            total = cache_bytes(root)
    return removed


def _remove_unless_locked(path: Path) -> bool:
    """Remove `path` under an exclusive lock; False (and nothing removed) while anyone holds a lock on it."""
    import fcntl

    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
    finally:
        os.close(descriptor)
