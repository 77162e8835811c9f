"""Nothing of a tritonserver outlives the command that started it: its process group and its Python stubs' memory.

tritonserver runs in its own session and process group (the launcher starts it so, and its Python backend stubs
inherit the group), so one `killpg` ends every process it started. Each stub names its shared-memory region on its
command line (`triton_python_backend_shm_region_<uuid>`); a stub that dies hard leaves that file in /dev/shm, so the
names are read from /proc while the stubs live and the files removed once the group is gone.

Two ways the clean-up runs:
- the launcher (`TritonServer.stop`) after tritonserver exits, or after it was killed for not exiting;
- this file run as a program (the *reaper*, `python -I reaper.py PID FD GRACE`), which the launcher starts next to
  tritonserver in a session of its own, holding the read end of a pipe only the launcher writes to. When the pipe
  closes (the launcher is gone: kill -9, a crash, or it finished its own clean-up) the reaper asks tritonserver to
  stop (SIGTERM: it drains and unloads its models), waits `GRACE` seconds, then kills what is left of the group and
  removes the regions. It ignores SIGINT, SIGHUP and SIGTERM (a Ctrl-C or a signal meant for the launcher must not
  cut the launcher's own orderly stop short) and exits by itself once tritonserver and its group are gone.

Standard library only: the reaper runs in isolated mode (`-I`), whatever the environment.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
POLL_SECONDS = 1.0  # how often the reaper reads the group's region names


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, pgid, session, start time in clock ticks) of a live or zombie process; None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
    return fields[0], int(fields[2]), int(fields[3]), int(fields[19])


def start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[3]


def is_alive(pid: int, started: int | None = None) -> bool:
    """`pid` runs (a zombie does not), and is the process that started at `started` when that is given."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and (started is None or stat[3] == started)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid` that also belong to session `pgid`: tritonserver leads
    both, so a group that a reused number might name in another session is never touched."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[2] == pgid and stat[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def shm_regions(pids: Iterable[int]) -> set[str]:
    """Names of the Python-backend shared-memory regions on the command lines of `pids` (the stubs')."""
    names = set()
    for pid in pids:
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for argument in arguments:
            name = argument.decode(errors="replace")
            if name.startswith(SHM_PREFIX) and "/" not in name:
                names.add(name)
    return names


def remove_regions(names: Iterable[str]) -> list[str]:
    """Unlink the named regions from /dev/shm; returns those it removed."""
    removed = []
    for name in names:
        try:
            (SHM_DIR / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError:  # not ours to remove (another user's): leave it
            pass
    return removed


def kill_group(pgid: int, wait_seconds: float = 5.0) -> bool:
    """SIGKILL every live process of the group (if any), then wait until none runs; True when the group is empty."""
    if group_members(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + wait_seconds
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _reap(pid: int, started: int, pipe: int, grace: float) -> None:
    regions: set[str] = set()
    poller = select.poll()
    poller.register(pipe, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        regions |= shm_regions(group_members(pid))
        if not is_alive(pid, started) and not group_members(pid):
            break  # tritonserver and everything it started are gone: only their regions are left to remove
        if poller.poll(POLL_SECONDS * 1000):
            try:
                if os.read(pipe, 4096):
                    continue  # the launcher wrote something: it still lives
            except OSError:
                pass
            # End of file: the launcher is gone (or done); stop tritonserver as SIGTERM would have.
            if is_alive(pid, started):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while is_alive(pid, started) and time.monotonic() < deadline:
                regions |= shm_regions(group_members(pid))
                time.sleep(0.2)
            break
    regions |= shm_regions(group_members(pid))
    kill_group(pid)
    remove_regions(regions)


def main(argv: list[str]) -> int:
    """`reaper.py PID FD GRACE`: PID leads the group to reap, FD is the pipe's read end, GRACE seconds to wait."""
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    pid, pipe, grace = int(argv[0]), int(argv[1]), float(argv[2])
    started = start_time(pid)
    _reap(pid, -1 if started is None else started, pipe, grace)  # -1: gone already, never signal that number
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
