"""What the OpenAI gateway adds to a request and to each token, against the native ensemble over gRPC.

One tritonserver (`tritonllm.server.TritonServer`) and one gateway in its own process (`tritonllm gateway`, as a
deployment runs it: its event loop never shares a GIL with the load generator) on 127.0.0.1; the same prompts go to
the ensemble over gRPC streaming (`client.peers.TritonStream`) and to the gateway's `/v1/completions` over SSE
(`client.peers.OpenAICompletionsStream`), output length forced (`min_tokens` natively, `ignore_eos` through the
gateway), greedy, closed loop at each concurrency (`client.bench.run_level`). Native and gateway runs alternate,
`--repeats` times; overhead per request = median over repeats of (gateway TTFT p50 - native TTFT p50), per token =
the same for ITL p50. Wall-clock differences drown in noise on a busy 2-core machine, so the gateway's own CPU time
is measured too (its process's utime + stime from /proc, which other load does not inflate much): per request from
requests of 1 new token, per token from the extra CPU of requests of `--output-tokens` new tokens. On an idle core a
request's added latency is about that CPU time plus one localhost hop.

The paired measurement (`--pairs`, on by default) takes the drift between runs out: each prompt goes to both sides
back to back at concurrency 1, which one first alternating, and the overhead is the median over pairs of (gateway -
native) TTFT and of (gateway - native) median ITL, with a 95% bootstrap interval of that median.

With `--aiperf`, NVIDIA AIPerf (`make aiperf-setup`; client/aiperf.py) then measures the same two sides with one
tool, alternating, `--repeats` times: the gateway's `/v1/chat/completions` and Triton's own
`/v2/models/ensemble/generate_stream`, both SSE, the chat template applied on both (by the gateway; by the ensemble).

    .venv/bin/python benchmarks/gateway_overhead.py [--repository DIR] [--requests 32] [--concurrency 1,8] [--aiperf]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from peers import start_server, stop_server, wait_ready

from tritonllm.client.aiperf import gateway_chat_target, run_aiperf, triton_generate_target
from tritonllm.client.bench import results_table, run_level
from tritonllm.client.deployment import bundled_build
from tritonllm.client.peers import OpenAICompletionsStream, TritonStream
from tritonllm.client.workload import synthetic_prompts
from tritonllm.gateway.tokens import repository_tokenizer_dir
from tritonllm.server import TritonServer, free_port

SERVED_NAME = "smollm2"  # the name peers.wait_ready looks for in /v1/models


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (and of its reaped children), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def gateway_cpu(gateway_pid: int, system: OpenAICompletionsStream, prompts: list[str], output_tokens: int
                ) -> dict[str, float]:
    """The gateway's CPU milliseconds per request (1-token requests) and per further token."""
    spent = {}
    for tokens in (1, output_tokens):
        before = process_cpu_seconds(gateway_pid)
        run_level(system, [f"(cpu, {tokens}) {prompt}" for prompt in prompts], tokens, 1)
        spent[tokens] = 1000 * (process_cpu_seconds(gateway_pid) - before) / len(prompts)
    return {"cpu_ms_per_request": spent[1],
            "cpu_ms_per_token": (spent[output_tokens] - spent[1]) / (output_tokens - 1)}


def p50_overhead(native: list, through: list) -> dict[str, float]:
    """Median over paired runs of what the gateway adds to TTFT, ITL and request latency p50, in milliseconds."""
    def added(metric: str) -> float:
        return statistics.median(1000 * (getattr(g, metric)["p50"] - getattr(n, metric)["p50"])
                                 for n, g in zip(native, through))

    return {"per_request_ms": added("ttft_s"), "per_token_ms": added("itl_s"), "latency_ms": added("latency_s")}


def paired_overhead(native, through, prompts: list[str], output_tokens: int, resamples: int = 2000
                    ) -> dict[str, dict[str, float]]:
    """Each prompt to both systems back to back (which first alternates); per pair the added TTFT and the added
    median ITL, in ms: their medians with a 95% bootstrap interval."""
    import numpy as np

    added_ttft, added_itl = [], []
    for index, prompt in enumerate(prompts):
        order = (native, through) if index % 2 == 0 else (through, native)
        arrivals = {}
        for system in order:
            start = time.perf_counter()
            times = list(system.stream(f"(pair {index}, {system.name}) {prompt}", output_tokens))
            arrivals[system.name] = (times[0] - start, statistics.median(np.diff(times)))
        (native_ttft, native_itl), (gateway_ttft, gateway_itl) = arrivals[native.name], arrivals[through.name]
        added_ttft.append(1000 * (gateway_ttft - native_ttft))
        added_itl.append(1000 * (gateway_itl - native_itl))
    generator = np.random.default_rng(0)

    def summary(values: list[float]) -> dict[str, float]:
        array = np.asarray(values)
        medians = np.median(generator.choice(array, (resamples, len(array))), axis=1)
        return {"median_ms": float(np.median(array)), "ci95_low_ms": float(np.percentile(medians, 2.5)),
                "ci95_high_ms": float(np.percentile(medians, 97.5)), "pairs": len(array)}

    return {"per_request": summary(added_ttft), "per_token": summary(added_itl)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="rendered repository; default: the bundled fp32 build")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=128,
                        help="prompts sent to both sides back to back at concurrency 1 (0: none)")
    parser.add_argument("--aiperf", action="store_true", help="also measure both sides with AIPerf")
    parser.add_argument("--out", type=Path, default=Path("bench-results/gateway_overhead.json"))
    args = parser.parse_args()
    repository = args.repository or bundled_build("fp32").repository_dir
    from transformers import AutoTokenizer

    prompts = synthetic_prompts(AutoTokenizer.from_pretrained(repository_tokenizer_dir(repository)), args.requests,
                                100, 200)
    levels = [int(level) for level in args.concurrency.split(",")]
    port = free_port()
    with TritonServer(repository) as triton:
        # the ensemble on both sides: the same path, the gateway in front or not
        gateway = start_server([str(Path(sys.executable).parent / "tritonllm"), "gateway",
                                "--triton", triton.endpoints.grpc_url, "--repository", str(repository),
                                "--model", "ensemble", "--served-model-name", SERVED_NAME, "--port", str(port)],
                               env=dict(os.environ), log_path=Path("bench-results/gateway_overhead-gateway.log"))
        try:
            base_url = f"http://127.0.0.1:{port}"
            wait_ready(gateway, base_url, Path("bench-results/gateway_overhead-gateway.log"), 120)
            systems = [TritonStream(triton.endpoints.grpc_url, name="ensemble-grpc"),
                       OpenAICompletionsStream(base_url, SERVED_NAME, name="gateway-openai",
                                               extra_body={"stream_options": None})]  # usage: re-encoded count
            for system in systems:  # warm-up: first requests load kernels and open connections
                list(system.stream(prompts[0], 4))
            # A run-specific opening keeps the engine's prefix cache from serving one run the prompts of another.
            results = [run_level(system, [f"({system.name}, c{level}, r{repeat}) {prompt}" for prompt in prompts],
                                 args.output_tokens, level)
                       for repeat in range(args.repeats) for level in levels for system in systems]
            paired = paired_overhead(*systems, (prompts * (args.pairs // len(prompts) + 1))[:args.pairs],
                                     args.output_tokens) if args.pairs else None
            cpu = gateway_cpu(gateway.pid, systems[1], prompts, args.output_tokens)
            aiperf_levels = aiperf_runs(base_url, triton.endpoints.http_url, repository, prompts, levels, args) \
                if args.aiperf else []
        finally:
            stop_server(gateway)
    from rich.console import Console

    Console(width=160).print(results_table(results))
    overhead = {}
    for level in levels:
        native = [r for r in results if r.system == "ensemble-grpc" and r.concurrency == level]
        through = [r for r in results if r.system == "gateway-openai" and r.concurrency == level]
        overhead[level] = {
            **p50_overhead(native, through),
            "native_tok_s": statistics.median(n.output_tokens_per_s for n in native),
            "gateway_tok_s": statistics.median(g.output_tokens_per_s for g in through)}
        print(f"concurrency {level}: gateway adds {overhead[level]['per_request_ms']:+.2f} ms to TTFT p50, "
              f"{overhead[level]['per_token_ms']:+.3f} ms to ITL p50, {overhead[level]['latency_ms']:+.2f} ms to "
              f"request latency p50; {overhead[level]['native_tok_s']:.1f} -> {overhead[level]['gateway_tok_s']:.1f}"
              f" tok/s (medians of {args.repeats} alternating runs)")
    if paired:
        for metric, label in (("per_request", "TTFT"), ("per_token", "median ITL")):
            figure = paired[metric]
            print(f"paired at concurrency 1: the gateway adds {figure['median_ms']:+.3f} ms to {label} (median of "
                  f"{figure['pairs']} pairs; 95% interval {figure['ci95_low_ms']:+.3f} .. "
                  f"{figure['ci95_high_ms']:+.3f} ms)")
    print(f"gateway CPU: {cpu['cpu_ms_per_request']:.2f} ms per request, {cpu['cpu_ms_per_token']:.3f} ms per token "
          f"({len(prompts)} requests at concurrency 1)")
    aiperf_overhead = report_aiperf(aiperf_levels, levels, args.repeats) if aiperf_levels else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"overhead": overhead, "paired_overhead_c1": paired, "gateway_cpu": cpu,
                                    "results": [vars(r) for r in results], "aiperf_overhead": aiperf_overhead,
                                    "aiperf": [vars(level) | {"result_path": str(level.result_path)}
                                               for level in aiperf_levels]}, indent=2))
    print(f"wrote {args.out}")


def aiperf_runs(gateway_url: str, triton_http_url: str, repository: Path, prompts: list[str], levels: list[int],
                args: argparse.Namespace) -> list:
    """AIPerf on both sides, alternating, each level `--repeats` times (a run-specific opening per run, as above)."""
    out_dir = args.out.parent / "aiperf"
    targets = [triton_generate_target(triton_http_url, "ensemble", out_dir),
               gateway_chat_target(gateway_url, SERVED_NAME)]
    return [level for repeat in range(args.repeats) for concurrency in levels for target in targets
            for level in run_aiperf(target, repository_tokenizer_dir(repository),
                                    [f"({target.name}, c{concurrency}, r{repeat}) {prompt}" for prompt in prompts],
                                    [concurrency], len(prompts), args.output_tokens, out_dir / f"r{repeat}")]


def report_aiperf(aiperf_levels: list, levels: list[int], repeats: int) -> dict:
    from tritonllm.client.perf import perf_table
    from rich.console import Console

    Console(width=160).print(perf_table(aiperf_levels, "AIPerf (streaming SSE)"))
    overhead = {}
    for level in levels:
        native = [r for r in aiperf_levels if r.model.startswith("triton-") and r.concurrency == level]
        through = [r for r in aiperf_levels if r.model == "gateway-chat" and r.concurrency == level]
        overhead[level] = p50_overhead(native, through)
        print(f"AIPerf, concurrency {level}: the gateway's chat endpoint adds {overhead[level]['per_request_ms']:+.2f} "
              f"ms to TTFT p50 and {overhead[level]['per_token_ms']:+.3f} ms to ITL p50 against Triton's "
              f"generate_stream (medians of {repeats} alternating runs)")
    return overhead


if __name__ == "__main__":
    main()
