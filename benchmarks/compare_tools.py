"""Compare three load generators on one load against one server: our `tritonllm bench` (client.bench.run_level,
Python gRPC streaming), NVIDIA perf_analyzer 2.51 (C++, `--async --streaming`) and genai-perf 0.0.16 (perf_analyzer
driven, its own venv). The server's own /metrics are read around every run, so each row also says what the engine
saw: tokens generated and prompt tokens read (the load really was the same) and its mean TTFT / ITL.

    python benchmarks/compare_tools.py [--url HOST:GRPC_PORT --metrics-url HOST:PORT] [--requests 32]
        [--concurrency 1,8] [--output-tokens 64] [--min-prompt-tokens 100] [--max-prompt-tokens 200] [--out DIR]

Without --url a server is started on the bundled SmolLM2 build (fp32). genai-perf is found as client/genai_perf.py
says (`make genai-perf-setup`); without it the comparison runs the other two.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tritonllm.client.bench import first_error, run_level
from tritonllm.client.genai_perf import GenaiPerfError, genai_perf_binary, run_genai_perf
from tritonllm.client.peers import TritonStream
from tritonllm.client.perf import run_perf_analyzer, scrape_metrics, write_input_data
from tritonllm.python_backends.metrics import COUNTERS, FLUSH_INTERVAL_SECONDS, ITL, TTFT

ENGINE_COUNTERS = {
    "generated_tokens": COUNTERS["generation_tokens"].name, "prompt_tokens": COUNTERS["prompt_tokens"].name,
    "ttft_sum": f"{TTFT.name}_sum", "ttft_count": f"{TTFT.name}_count",
    "itl_sum": f"{ITL.name}_sum", "itl_count": f"{ITL.name}_count",
}


@dataclass
class ToolRow:
    """One tool at one level: its own measurement (`level`: a bench LevelResult, a PerfLevel or a ProfileLevel,
    which all carry concurrency, output_tokens_per_s, requests_per_s, ttft_s, itl_s, latency_s)."""

    tool: str
    requests: int  # answered requests
    level: Any
    server: dict[str, float] = field(default_factory=dict)  # what the engine counted during this run


def engine_counters(metrics_url: str) -> dict[str, float]:
    values = {sample.name: sample.value for sample in scrape_metrics(metrics_url)
              if sample.labels.get("model") == "engine"}
    return {key: values[name] for key, name in ENGINE_COUNTERS.items()}


def server_view(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    moved = {key: after[key] - before[key] for key in before}
    return {"generated_tokens": moved["generated_tokens"], "prompt_tokens": moved["prompt_tokens"],
            "ttft_mean_s": moved["ttft_sum"] / max(moved["ttft_count"], 1),
            "itl_mean_s": moved["itl_sum"] / max(moved["itl_count"], 1)}


def measure(tool: str, concurrency: int, metrics_url: str, run) -> ToolRow:
    """Run one tool at one level; the engine's counters are read around it, each time after a wait for their flush
    (so an earlier run or the warm-up is not counted in this one)."""
    time.sleep(2 * FLUSH_INTERVAL_SECONDS)
    before = engine_counters(metrics_url)
    row = run()
    time.sleep(2 * FLUSH_INTERVAL_SECONDS)
    row.server = server_view(before, engine_counters(metrics_url))
    print(f"  {tool:13s} c={concurrency}: {row.level.output_tokens_per_s:7.1f} out tok/s, "
          f"TTFT p50 {row.level.ttft_s['p50']:.3f} s, engine saw {row.server['generated_tokens']:.0f} generated tokens", flush=True)
    return row


def compare(url: str, metrics_url: str, hf_dir: Path, prompts: list[str], levels: list[int], output_tokens: int,
            out_dir: Path, with_genai_perf: bool) -> list[ToolRow]:
    stream = TritonStream(url, name="tritonllm-bench")
    error = first_error(stream, prompts[0], 4)  # also warms the server up
    if error:
        raise SystemExit(f"the server failed a warm-up request: {error}")
    input_data = write_input_data(prompts, out_dir / "input_data.json", output_tokens)
    rows = []
    for level in levels:
        def bench() -> ToolRow:
            r = run_level(stream, prompts, output_tokens, level)
            return ToolRow("tritonllm bench", r.requests - r.errors, r)

        def perf_analyzer() -> ToolRow:
            [p] = run_perf_analyzer(url, "ensemble", input_data, [level], out_dir, len(prompts))
            return ToolRow("perf_analyzer", p.requests, p)

        def genai_perf() -> ToolRow:
            [g] = run_genai_perf(url, "ensemble", hf_dir, prompts, [level], len(prompts), output_tokens, out_dir)
            return ToolRow("genai-perf", g.requests, g)

        tools = [("tritonllm bench", bench), ("perf_analyzer", perf_analyzer)]
        tools += [("genai-perf", genai_perf)] if with_genai_perf else []
        rows += [measure(name, level, metrics_url, run) for name, run in tools]
    return rows


def table(rows: list[ToolRow]):
    from rich.table import Table

    result = Table(title="same load, three tools (client side | engine side)")
    for column in ("tool", "conc", "req", "out tok/s", "req/s", "TTFT p50", "TTFT p99", "ITL p50", "lat p50",
                   "lat p99", "engine gen tok", "engine prompt tok", "engine TTFT", "engine ITL"):
        result.add_column(column, justify="right")
    for r in rows:
        m = r.level
        result.add_row(r.tool, str(m.concurrency), str(r.requests), f"{m.output_tokens_per_s:.1f}",
                       f"{m.requests_per_s:.3f}", *(f"{v:.3f}" for v in (
                           m.ttft_s["p50"], m.ttft_s["p99"], m.itl_s["p50"], m.latency_s["p50"], m.latency_s["p99"])),
                       f"{r.server['generated_tokens']:.0f}", f"{r.server['prompt_tokens']:.0f}",
                       f"{r.server['ttft_mean_s']:.3f}", f"{r.server['itl_mean_s']:.3f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="gRPC host:port of a running server; default: start one here")
    parser.add_argument("--metrics-url", help="its /metrics (host:port or URL); needed with --url")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--min-prompt-tokens", type=int, default=100)
    parser.add_argument("--max-prompt-tokens", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("compare-results"))
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.url and not args.metrics_url:
        parser.error("--url needs --metrics-url (the engine-side columns come from it)")

    from transformers import AutoTokenizer

    from tritonllm.builders.pipeline import build
    from tritonllm.client.workload import synthetic_prompts

    built = build(model=None, precision="fp32")
    prompts = synthetic_prompts(AutoTokenizer.from_pretrained(built.hf_dir), args.requests, args.min_prompt_tokens,
                                args.max_prompt_tokens)
    try:
        genai_perf_binary()
        with_genai_perf = True
    except GenaiPerfError as error:
        print(f"skipping genai-perf: {error}")
        with_genai_perf = False
    server = None
    url, metrics_url = args.url, args.metrics_url
    if url is None:
        from tritonllm.server import TritonServer

        server = TritonServer(built.repository_dir).start()
        url, metrics_url = server.endpoints.grpc_url, server.endpoints.metrics_url
    try:
        rows = compare(url, metrics_url, built.hf_dir, prompts, levels, args.output_tokens, args.out, with_genai_perf)
    finally:
        if server is not None:
            server.stop()
    meta = {"requests": args.requests, "concurrency": levels, "output_tokens": args.output_tokens,
            "prompt_tokens": [args.min_prompt_tokens, args.max_prompt_tokens], "cpu_cores": os.cpu_count(),
            "load_average": os.getloadavg()}
    path = args.out / "compare_tools.json"
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(row) for row in rows]}, indent=2, default=str))
    from rich.console import Console

    Console(width=200).print(table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
