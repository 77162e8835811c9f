"""Run NVIDIA perf_analyzer (from the tritonclient 2.51 wheel) against our streaming models, and read its results.

What perf_analyzer 2.51 reports for a decoupled model (`--async --streaming -i grpc`), checked against our ensemble:
- the CSV (`-f`) has one row per concurrency: `Inferences/Second` (requests/s), `Response Throughput` (responses/s;
  one response per token when streaming) and `p50/p90/p95/p99 latency` in microseconds. Despite its log line
  "using the first response for measuring latency", these latencies are request latencies (send -> last response).
  There is no first-token column.
- the profile export (`--profile-export-file`) holds every request's send time and response times (ns): time to first
  token and inter-token latency are computed from it here, as genai-perf does.
`--request-count N` sends exactly N requests per level (no stability windows), so short runs give usable numbers.

The wheel's binary needs `libb64.so.0d` and `libcudart.so.12`; the nvidia-pytriton wheel carries both under hashed
names, so we link them under their real names into a cache folder put on LD_LIBRARY_PATH (even on a CPU machine
perf_analyzer loads libcudart; it never calls it unless asked for CUDA shared memory).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tritonllm.client.bench import percentiles
from tritonllm.paths import link, links_folder

_LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}
PERF_MODELS = ("ensemble", "llm")
LLM_CACHE_MODES = ("bypass", "use")


class PerfAnalyzerError(RuntimeError):
    pass


def perf_analyzer_binary() -> Path:
    found = Path(sys.executable).parent / "perf_analyzer"
    if found.is_file():
        return found
    on_path = shutil.which("perf_analyzer")
    if on_path:
        return Path(on_path)
    raise PerfAnalyzerError("perf_analyzer not found: install tritonclient[all]==2.51.0 (the `perf-analyzer` "
                            "package on PyPI is an empty placeholder)")


def perf_analyzer_libraries() -> Path:
    """A folder holding the shared libraries perf_analyzer needs under the names it looks for."""
    libs = Path(sysconfig.get_paths()["purelib"]) / "nvidia_pytriton.libs"
    folder = links_folder("perf-analyzer-libs", libs)
    for name, pattern in _LIBRARIES.items():
        candidates = sorted(libs.glob(pattern))
        if candidates:
            link(folder, name, candidates[0])
    return folder


def perf_analyzer_env(path_first: Path | None = None) -> dict[str, str]:
    """This environment with perf_analyzer's libraries on LD_LIBRARY_PATH (and `path_first` first on PATH)."""
    paths = [str(perf_analyzer_libraries())] + ([os.environ["LD_LIBRARY_PATH"]] if os.environ.get("LD_LIBRARY_PATH")
                                                 else [])
    env = os.environ | {"LD_LIBRARY_PATH": os.pathsep.join(paths)}
    if path_first is not None:
        env["PATH"] = f"{path_first}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_input_data(prompts: list[str], path: Path, output_tokens: int, fixed_length: bool = True,
                     llm_cache: str | None = None) -> Path:
    """perf_analyzer `--input-data` JSON: one entry per prompt, tensors named as in the ensemble contract.

    `fixed_length` forces exactly `output_tokens` new tokens (min_tokens = max_tokens), as benchmarks "ignore eos";
    `llm_cache` adds the front model's `cache` input (bypass measures generation, use lets repeats hit the cache).
    """
    if not prompts:
        raise ValueError("write_input_data needs at least one prompt")
    if llm_cache is not None and llm_cache not in LLM_CACHE_MODES:
        raise ValueError(f"llm_cache = {llm_cache!r} is not allowed; allowed: {', '.join(LLM_CACHE_MODES)}")
    entries = []
    for prompt in prompts:
        entry = {"text_input": [prompt], "max_tokens": [output_tokens], "stream": [True]}
        if fixed_length:
            entry["min_tokens"] = [output_tokens]
        if llm_cache is not None:
            entry["cache"] = [llm_cache]
        entries.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": entries}))
    return path


@dataclass
class PerfLevel:
    model: str
    concurrency: int
    requests: int
    requests_per_s: float  # CSV Inferences/Second
    output_tokens_per_s: float  # CSV Response Throughput (responses/s): one streamed response per token
    latency_s: dict[str, float]  # CSV p50/p90/p95/p99 (send -> last response)
    ttft_s: dict[str, float]  # from the profile export
    itl_s: dict[str, float]  # from the profile export
    csv_path: Path
    export_path: Path


def perf_analyzer_command(url: str, model: str, input_data: Path, concurrency: int, csv_path: Path,
                          export_path: Path, request_count: int) -> list[str]:
    # Decoupled models answer only on a gRPC stream: --async --streaming -i grpc.
    return [str(perf_analyzer_binary()), "-m", model, "-u", url, "-i", "grpc", "--async", "--streaming",
            "--input-data", str(input_data), "--concurrency-range", f"{concurrency}:{concurrency}",
            "--request-count", str(request_count), "-f", str(csv_path), "--profile-export-file", str(export_path)]


def run_perf_analyzer(url: str, model: str, input_data: Path, levels: list[int], out_dir: Path,
                      request_count: int) -> list[PerfLevel]:
    """One perf_analyzer run per concurrency level; CSV, profile export and log land in `out_dir`."""
    if not levels or min(levels) < 1 or request_count < max(levels):
        raise ValueError(f"concurrency levels {levels} must be >= 1 and at most the request count {request_count}")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for concurrency in levels:
        stem = out_dir / f"perf_analyzer_{model}_c{concurrency}"
        csv_path, export_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
        command = perf_analyzer_command(url, model, input_data, concurrency, csv_path, export_path, request_count)
        done = subprocess.run(command, env=perf_analyzer_env(), capture_output=True, text=True)
        stem.with_suffix(".log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise PerfAnalyzerError(f"perf_analyzer exited with {done.returncode} (log: {stem}.log):\n"
                                    f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        results.append(parse_perf_results(model, csv_path, export_path))
    return results


def parse_perf_csv(csv_path: Path) -> dict[str, float]:
    """perf_analyzer's CSV row (the first; one per concurrency) as numbers; latencies stay in microseconds."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise PerfAnalyzerError(f"{csv_path} holds no measurement")
    needed = ("Concurrency", "Inferences/Second", "Response Throughput", "p50 latency", "p90 latency",
              "p95 latency", "p99 latency")
    missing = [column for column in needed if column not in rows[0]]
    if missing:
        raise PerfAnalyzerError(f"{csv_path} lacks the columns {missing}; has {list(rows[0])}")
    return {column: float(rows[0][column]) for column in needed}


def stream_timings(export_path: Path) -> tuple[list[float], list[float], int]:
    """(first-token seconds, inter-token seconds, requests) of every request in a profile export."""
    data = json.loads(Path(export_path).read_text())
    first, gaps, requests = [], [], 0
    for experiment in data["experiments"]:
        for request in experiment["requests"]:
            arrivals = request["response_timestamps"]
            requests += 1
            if not arrivals:
                continue
            first.append((arrivals[0] - request["timestamp"]) / 1e9)
            gaps.extend((later - earlier) / 1e9 for earlier, later in zip(arrivals, arrivals[1:]))
    return first, gaps, requests


def parse_perf_results(model: str, csv_path: Path, export_path: Path) -> PerfLevel:
    row = parse_perf_csv(csv_path)
    first, gaps, requests = stream_timings(export_path)
    return PerfLevel(model=model, concurrency=int(row["Concurrency"]), requests=requests,
                     requests_per_s=row["Inferences/Second"], output_tokens_per_s=row["Response Throughput"],
                     latency_s={p: row[f"{p} latency"] / 1e6 for p in ("p50", "p90", "p95", "p99")},
                     ttft_s=percentiles(first), itl_s=percentiles(gaps), csv_path=csv_path, export_path=export_path)


def save_perf_results(levels: list[PerfLevel], meta: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "levels": [asdict(level) for level in levels]}, indent=2, default=str))
    return path


def perf_table(levels: list, title: str = "perf_analyzer (streaming)"):
    """A rich table of PerfLevel (or genai_perf.ProfileLevel: the same fields) rows."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("model", "conc", "req", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
                   "lat p50", "lat p99"):
        table.add_column(column, justify="right")
    for level in levels:
        table.add_row(level.model, str(level.concurrency), str(level.requests), f"{level.requests_per_s:.2f}",
                      f"{level.output_tokens_per_s:.1f}", *(f"{value:.3f}" for value in (
                          level.ttft_s["p50"], level.ttft_s["p99"], level.itl_s["p50"], level.itl_s["p99"],
                          level.latency_s["p50"], level.latency_s["p99"])))
    return table


# ---- Prometheus /metrics ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricSample:
    name: str
    labels: dict[str, str]
    value: float


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[MetricSample]:
    """Samples of a Prometheus text exposition (comments skipped; label values unescaped)."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        pairs = {key: re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], raw)
                 for key, raw in _LABEL.findall(labels or "")}
        samples.append(MetricSample(name, pairs, float(value)))
    return samples


def scrape_metrics(metrics_url: str, timeout: float = 10.0) -> list[MetricSample]:
    """Read Triton's /metrics: a URL (e.g. `TritonServer.endpoints.metrics_url`) or host:port."""
    url = metrics_url if "://" in metrics_url else f"http://{metrics_url}"
    if not urllib.parse.urlsplit(url).path.strip("/"):
        url = url.rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse_metrics(response.read().decode())


TOOLS = ("perf_analyzer", "genai-perf")


@dataclass(frozen=True)
class PerfRun:
    results: list
    meta: dict
    json_path: Path


def run(url: str | None = None, tool: str = "perf_analyzer", models: Sequence[str] = PERF_MODELS,
        concurrency: Sequence[int] = (1, 8), requests: int = 32, prompt_file: Path | None = None,
        min_prompt_tokens: int = 100, max_prompt_tokens: int = 200, output_tokens: int = 64,
        llm_cache: str = "bypass", tokenizer: Path | None = None, precision: str = "fp32",
        out: Path = Path("perf-results"), console: Any = None) -> PerfRun:
    """`tritonllm perf`: each model at each concurrency level with NVIDIA's tool, against `url` or the bundled build
    served here; writes the tool's outputs and perf.json to `out`. Raises PerfAnalyzerError / GenaiPerfError when
    the tool fails, ValueError for arguments out of range."""
    from tritonllm.client.deployment import bundled_build, served, status
    from tritonllm.client.genai_perf import run_genai_perf
    from tritonllm.client.workload import load_prompt_file, synthetic_prompts

    levels = list(concurrency)
    if tool not in TOOLS:
        raise ValueError(f"tool = {tool!r} is not allowed; allowed: {', '.join(TOOLS)}")
    if not models or set(models) - set(PERF_MODELS):
        raise ValueError(f"models = {list(models)} is not allowed; allowed: {', '.join(PERF_MODELS)}")
    if not levels or min(levels) < 1 or requests < max(levels):
        raise ValueError(f"concurrency = {levels} is not allowed; allowed: levels >= 1 and at most requests "
                         f"({requests})")
    if llm_cache not in LLM_CACHE_MODES:
        raise ValueError(f"llm_cache = {llm_cache!r} is not allowed; allowed: {', '.join(LLM_CACHE_MODES)}")
    built = bundled_build(precision, console) if url is None or tokenizer is None else None
    tokenizer = tokenizer or built.hf_dir
    if prompt_file is not None:
        prompts = load_prompt_file(prompt_file)
    else:
        from transformers import AutoTokenizer

        prompts = synthetic_prompts(AutoTokenizer.from_pretrained(tokenizer), requests, min_prompt_tokens,
                                    max_prompt_tokens)
    results: list = []
    with served(url, built.repository_dir if built else None, console) as grpc_url:
        for model in models:
            cache = llm_cache if model == "llm" else None
            input_data = out / f"input_data_{model}.json"
            if tool == "perf_analyzer":
                write_input_data(prompts, input_data, output_tokens, llm_cache=cache)
            for level in levels:
                with status(console, f"{tool}: {model}, {requests} requests at concurrency {level} ..."):
                    if tool == "genai-perf":
                        results += run_genai_perf(grpc_url, model, tokenizer, prompts, [level], requests,
                                                  output_tokens, out, extra_inputs={"cache": cache} if cache else None)
                    else:
                        results += run_perf_analyzer(grpc_url, model, input_data, [level], out, requests)
                if console is not None:
                    console.print(perf_table(results[-1:], tool))
    meta = {"tool": tool, "url": url or grpc_url, "requests": requests, "output_tokens": output_tokens,
            "concurrency": levels, "llm_cache": llm_cache,
            "prompts": str(prompt_file) if prompt_file else f"synthetic {min_prompt_tokens}-{max_prompt_tokens} tokens"}
    return PerfRun(results, meta, save_perf_results(results, meta, out / "perf.json"))
