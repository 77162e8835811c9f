"""Find a tritonserver, prepare its backend folder and environment, start it, wait until ready, stop it cleanly.

Where tritonserver comes from, in order: `$TRITONSERVER` (path to the binary), an NGC container's
`/opt/tritonserver`, or the build bundled in the nvidia-pytriton wheel (CPU; see DESIGN.md for its quirks).

Nothing it starts outlives it (see tritonllm/reaper.py): tritonserver leads its own session and process group, which
its Python stubs inherit; it gets SIGTERM when the thread that started it ends (a parent-death signal); a reaper
process watches the launcher and stops the group if the launcher dies without `stop()` (kill -9); and `stop()` kills
whatever of the group outlives tritonserver and removes the stubs' shared-memory files.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tritonllm import reaper
from tritonllm.contract import ENSEMBLE_URL_ENVIRONMENT
from tritonllm.paths import cache_dir, hold_cache_entry, link, links_folder

NGC_ROOT = Path("/opt/tritonserver")
# How long tritonserver waits for open connections and in-flight requests on SIGTERM before unloading models anyway
# (its default is 30 s; an idle HTTP keep-alive connection alone holds it that long).
EXIT_TIMEOUT_SECONDS = 10
# How long the reaper lets tritonserver drain and unload (finalize) after the launcher died, before it kills the group.
REAPER_GRACE_SECONDS = EXIT_TIMEOUT_SECONDS + 30
PR_SET_PDEATHSIG = 1  # prctl(2)

# Triton APIs only a client that sends the admin key may call (tritonserver's --http-restricted-api and
# --grpc-restricted-protocol): model control and the repository index, the shared-memory registry (without this any
# client could register a Python stub's own IPC region as an I/O region), log settings and tracing. Inference,
# health, metadata, model configuration and statistics stay open: they change nothing, and perf_analyzer and
# genai-perf read configuration and statistics.
RESTRICTED_APIS: tuple[str, ...] = ("model-repository", "shared-memory", "logging", "trace")
ADMIN_HEADER = "tritonllm-admin-key"  # HTTP header; over gRPC Triton expects it as metadata with this prefix:
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"
ADMIN_KEY_ENVIRONMENT = "TRITONLLM_ADMIN_KEY"
_ADMIN_KEY = re.compile(r"[A-Za-z0-9._~+/-]{16,256}")  # what survives Triton's `<apis>:<key>=<value>` parsing


class ServerError(RuntimeError):
    """tritonserver could not be found or did not become ready; the message says why and where the log is."""


@dataclass(frozen=True)
class TritonInstallation:
    binary: Path
    backend_dir: Path
    cache_plugin_dir: Path | None
    env: dict[str, str] = field(default_factory=dict)


def find_tritonserver() -> TritonInstallation:
    explicit = os.environ.get("TRITONSERVER")
    if explicit:
        binary = Path(explicit)
        if not binary.is_file():
            raise ServerError(f"TRITONSERVER={explicit} is not a file")
        root = binary.resolve().parent.parent
        return TritonInstallation(binary, root / "backends", _existing(root / "caches"), _python_env())
    if (NGC_ROOT / "bin" / "tritonserver").is_file():
        return TritonInstallation(NGC_ROOT / "bin" / "tritonserver", NGC_ROOT / "backends",
                                  _existing(NGC_ROOT / "caches"), _python_env())
    return _pytriton_installation()


def _existing(path: Path) -> Path | None:
    return path if path.is_dir() else None


def _python_env() -> dict[str, str]:
    """Python backend stubs run the first `python3` on PATH in isolated mode: make it this environment's."""
    return {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _pytriton_installation() -> TritonInstallation:
    site_packages = Path(sysconfig.get_paths()["purelib"])
    server_root = site_packages / "pytriton" / "tritonserver"
    binary = server_root / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServerError("no tritonserver found: set TRITONSERVER, run in an NGC tritonserver container, or install "
                          "nvidia-pytriton==0.7.0 (`make setup`)")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    # tritonserver expects <backend_dir>/python/{libtriton_python.so, triton_python_backend_utils.py, stub}.
    backend_dir = links_folder(f"triton-backends-py{version}", server_root)
    python_dir = backend_dir / "python"
    python_dir.mkdir(exist_ok=True)
    for source in [*(server_root / "backends" / "python").glob("*.*"), stub]:
        link(python_dir, source.name, source)
    # The stub links Debian's libpython; this interpreter's own lib/ first gives a matching runtime.
    libs = [str(Path(sys.base_prefix) / "lib"), str(site_packages / "nvidia_pytriton.libs")]
    if os.environ.get("LD_LIBRARY_PATH"):
        libs.append(os.environ["LD_LIBRARY_PATH"])
    env = _python_env() | {"LD_LIBRARY_PATH": os.pathsep.join(libs)}
    return TritonInstallation(binary, backend_dir, _existing(server_root / "caches"), env)


def _parent_death_signal() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send the child SIGTERM when this thread ends (prctl PR_SET_PDEATHSIG), so
    tritonserver stops even when the launcher is killed with SIGKILL. The signal follows the *thread* that forks:
    only the main thread (which lives as long as the process) sets it; the reaper covers the other cases."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the launcher died before the signal was armed
            os._exit(1)

    return set_signal


def admin_key_or_default(key: str | None) -> str:
    """`key`, else $TRITONLLM_ADMIN_KEY, else a random key; ServerError when it is not a usable key."""
    key = key or os.environ.get(ADMIN_KEY_ENVIRONMENT) or secrets.token_urlsafe(32)
    if not _ADMIN_KEY.fullmatch(key):
        raise ServerError(f"the admin key (--admin-key or ${ADMIN_KEY_ENVIRONMENT}) is not allowed; allowed: 16 to "
                          "256 characters of A-Z a-z 0-9 . _ ~ + / -")
    return key


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Endpoints:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


class TritonServer:
    """A running tritonserver process serving one model repository; use as a context manager."""

    def __init__(self, repository: Path, host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0,
                 metrics_port: int = 0, log_file: Path | None = None, response_cache_bytes: int = 0,
                 log_verbose: int = 0, extra_args: list[str] | None = None, admin_key: str | None = None,
                 restricted_apis: tuple[str, ...] = RESTRICTED_APIS) -> None:
        """`admin_key` (default: $TRITONLLM_ADMIN_KEY, else a random key for this run, kept in this object only)
        unlocks `restricted_apis`; `admin_headers()` are the headers a client sends with it."""
        self.repository = Path(repository).resolve()
        self.admin_key = admin_key_or_default(admin_key)
        self.restricted_apis = tuple(restricted_apis)
        self.endpoints = Endpoints(host, http_port or free_port(host), grpc_port or free_port(host),
                                   metrics_port or free_port(host))
        self.log_file = Path(log_file) if log_file else cache_dir() / "logs" / f"tritonserver-{os.getpid()}.log"
        self.response_cache_bytes = response_cache_bytes
        self.log_verbose = log_verbose
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None
        self._reaper: subprocess.Popen | None = None
        self._reaper_pipe: int | None = None  # write end; closing it (or dying) tells the reaper to clean up
        self._regions: set[str] = set()  # shared-memory regions the stubs of this server were seen using

    def command(self, installation: TritonInstallation) -> list[str]:
        ep = self.endpoints
        args = [str(installation.binary), f"--model-repository={self.repository}",
                f"--backend-directory={installation.backend_dir}",
                f"--http-address={ep.host}", f"--http-port={ep.http_port}",
                f"--grpc-address={ep.host}", f"--grpc-port={ep.grpc_port}",
                f"--metrics-address={ep.host}", f"--metrics-port={ep.metrics_port}",
                "--allow-metrics=true", "--exit-on-error=true", "--strict-readiness=true",
                f"--exit-timeout-secs={EXIT_TIMEOUT_SECONDS}",
                f"--log-verbose={self.log_verbose}"]
        if self.restricted_apis:
            restricted = f"{','.join(self.restricted_apis)}:{ADMIN_HEADER}={self.admin_key}"
            args += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        if self.response_cache_bytes and installation.cache_plugin_dir:
            args += [f"--cache-config=local,size={self.response_cache_bytes}",
                     f"--cache-directory={installation.cache_plugin_dir}"]
        return args + self.extra_args

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        """Headers (HTTP) or metadata (gRPC, tritonclient's `headers=`) that unlock the restricted APIs."""
        name = ADMIN_HEADER if protocol == "http" else GRPC_RESTRICTED_PREFIX + ADMIN_HEADER
        return {name: self.admin_key}

    def start(self, timeout: float = 180.0, stop: threading.Event | None = None) -> "TritonServer":
        """Start tritonserver and wait until it is ready, or until `stop` is set (then the caller stops it)."""
        if not (self.repository / "ensemble").is_dir() and not any(self.repository.glob("*/config.pbtxt")):
            raise ServerError(f"{self.repository} holds no model (run `tritonllm build` first)")
        installation = find_tritonserver()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "wb")
        # The front model streams cache misses from the ensemble over this server's gRPC port.
        env = os.environ | installation.env | {ENSEMBLE_URL_ENVIRONMENT: self.endpoints.grpc_url}
        # Own session and process group (the stubs inherit it): Ctrl-C in the terminal reaches us first and we shut
        # the server down in order, and one killpg ends every process it started.
        # tritonserver inherits a lock on the build it serves, so the build cache's budget never evicts it.
        build_lock = hold_cache_entry(self.repository)
        try:
            self.process = subprocess.Popen(self.command(installation), stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True, preexec_fn=_parent_death_signal(),
                                            pass_fds=() if build_lock is None else (build_lock,))
        finally:
            log.close()
            if build_lock is not None:
                os.close(build_lock)
        self._start_reaper()
        self._wait_ready(timeout, stop)
        self._remember_regions()
        return self

    def _start_reaper(self) -> None:
        """The reaper (tritonllm/reaper.py) in a session of its own, holding the read end of a pipe only this
        process writes to: when this process dies, the pipe closes and the reaper stops tritonserver's group."""
        read_end, write_end = os.pipe()  # both non-inheritable: no other child of ours holds the write end
        try:
            with open(self.log_file, "ab") as log:
                self._reaper = subprocess.Popen(
                    [sys.executable, "-I", reaper.__file__, str(self.process.pid), str(read_end),
                     str(REAPER_GRACE_SECONDS)], pass_fds=(read_end,), start_new_session=True,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._reaper_pipe = write_end

    def _remember_regions(self) -> None:
        if self.process is not None:
            self._regions |= reaper.shm_regions(reaper.group_members(self.process.pid))

    def _wait_ready(self, timeout: float, stop: threading.Event | None = None) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return
            if self.process.poll() is not None:
                self.stop()  # stubs it started may still run
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while loading; "
                                  f"log: {self.log_file}\n{self.log_tail()}")
            # A fresh client each time, closed at once: an idle keep-alive connection would hold tritonserver's
            # shutdown for its whole exit timeout, after which models are not unloaded (no finalize, no snapshot).
            client = httpclient.InferenceServerClient(self.endpoints.http_url)
            try:
                if client.is_server_ready():
                    return
            except Exception:  # not listening yet
                pass
            finally:
                client.close()
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s; log: {self.log_file}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stub_pids(self, model: str) -> list[int]:
        """The Python-backend stub processes of `model` this tritonserver started (for diagnosis and fault tests)."""
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == self.process.pid and any(part.endswith(f"/{model}/1/model.py".encode()) for part in cmdline):
                pids.append(int(entry.name))
        return pids

    def stop(self, timeout: float = EXIT_TIMEOUT_SECONDS + 60.0) -> int | None:
        """SIGTERM (Triton drains in-flight requests, then unloads models: finalize() runs, e.g. the cache's last
        snapshot), SIGKILL of the whole group only after `timeout`, well past Triton's own exit timeout. Then what
        is left of the group (a stub that outlived tritonserver) is killed, the stubs' shared-memory files are
        removed and the reaper is let go. Safe to call again."""
        if self.process is None:
            return None
        self._remember_regions()  # while the stubs still run: their command lines name their regions
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    reaper.kill_group(self.process.pid)
                    self.process.wait()
        finally:
            reaper.kill_group(self.process.pid)
            reaper.remove_regions(self._regions)
            self._release_reaper()
        return self.process.returncode

    def _release_reaper(self) -> None:
        if self._reaper_pipe is not None:
            os.close(self._reaper_pipe)
            self._reaper_pipe = None
        if self._reaper is not None:
            try:
                self._reaper.wait(10)  # the group is gone: it finds nothing to do and exits
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
