"""Benchmark workloads: prompts of a chosen token-length range, made deterministically from a shipped sentence pool."""

from __future__ import annotations

import random
from pathlib import Path

from tritonllm.prompts import read_prompts

SENTENCES_FILE = Path(__file__).resolve().parent / "data" / "sentences.txt"


def load_prompt_file(path: Path) -> list[str]:
    """The prompt texts of a prompt file (`tritonllm.prompts`: one per line, or JSONL with a 'prompt' or 'text'
    field); raises PromptFileError (a ValueError) naming the file and line."""
    return [prompt.text for prompt in read_prompts(path)]


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
