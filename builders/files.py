"""Publishing build outputs: every folder a build writes appears whole or not at all.

- `atomic_dir(target)`: a staging folder beside `target` that becomes `target` in one rename when the block ends
  without an error, and is removed (leaving `target` as it was) when it raises.
- `link_tree` / `link_or_copy`: copy files as hard links (no extra disk for GB-sized weights), falling back to
  copies across filesystems.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(target: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes `target` (mode 0755: mkdtemp makes folders private, and
    the server may run as another user).

    An existing `target` is replaced only once the new folder is complete (`replace=True`: an earlier build of the
    same folder), or kept (`replace=False`: content-keyed outputs, where another build that published the same key
    first wins and the staged copy is dropped).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        staging.chmod(0o755)
        _publish(staging, target, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was published


def _publish(staging: Path, target: Path, replace: bool) -> None:
    if not target.exists():
        try:
            staging.rename(target)
            return
        except OSError:
            if not target.exists():  # not a concurrent publisher: a real failure
                raise
    if not replace:
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    target.rename(retired / target.name)
    try:
        staging.rename(target)
    except OSError:
        (retired / target.name).rename(target)  # put the previous folder back
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def link_tree(source: Path, destination: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a folder as hard links, falling back to copies across filesystems; `skip` holds name patterns."""
    shutil.copytree(source, destination, copy_function=link_or_copy, ignore=shutil.ignore_patterns(*skip))


def link_or_copy(source: str | Path, destination: str | Path) -> None:
    """Hard link `source` as `destination` when both are on one filesystem, else copy it."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
