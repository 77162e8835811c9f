"""Speculative decoding (prompt lookup) against plain decoding on SmolLM2 fp32: inter-token latency and acceptance.

The serving engine in-process (python_backends.engine.Engine, no Triton), closed loop, greedy, chat template,
`--new-tokens` forced new tokens per request (min_tokens), two workloads:
- standard: the synthetic prompts of `tritonllm bench` (client/workload.py: notes to summarize, 32..128 tokens);
- rewrite: "Rewrite the following text ..." over the held-out passages (builders/data/heldout_prompts.jsonl), where
  the answer copies from the context and prompt lookup should draft well.
Arms: plain, and prompt lookup with speculative_max_batch_size 1 (the default policy) and 4 (speculating at
concurrency 4 too, one verification run per row). Mean inter-token latency comes from the engine's token timer (the
gaps inside one verified run are ~0, so the mean, not the median gap, is the latency a client sees per token).
Each configuration runs `--repeats` times; the report gives medians (the machine is shared and noisy), the
acceptance (accepted / drafted), tokens per target step, and whether the greedy outputs equal plain decoding's.

  python benchmarks/speculative.py [--repeats 3] [--out bench-results/speculative.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
from pathlib import Path

from tritonllm.builders.fp8 import HELDOUT_FILE
from tritonllm.builders.pipeline import build
from tritonllm.client.bench import closed_loop
from tritonllm.client.workload import synthetic_prompts
from tritonllm.contract import EngineSettings
from tritonllm.prompts import read_prompts
from tritonllm.python_backends.chat import encode_user_turn
from tritonllm.python_backends.engine import Engine, GenerationRequest
from tritonllm.python_backends.metrics import TokenTimings
from tritonllm.python_backends.sampling import SamplingParams

ARMS = {"plain": {}, "prompt_lookup": {"speculative_drafter": "prompt_lookup"},
        "prompt_lookup_batch4": {"speculative_drafter": "prompt_lookup", "speculative_max_batch_size": 4}}
REWRITE = "Rewrite the following text, keeping its wording where you can:\n\n{}"


def run_arm(onnx_dir: Path, arm: dict, prompts: list[list[int]], concurrency: int, new_tokens: int) -> dict:
    timings = TokenTimings()
    engine = Engine(onnx_dir, EngineSettings(prefix_cache_max_tokens=0, **arm), token_timer=timings)
    outputs: list[list[int]] = [[] for _ in prompts]
    try:
        def one(index: int) -> None:
            done = threading.Event()

            def emit(output) -> None:
                if output.final:
                    outputs[index] = output.token_ids
                    done.set()

            engine.submit(GenerationRequest(prompts[index], new_tokens, SamplingParams(min_tokens=new_tokens),
                                            exclude_input_in_output=True), emit)
            done.wait()

        seconds = closed_loop(len(prompts), concurrency, one)
        stats = engine.stats()
    finally:
        engine.shutdown()
    _, gaps = timings.drain()
    return {"itl_ms": 1000 * sum(gaps) / len(gaps), "tokens_per_s": sum(map(len, outputs)) / seconds,
            "drafted": stats.drafted_tokens, "accepted": stats.accepted_tokens,
            "tokens_per_target_step": stats.decode_tokens / max(stats.decode_row_steps, 1), "outputs": outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8, help="per workload and concurrency")
    parser.add_argument("--out", type=Path, default=Path("bench-results/speculative.json"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    built = build(model=None, precision="fp32")
    tokenizer = AutoTokenizer.from_pretrained(built.hf_dir)
    texts = {"standard": synthetic_prompts(tokenizer, args.requests, 32, 128),
             "rewrite": [REWRITE.format(prompt.text) for prompt in read_prompts(HELDOUT_FILE, args.requests)]}
    workloads = {name: [encode_user_turn(tokenizer, text) for text in prompts] for name, prompts in texts.items()}
    rows = []
    for workload, prompts in workloads.items():
        for concurrency in (1, 4):
            runs = {arm: [run_arm(built.onnx_dir, settings, prompts, concurrency, args.new_tokens)
                          for _ in range(args.repeats)] for arm, settings in ARMS.items()}
            plain_itl = statistics.median(run["itl_ms"] for run in runs["plain"])
            for arm, arm_runs in runs.items():
                drafted = sum(run["drafted"] for run in arm_runs)
                row = {"workload": workload, "concurrency": concurrency, "arm": arm,
                       "itl_ms_median": round(statistics.median(run["itl_ms"] for run in arm_runs), 2),
                       "tokens_per_s_median": round(statistics.median(run["tokens_per_s"] for run in arm_runs), 1),
                       "acceptance": round(sum(run["accepted"] for run in arm_runs) / drafted, 3) if drafted else None,
                       "tokens_per_target_step": round(statistics.median(run["tokens_per_target_step"]
                                                                         for run in arm_runs), 2),
                       "identical_to_plain": sum(run["outputs"] == runs["plain"][0]["outputs"] for run in arm_runs),
                       "repeats": len(arm_runs)}
                row["itl_speedup_vs_plain"] = round(plain_itl / row["itl_ms_median"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": f"python benchmarks/speculative.py --repeats {args.repeats}",
                                    "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
