"""The build cache's size budget (builders/cache_budget.py) on folders made here, and a real build that evicts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tritonllm.builders import cache_budget
from tritonllm.builders.cache_budget import IN_USE_SECONDS, cache_bytes, mark_used, max_bytes_from_environment, prune
from tritonllm.builders.errors import BuildError

MB = 1_000_000


def entry(root: Path, name: str, megabytes: int, age_hours: float, now: float) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "weights.bin").write_bytes(os.urandom(megabytes * MB))
    os.utime(folder, (now - age_hours * 3600, now - age_hours * 3600))
    return folder


def test_the_least_recently_used_go_first_until_the_cache_fits(tmp_path):
    now = time.time()
    oldest = entry(tmp_path, "decoder-fp32-old", 2, 30, now)
    older = entry(tmp_path, "build-old", 2, 20, now)
    recent = entry(tmp_path, "hf-recent", 2, 2, now)
    assert prune(tmp_path, 4 * MB + 100_000, now) == [oldest]
    assert older.is_dir() and recent.is_dir()
    assert prune(tmp_path, 0, now) == [older, recent]


def test_an_entry_used_within_the_hour_is_never_evicted(tmp_path):
    now = time.time()
    serving = entry(tmp_path, "build-serving", 2, 0.5, now)
    assert prune(tmp_path, 0, now) == [] and serving.is_dir()
    stale = entry(tmp_path, "build-stale", 1, 2, now)
    mark_used(tmp_path, [stale / "weights.bin", Path("/elsewhere/not/in/the/cache"), None])
    assert prune(tmp_path, 0, time.time()) == [] and stale.is_dir()  # its use was just refreshed


def test_hard_linked_files_count_once(tmp_path):
    now = time.time()
    decoder = entry(tmp_path, "decoder-fp32-a", 3, 5, now)
    build = tmp_path / "build-a"
    build.mkdir()
    os.link(decoder / "weights.bin", build / "weights.bin")
    os.utime(build, (now - 4 * 3600, now - 4 * 3600))
    assert 3 * MB <= cache_bytes(tmp_path) < 3 * MB + 100_000
    # Evicting the older decoder frees nothing the build still links: the cache stays at 3 MB, so the build goes too.
    assert prune(tmp_path, MB, now) == [decoder, build]


def test_a_dead_processs_staging_folder_is_removed_a_live_ones_kept(tmp_path):
    now = time.time()
    dead = entry(tmp_path, ".decoder-fp32-x.abc123", 1, 3, now)
    live = entry(tmp_path, ".decoder-fp32-y.def456", 1, 0.1, now)
    assert prune(tmp_path, 10**12, now) == [dead] and live.is_dir()


@pytest.mark.parametrize("text", ["-1", "lots", "nan"])
def test_a_bad_budget_is_refused_by_name(monkeypatch, text):
    monkeypatch.setenv(cache_budget.MAX_GB_ENVIRONMENT, text)
    with pytest.raises(BuildError, match=r"\$TRITONLLM_CACHE_MAX_GB = .*; allowed: a number of GB >= 0"):
        max_bytes_from_environment()


def test_the_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(cache_budget.MAX_GB_ENVIRONMENT, raising=False)
    assert max_bytes_from_environment() == int(cache_budget.DEFAULT_MAX_GB * 1e9)
    monkeypatch.setenv(cache_budget.MAX_GB_ENVIRONMENT, "0.5")
    assert max_bytes_from_environment() == 500 * MB


def test_a_build_evicts_what_was_last_used_long_ago_and_keeps_what_it_uses(tmp_path, monkeypatch):
    from support import save_tiny_model
    from tritonllm.builders.pipeline import build
    from tritonllm.contract import CacheSettings

    monkeypatch.setenv("TRITONLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(cache_budget.MAX_GB_ENVIRONMENT, "0")
    tiny = save_tiny_model(tmp_path / "tiny")
    first = build(model=tiny, precision="fp32", cache=CacheSettings(enabled=False))
    abandoned = entry(tmp_path / "cache", "build-abandoned", 1, IN_USE_SECONDS / 3600 + 1, time.time())
    again = build(model=tiny, precision="fp32", cache=CacheSettings(enabled=False))
    assert again.cached and again.repository_dir.is_dir() and not abandoned.exists()
    assert first.out_dir.is_dir()


def test_a_locked_entry_is_kept_and_folders_the_pipeline_did_not_make_are_left_alone(tmp_path, monkeypatch):
    from tritonllm.paths import hold_cache_entry

    monkeypatch.setenv("TRITONLLM_CACHE", str(tmp_path))
    now = time.time()
    served = entry(tmp_path, "build-served", 1, 5, now)
    links = entry(tmp_path, "triton-backends-py3.11-abc", 1, 50, now)
    lock = hold_cache_entry(served / "weights.bin")
    try:
        os.utime(served, (now - 5 * 3600, now - 5 * 3600))  # an old lock holder: still kept
        assert prune(tmp_path, 0, now) == [] and served.is_dir() and links.is_dir()
    finally:
        os.close(lock)
    assert prune(tmp_path, 0, time.time() + 2 * IN_USE_SECONDS) == [served] and links.is_dir()
    assert hold_cache_entry(Path("/elsewhere")) is None


@pytest.mark.server
def test_a_running_tritonserver_holds_the_lock_on_the_build_it_serves(server, smollm2_build):
    import fcntl

    from tritonllm.paths import cache_entry

    build = cache_entry(smollm2_build.repository_dir)
    assert build == smollm2_build.out_dir.resolve()
    descriptor = os.open(build, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):  # a probe only: released at once if it were ever taken
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(descriptor)
