"""Benchmark workloads: prompts of a chosen token-length range, made deterministically from a shipped sentence pool."""

from __future__ import annotations

import json
import random
from pathlib import Path

SENTENCES_FILE = Path(__file__).resolve().parent / "data" / "sentences.txt"


def load_prompt_file(path: Path) -> list[str]:
    """One prompt per line (plain text) or JSONL with a 'prompt' or 'text' field."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt", record.get("text")), str):
                raise ValueError(f"{path}:{number}: each JSONL line needs a string field 'prompt' or 'text'")
            prompts.append(record.get("prompt", record.get("text")))
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} holds no prompt")
    return prompts


def synthetic_prompts(tokenizer, count: int, min_tokens: int, max_tokens: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts whose token length (no special tokens) lies in [min_tokens, max_tokens].

    Each prompt is an instruction followed by sentences drawn from the pool until its length falls in range, so
    lengths spread over the whole range (the engine's prefill grouping sees realistic variety).
    """
    pool = [s for s in SENTENCES_FILE.read_text().splitlines() if s.strip()]
    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < count:
        target = rng.randint(min_tokens, max_tokens)
        text = "Summarize the following notes in a few sentences:"
        while True:
            candidate = f"{text} {rng.choice(pool)}"
            length = len(tokenizer(candidate, add_special_tokens=False)["input_ids"])
            if length > max_tokens:
                break
            text = candidate
            if length >= target:
                break
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= min_tokens and text not in prompts:
            prompts.append(text)
    return prompts
