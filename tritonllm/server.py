"""Find a tritonserver, prepare its backend folder and environment, start it, wait until ready, stop it cleanly.

Where tritonserver comes from, in order: `$TRITONSERVER` (path to the binary), an NGC container's
`/opt/tritonserver`, or the build bundled in the nvidia-pytriton wheel (CPU; see DESIGN.md for its quirks).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from tritonllm.contract import ENSEMBLE_URL_ENVIRONMENT
from tritonllm.paths import cache_dir

NGC_ROOT = Path("/opt/tritonserver")
# How long tritonserver waits for open connections and in-flight requests on SIGTERM before unloading models anyway
# (its default is 30 s; an idle HTTP keep-alive connection alone holds it that long).
EXIT_TIMEOUT_SECONDS = 10


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
    backend_dir = cache_dir() / f"triton-backends-py{version}"
    python_dir = backend_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in [*(server_root / "backends" / "python").glob("*.*"), stub]:
        link = python_dir / source.name
        if not link.exists() or link.resolve() != source.resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(source)
    # The stub links Debian's libpython; this interpreter's own lib/ first gives a matching runtime.
    libs = [str(Path(sys.base_prefix) / "lib"), str(site_packages / "nvidia_pytriton.libs")]
    if os.environ.get("LD_LIBRARY_PATH"):
        libs.append(os.environ["LD_LIBRARY_PATH"])
    env = _python_env() | {"LD_LIBRARY_PATH": os.pathsep.join(libs)}
    return TritonInstallation(binary, backend_dir, _existing(server_root / "caches"), env)


def live_group_members(group: int) -> list[int]:
    """Pids of the processes in process group `group` that still run (zombies waiting to be reaped excluded):
    tritonserver leads its own group, so these are it and its stubs."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            members.append(int(stat.parent.name))
    return members


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
                 log_verbose: int = 0, extra_args: list[str] | None = None) -> None:
        self.repository = Path(repository).resolve()
        self.endpoints = Endpoints(host, http_port or free_port(host), grpc_port or free_port(host),
                                   metrics_port or free_port(host))
        self.log_file = Path(log_file) if log_file else cache_dir() / "logs" / f"tritonserver-{os.getpid()}.log"
        self.response_cache_bytes = response_cache_bytes
        self.log_verbose = log_verbose
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None

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
        if self.response_cache_bytes and installation.cache_plugin_dir:
            args += [f"--cache-config=local,size={self.response_cache_bytes}",
                     f"--cache-directory={installation.cache_plugin_dir}"]
        return args + self.extra_args

    def start(self, timeout: float = 180.0) -> "TritonServer":
        if not (self.repository / "ensemble").is_dir() and not any(self.repository.glob("*/config.pbtxt")):
            raise ServerError(f"{self.repository} holds no model (run `tritonllm build` first)")
        installation = find_tritonserver()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "wb")
        # The front model streams cache misses from the ensemble over this server's gRPC port.
        env = os.environ | installation.env | {ENSEMBLE_URL_ENVIRONMENT: self.endpoints.grpc_url}
        # Own process group, so Ctrl-C in the terminal reaches us first and we shut the server down in order.
        self.process = subprocess.Popen(self.command(installation), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
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
        snapshot), SIGKILL only after `timeout`, well past Triton's own exit timeout."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
