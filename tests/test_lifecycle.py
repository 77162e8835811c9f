"""Nothing outlives `tritonllm serve`: however the command ends, tritonserver, every Python stub it started and the
stubs' /dev/shm regions are gone (real processes, a tiny random Llama).

One `serve` per way of ending is started at once (they load side by side), each is ended its way, and then no live
process of its tritonserver's process group may remain, nor any of the shared-memory files its stubs used, nor its
reaper.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from support import export_tiny_llama

from tritonllm import reaper
from tritonllm.builders import repository
from tritonllm.contract import EngineSettings, RepositorySettings
from tritonllm.server import REAPER_GRACE_SECONDS, free_port

pytestmark = pytest.mark.server  # tritonservers on a tiny random model: no SmolLM2 build

TRITONLLM = Path(sys.executable).parent / "tritonllm"
WAYS = ("SIGTERM", "SIGINT", "SIGINT-thrice", "SIGHUP", "closed-pipe", "SIGKILL")
STUBS = 3  # the Python models of the tiny repository: preprocessing, engine, postprocessing
ADMIN_KEY = "lifecycle-test-admin-key"


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory) -> Path:
    from tritonllm.builders.source import prepare_hf_model
    from tritonllm.paths import cache_dir

    root = tmp_path_factory.mktemp("lifecycle")
    settings = RepositorySettings(
        tokenizer_dir=prepare_hf_model(None, cache_dir()), onnx_dir=export_tiny_llama(root / "tiny"),
        engine=EngineSettings(max_batch_size=2, max_context_length=256, kv_cache_max_tokens=1024, intra_op_threads=1,
                              prefix_cache_max_tokens=0))
    return repository.render_repository(settings, root / "repository")


@dataclass
class Served:
    process: subprocess.Popen
    http_port: int
    server_pid: int = 0  # tritonserver, leader of its own session and process group
    reaper_pid: int = 0
    regions: frozenset[str] = frozenset()

    def ready(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def _command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@pytest.fixture(scope="module")
def served(tiny_repository, tmp_path_factory):
    """One `tritonllm serve` per way of ending it, all ready, with what each started recorded."""
    logs = tmp_path_factory.mktemp("lifecycle-logs")
    started: dict[str, Served] = {}
    try:
        for way in WAYS:
            http_port = free_port()
            process = subprocess.Popen(
                [str(TRITONLLM), "serve", "--repository", str(tiny_repository), "--http-port", str(http_port),
                 "--grpc-port", str(free_port()), "--metrics-port", str(free_port())],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=open(logs / f"{way}.err", "wb"),
                env=os.environ | {"TRITONLLM_ADMIN_KEY": ADMIN_KEY})
            started[way] = Served(process, http_port)
        deadline = time.monotonic() + 240
        for way, one in started.items():
            while not one.ready():
                assert one.process.poll() is None, (way, (logs / f"{way}.err").read_text())
                assert time.monotonic() < deadline, f"serve ({way}) was not ready in time"
                time.sleep(0.2)
            children = _children(one.process.pid)
            one.server_pid = next(pid for pid in children if Path(_command_line(pid)[0]).name == "tritonserver")
            one.reaper_pid = next(pid for pid in children if reaper.__file__ in _command_line(pid))
            one.regions = frozenset(reaper.shm_regions(reaper.group_members(one.server_pid)))
        yield started
    finally:
        for one in started.values():  # whatever a failed test left behind
            if one.process.poll() is None:
                one.process.kill()
            if one.server_pid:
                reaper.kill_group(one.server_pid)
                reaper.remove_regions(one.regions)


def test_serve_closes_the_control_plane_to_all_but_the_admin_key(served):
    """Before the servers are ended below: `serve` passed $TRITONLLM_ADMIN_KEY to tritonserver's restrictions."""
    url = f"http://127.0.0.1:{served['SIGTERM'].http_port}/v2/logging"
    assert requests.post(url, json={}, timeout=30).status_code == 403
    assert requests.post(url, json={}, headers={"tritonllm-admin-key": ADMIN_KEY}, timeout=30).status_code == 200


def _end(one: Served, way: str) -> int:
    if way == "closed-pipe":  # the reader of its stdout goes away, as `tritonllm serve | head -1` once head exits
        one.process.stdout.close()
    elif way == "SIGINT-thrice":  # an impatient Ctrl-C: once deadlocked the handler (it set an Event re-entrantly)
        for _ in range(3):
            one.process.send_signal(signal.SIGINT)
    else:
        one.process.send_signal(getattr(signal, way))
    return one.process.wait(timeout=60)


@pytest.mark.parametrize("way", WAYS)
def test_nothing_outlives_serve(served, way):
    one = served[way]
    members = reaper.group_members(one.server_pid)
    assert one.server_pid in members and len(members) >= 1 + STUBS, "the stubs run in tritonserver's process group"
    assert len(one.regions) >= STUBS and all((reaper.SHM_DIR / name).exists() for name in one.regions)

    code = _end(one, way)
    if way == "SIGKILL":  # nobody ran the launcher's clean-up: tritonserver's parent-death signal and the reaper do
        assert code == -signal.SIGKILL
        deadline = time.monotonic() + REAPER_GRACE_SECONDS + 10
        while (reaper.is_alive(one.reaper_pid) or reaper.group_members(one.server_pid)) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
    else:  # the launcher's own clean-up has finished by the time it exits
        assert code == 0
    assert reaper.group_members(one.server_pid) == []
    assert [name for name in one.regions if (reaper.SHM_DIR / name).exists()] == []
    assert not reaper.is_alive(one.reaper_pid)
