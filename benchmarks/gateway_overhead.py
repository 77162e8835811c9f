"""What the OpenAI gateway adds to a request and to each token, against the native ensemble over gRPC.

One tritonserver and one gateway (in this process, as `tritonllm serve --gateway-port` runs it) on 127.0.0.1; the
same prompts go to the ensemble over gRPC streaming (`client.peers.TritonStream`) and to the gateway's
`/v1/completions` over SSE (`client.peers.OpenAICompletionsStream`), output length forced (`min_tokens` natively,
`ignore_eos` through the gateway), greedy, closed loop at each concurrency (`client.bench.run_level`). Overhead per
request = TTFT p50 of the gateway minus the native one; per token = ITL p50 difference.

    .venv/bin/python benchmarks/gateway_overhead.py [--repository DIR] [--requests 32] [--concurrency 1,8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tritonllm.client.bench import results_table, run_level
from tritonllm.client.deployment import bundled_build
from tritonllm.client.peers import OpenAICompletionsStream, TritonStream
from tritonllm.client.workload import synthetic_prompts
from tritonllm.contract import GatewaySettings
from tritonllm.gateway.server import GatewayServer
from tritonllm.gateway.tokens import repository_tokenizer_dir
from tritonllm.server import TritonServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="rendered repository; default: the bundled fp32 build")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--out", type=Path, default=Path("bench-results/gateway_overhead.json"))
    args = parser.parse_args()
    repository = args.repository or bundled_build("fp32").repository_dir
    tokenizer_dir = repository_tokenizer_dir(repository)
    from transformers import AutoTokenizer

    prompts = synthetic_prompts(AutoTokenizer.from_pretrained(tokenizer_dir), args.requests, 100, 200)
    levels = [int(level) for level in args.concurrency.split(",")]
    with TritonServer(repository) as triton:
        # the ensemble on both sides: the same path, the gateway in front or not
        settings = GatewaySettings(triton_grpc_urls=(triton.endpoints.grpc_url,), model="ensemble", port=0)
        with GatewayServer(settings, tokenizer_dir) as gateway:
            systems = [TritonStream(triton.endpoints.grpc_url, name="ensemble-grpc"),
                       OpenAICompletionsStream(gateway.url, settings.served_model_name, name="gateway-openai",
                                               extra_body={"stream_options": None})]  # usage: re-encoded count
            for system in systems:  # warm-up: first requests load kernels and open connections
                list(system.stream(prompts[0], 4))
            # A run-specific opening keeps the engine's prefix cache from serving one run the prompts of another.
            results = [run_level(system, [f"({system.name}, c{level}) {prompt}" for prompt in prompts],
                                 args.output_tokens, level) for level in levels for system in systems]
    from rich.console import Console

    Console(width=160).print(results_table(results))
    overhead = {}
    for level in levels:
        native, gateway_result = (next(r for r in results if r.system == name and r.concurrency == level)
                                  for name in ("ensemble-grpc", "gateway-openai"))
        overhead[level] = {"per_request_ms": 1000 * (gateway_result.ttft_s["p50"] - native.ttft_s["p50"]),
                           "per_token_ms": 1000 * (gateway_result.itl_s["p50"] - native.itl_s["p50"]),
                           "native_tok_s": native.output_tokens_per_s,
                           "gateway_tok_s": gateway_result.output_tokens_per_s}
        print(f"concurrency {level}: gateway adds {overhead[level]['per_request_ms']:+.2f} ms to TTFT p50 and "
              f"{overhead[level]['per_token_ms']:+.3f} ms to ITL p50")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"overhead": overhead, "results": [vars(r) for r in results]}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
