"""Load generator and report: N streamed requests at fixed output length, closed loop at each concurrency level.

Every system under test is a `Backend`: something that streams the tokens of one request. Triton is reached over
gRPC streaming with `tritonclient`; the peers (client/peers.py) run in this process. All see the same prompts and
output length in the same run, so their numbers compare side by side.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    name: str

    def stream(self, prompt: str, output_tokens: int) -> Iterator[float]:
        """Yield the `time.perf_counter()` at which each piece of new output arrived."""


@dataclass
class RequestRecord:
    start: float
    arrivals: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class LevelResult:
    system: str
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_s: dict[str, float]
    itl_s: dict[str, float]
    latency_s: dict[str, float]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "mean": float("nan")}
    array = np.asarray(values)
    return {"p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)),
            "p99": float(np.percentile(array, 99)), "mean": float(array.mean())}


def closed_loop(count: int, concurrency: int, handle: Callable[[int], None]) -> float:
    """Call `handle(index)` for every index below `count` on `concurrency` threads, each taking the next index as
    soon as its previous call returned (a closed-loop load); returns the wall time in seconds."""
    indexes = iter(range(count))
    lock = threading.Lock()

    def worker() -> None:
        while (index := _next(indexes, lock)) is not None:
            handle(index)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def _next(indexes: Iterator[int], lock: threading.Lock) -> int | None:
    with lock:
        return next(indexes, None)


def run_level(backend: Backend, prompts: list[str], output_tokens: int, concurrency: int) -> LevelResult:
    """Closed loop: `concurrency` workers each send the next prompt as soon as their previous request ends."""
    records: list[RequestRecord] = []
    lock = threading.Lock()

    def request(index: int) -> None:
        record = RequestRecord(time.perf_counter())
        try:
            record.arrivals.extend(backend.stream(prompts[index], output_tokens))
        except Exception as error:  # counted and reported, never hidden
            record.error = f"{type(error).__name__}: {error}"
        with lock:
            records.append(record)

    duration = closed_loop(len(prompts), concurrency, request)
    good = [r for r in records if r.error is None and r.arrivals]
    gaps = [b - a for r in good for a, b in zip(r.arrivals, r.arrivals[1:])]
    return LevelResult(
        system=backend.name, concurrency=concurrency, requests=len(records), errors=len(records) - len(good),
        duration_s=duration, output_tokens_per_s=len(good) * output_tokens / duration,
        requests_per_s=len(good) / duration, ttft_s=percentiles([r.arrivals[0] - r.start for r in good]),
        itl_s=percentiles(gaps), latency_s=percentiles([r.arrivals[-1] - r.start for r in good]))


def first_error(backend: Backend, prompt: str, output_tokens: int) -> str | None:
    """One request before measuring: a misconfigured system fails loudly instead of producing zeros."""
    try:
        arrivals = sum(1 for _ in backend.stream(prompt, output_tokens))
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None if arrivals else "no output"


def save_results(results: list[LevelResult], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench.json"
    json_path.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
    png_path = out_dir / "bench.png"
    plot_results(results, png_path, title=meta.get("title", ""))
    return json_path, png_path


def plot_results(results: list[LevelResult], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for system in dict.fromkeys(r.system for r in results):
        rows = sorted((r for r in results if r.system == system), key=lambda r: r.concurrency)
        tps = [r.output_tokens_per_s for r in rows]
        left.plot([r.latency_s["p50"] for r in rows], tps, marker="o", label=system)
        for r in rows:
            left.annotate(f"c{r.concurrency}", (r.latency_s["p50"], r.output_tokens_per_s), fontsize=7)
        right.plot([r.concurrency for r in rows], [r.ttft_s["p99"] for r in rows], marker="o", label=system)
    left.set(xlabel="request latency p50 (s)", ylabel="output tokens/s", title="throughput vs latency")
    right.set(xlabel="client concurrency", ylabel="TTFT p99 (s)", title="time to first token", yscale="log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(results: list[LevelResult]):
    from rich.table import Table

    table = Table(title="tritonllm bench")
    for column in ("system", "conc", "req", "err", "out tok/s", "req/s", "TTFT p50", "TTFT p99", "ITL p50",
                   "ITL p99", "lat p50", "lat p95", "lat p99"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r.system, str(r.concurrency), str(r.requests), str(r.errors), f"{r.output_tokens_per_s:.1f}",
                      f"{r.requests_per_s:.2f}", *(f"{v:.3f}" for v in (
                          r.ttft_s["p50"], r.ttft_s["p99"], r.itl_s["p50"], r.itl_s["p99"], r.latency_s["p50"],
                          r.latency_s["p95"], r.latency_s["p99"])))
    return table


def speedups(results: list[LevelResult], ours: str) -> dict[str, dict[int, float]]:
    """Output tokens/s of `ours` divided by each peer's, per concurrency level both ran."""
    by_key = {(r.system, r.concurrency): r.output_tokens_per_s for r in results}
    ratios: dict[str, dict[int, float]] = {}
    for (system, concurrency), tps in by_key.items():
        if system != ours and (ours, concurrency) in by_key and tps > 0:
            ratios.setdefault(system, {})[concurrency] = by_key[(ours, concurrency)] / tps
    return ratios



class BenchError(RuntimeError):
    """A system under test failed its warm-up request; nothing was measured."""


def _hf_sequential(hf_dir: str, threads: int | None) -> Backend:
    from tritonllm.client.peers import HFSequential

    return HFSequential(hf_dir, threads)


def _hf_static(hf_dir: str, threads: int | None) -> Backend:
    from tritonllm.client.peers import HFStaticBatching

    return HFStaticBatching(hf_dir, threads=threads)


# Peers `tritonllm bench --peers` may name -> constructor(hf_dir, threads) of a Backend (client/peers.py).
PEERS: dict[str, Callable[[str, int | None], Backend]] = {"hf-sequential": _hf_sequential, "hf-static": _hf_static}


@dataclass(frozen=True)
class BenchRun:
    results: list[LevelResult]
    meta: dict
    json_path: Path
    png_path: Path


def run(url: str | None = None, precision: str = "fp32", requests: int = 64, prompt_file: Path | None = None,
        min_prompt_tokens: int = 100, max_prompt_tokens: int = 200, output_tokens: int = 64,
        concurrency: Sequence[int] = (1, 8, 16), peers: Sequence[str] = ("hf-sequential", "hf-static"),
        peer_requests: int = 16, out: Path = Path("bench-results"), console: Any = None) -> BenchRun:
    """`tritonllm bench`: the deployment (at `url`, or the bundled build served here) and each peer get the same
    prompts at each concurrency level; writes bench.json and bench.png to `out`. Raises BenchError when a system
    fails its warm-up request, ValueError for out-of-range arguments."""
    import os

    from transformers import AutoTokenizer

    from tritonllm.client.deployment import bundled_build, served, status
    from tritonllm.client.peers import TritonStream
    from tritonllm.client.workload import load_prompt_file, synthetic_prompts

    levels = list(concurrency)
    if not levels or min(levels) < 1:
        raise ValueError(f"concurrency = {levels} is not allowed; allowed: levels >= 1")
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise ValueError(f"peers = {unknown} is not allowed; allowed: {', '.join(PEERS)}")
    built = bundled_build(precision, console)
    tokenizer = AutoTokenizer.from_pretrained(built.hf_dir)
    prompts = load_prompt_file(prompt_file) if prompt_file else synthetic_prompts(
        tokenizer, requests, min_prompt_tokens, max_prompt_tokens)
    prompts = (prompts * (requests // len(prompts) + 1))[:requests]
    results: list[LevelResult] = []
    with served(url, built.repository_dir, console) as grpc_url:
        systems: list[tuple[Backend, list[str]]] = [(TritonStream(grpc_url, name=f"tritonllm-onnx-{precision}"),
                                                     prompts)]
        for name in peers:
            with status(console, f"loading {name} ..."):
                systems.append((PEERS[name](str(built.hf_dir), os.cpu_count()), prompts[:peer_requests]))
        for system, system_prompts in systems:
            error = first_error(system, system_prompts[0], 4)
            if error:
                raise BenchError(f"{system.name} failed a warm-up request: {error}")
            for level in levels:
                with status(console, f"{system.name}: {len(system_prompts)} requests at concurrency {level} ..."):
                    results.append(run_level(system, system_prompts, output_tokens, level))
                if console is not None:
                    console.print(results_table(results[-1:]))
    ours = systems[0][0].name
    meta = {"title": f"SmolLM2-135M, {requests} requests, prompts {min_prompt_tokens}-{max_prompt_tokens} tokens, "
                     f"{output_tokens} new tokens, greedy, {os.cpu_count()} CPU cores",
            "output_tokens": output_tokens, "concurrency": levels, "peer_requests": peer_requests,
            "prompt_tokens": [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]}
    meta["speedups"] = speedups(results, ours)
    json_path, png_path = save_results(results, meta, out)
    return BenchRun(results, meta, json_path, png_path)
