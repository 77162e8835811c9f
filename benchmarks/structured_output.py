"""Structured output on SmolLM2: validity over many prompts and schemas, and what the masks cost in tokens/s.

The serving engine in-process (python_backends.engine.Engine with the build's tokenizer, no Triton), closed loop:
1. validity: PROMPTS prompts x 5 JSON schemas (flat object, nested, arrays, enums, numbers with bounds), chat
   template, greedy, at concurrency 16; every answer that finished (not cut by max_tokens) must parse and validate
   with `jsonschema`;
2. overhead: output tokens/s at concurrency 1 and 16 with every request constrained (a JSON object holding one long
   string, so the grammar never ends the answer early) against none, 64 forced new tokens each.

  python benchmarks/structured_output.py [--prompts 200] [--out bench-results/structured_output.json]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import jsonschema

from tritonllm.builders.pipeline import build
from tritonllm.client.bench import closed_loop
from tritonllm.contract import EngineSettings
from tritonllm.python_backends.engine import Engine, GenerationRequest
from tritonllm.python_backends.guided import GuideSpec
from tritonllm.python_backends.sampling import SamplingParams
from tritonllm.python_backends.stop_criteria import FinishReason

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"},
                                              "active": {"type": "boolean"}},
             "required": ["name", "city", "active"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "title": {"type": "string"},
        "author": {"type": "object", "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
                   "required": ["name", "born"], "additionalProperties": False}},
        "required": ["title", "author"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"},
                                                          "minItems": 1, "maxItems": 5}},
               "required": ["items"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                               "confidence": {"enum": ["low", "medium", "high"]}},
              "required": ["sentiment", "confidence"], "additionalProperties": False},
    "bounded_numbers": {"type": "object", "properties": {
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "price": {"type": "number", "minimum": 0, "maximum": 1000}},
        "required": ["rating", "price"], "additionalProperties": False},
}
SUBJECTS = ["a library", "a bakery", "a mountain trail", "a jazz album", "a used car", "a museum", "a laptop",
            "a coffee shop", "a hotel", "a football club", "a novel", "a smartphone", "a garden", "a bicycle",
            "a restaurant", "a movie", "a painting", "a train journey", "a concert", "a pair of shoes"]
ASKS = ["Describe {} as JSON.", "Give me a JSON object about {}.", "Return JSON for {}.",
        "Summarize {} in JSON.", "Write a JSON record of {}.", "Answer in JSON: tell me about {}.",
        "Produce JSON describing {}.", "I need JSON for {}.", "Fill in a JSON form about {}.",
        "Output only JSON about {}."]
LONG_STRING = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}}, "required": ["story"]}


def prompt_texts(count: int) -> list[str]:
    return [ASKS[number // len(SUBJECTS) % len(ASKS)].format(SUBJECTS[number % len(SUBJECTS)])
            for number in range(count)]


def run_all(engine: Engine, requests: list[GenerationRequest], concurrency: int) -> tuple[list, float]:
    """(final output of each request, wall seconds), `concurrency` requests in flight at a time."""
    finals: list = [None] * len(requests)

    def one(index: int) -> None:
        done = threading.Event()

        def emit(output) -> None:
            if output.final:
                finals[index] = output
                done.set()

        engine.submit(requests[index], emit)
        done.wait()

    return finals, closed_loop(len(requests), concurrency, one)


def validity(engine: Engine, tokenizer, prompts: list[list[int]], end_id: int) -> dict:
    report = {}
    for name, schema in SCHEMAS.items():
        guide = GuideSpec("guided_json", json.dumps(schema))
        requests = [GenerationRequest(prompt, 128, SamplingParams(end_id=end_id), exclude_input_in_output=True,
                                      guide=guide) for prompt in prompts]
        finals, seconds = run_all(engine, requests, 16)
        finished = valid = 0
        for final in finals:
            if final.finish_reason is FinishReason.LENGTH:
                continue
            finished += 1
            try:
                jsonschema.validate(json.loads(tokenizer.decode(final.token_ids)), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError) as error:
                print(f"{name}: invalid answer {tokenizer.decode(final.token_ids)!r}: {error}", flush=True)
        report[name] = {"requests": len(finals), "finished": finished, "valid": valid,
                        "seconds": round(seconds, 1), "example": tokenizer.decode(finals[0].token_ids)}
        print(json.dumps({name: report[name]}), flush=True)
    return report


def overhead(engine: Engine, prompts: list[list[int]], end_id: int, new_tokens: int) -> list[dict]:
    rows = []
    for concurrency in (1, 16):
        count = 4 if concurrency == 1 else 48
        for guided in (False, True):
            guide = GuideSpec("guided_json", json.dumps(LONG_STRING)) if guided else None
            requests = [GenerationRequest(prompt, new_tokens, SamplingParams(end_id=end_id, min_tokens=new_tokens),
                                          exclude_input_in_output=True, guide=guide) for prompt in prompts[:count]]
            finals, seconds = run_all(engine, requests, concurrency)
            tokens = sum(len(final.token_ids) for final in finals)
            rows.append({"concurrency": concurrency, "constrained": guided, "requests": count,
                         "output_tokens_per_s": round(tokens / seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-validity", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench-results/structured_output.json"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    built = build(model=None, precision="fp32")
    tokenizer = AutoTokenizer.from_pretrained(built.hf_dir)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in prompt_texts(args.prompts)]
    engine = Engine(built.onnx_dir, EngineSettings(prefix_cache_max_tokens=0), tokenizer_dir=built.hf_dir)
    results: dict = {"command": "python benchmarks/structured_output.py --prompts " + str(args.prompts)}
    started = time.perf_counter()
    try:
        if not args.skip_validity:
            results["validity"] = validity(engine, tokenizer, prompts, end_id)
        results["overhead"] = overhead(engine, prompts, end_id, args.new_tokens)
    finally:  # what was measured is kept even when a later part fails
        engine.shutdown()
        results["seconds"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
