"""Choose the engine's prefill policy by measurement: the serving engine in-process (no Triton), closed loop.

For each `prefill_chunk_tokens` budget (per step) and each concurrency, N requests of the benchmark workload
(prompts of 100-199 tokens, forced output length, greedy) run through `python_backends.engine.Engine` and report
output tokens/s, TTFT p50/p99 and ITL p50/p99. A small budget keeps running streams flowing (low ITL) but delays first
tokens; a large one prefills bursts of arrivals at once.

  python benchmarks/engine_policy.py --onnx DIR [--budgets 128,256,512] [--concurrency 1,8,16] [--requests 32]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from tritonllm.client.bench import closed_loop, percentiles
from tritonllm.client.workload import synthetic_prompts
from tritonllm.contract import EngineSettings
from tritonllm.python_backends.engine import Engine, GenerationRequest
from tritonllm.python_backends.sampling import SamplingParams


def measure(engine: Engine, prompts: list[list[int]], new_tokens: int, concurrency: int) -> dict:
    arrivals: list[list[float]] = [[] for _ in prompts]
    starts = [0.0] * len(prompts)

    def request(index: int) -> None:
        done = threading.Event()

        def emit(output) -> None:
            arrivals[index].append(time.perf_counter())
            if output.final:
                done.set()

        starts[index] = time.perf_counter()
        engine.submit(GenerationRequest(prompts[index], new_tokens, SamplingParams(min_tokens=new_tokens),
                                        streaming=True), emit)
        done.wait()

    duration = closed_loop(len(prompts), concurrency, request)
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:])]
    return {"output_tokens_per_s": round(len(prompts) * new_tokens / duration, 1),
            "ttft_s": {k: round(v, 3) for k, v in percentiles([t[0] - s for t, s in zip(arrivals, starts)]).items()},
            "itl_s": {k: round(v, 4) for k, v in percentiles(gaps).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, required=True, help="a decoder folder (model.onnx) of a build")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the build's HF folder")
    parser.add_argument("--budgets", default="128,256,512")
    parser.add_argument("--concurrency", default="1,8,16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench-results/engine_policy.json"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in synthetic_prompts(tokenizer, args.requests, 100, 199)]
    results = []
    for budget in (int(b) for b in args.budgets.split(",")):
        engine = Engine(args.onnx, EngineSettings(prefill_chunk_tokens=budget, prefix_cache_max_tokens=0))
        try:
            measure(engine, prompts[:2], 4, 2)  # warm-up
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                row = {"prefill_chunk_tokens": budget, "concurrency": concurrency,
                       **measure(engine, prompts, args.new_tokens, concurrency)}
                print(json.dumps(row), flush=True)
                results.append(row)
        finally:
            engine.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
