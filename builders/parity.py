"""Gates for a built decoder, run through the executor that serves (python_backends/onnx_runner.OnnxDecoder).

- fp32: logits parity with torch fp32. A batch of prompts of different lengths is prefilled in one right-padded
  fresh run, continued by a chunk of two tokens per slot (the path of chunked prefill and of prompts after a reused
  prefix), then decoded token by token over all slots; every step's logits are compared with the HF model's.
- int8 / int4: teacher-forced top-1 agreement with the fp32 build and perplexity against it on held-out text
  (builders/data/heldout_prompts.jsonl, never used to choose a quantization setting): both builds read the same
  text, and at every position the candidate's argmax is compared with fp32's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from tritonllm.python_backends.chat import encode_user_turn
from tritonllm.python_backends.onnx_runner import OnnxDecoder

from .errors import BuildError

# Max |logit difference| an fp32 build may show against torch fp32. Measured on SmolLM2-135M (logits up to ~30):
# ~5e-5 (float32 summation order); a damaged weight gives differences near 1.
FP32_TOLERANCE = 1e-4
SAMPLE_PROMPTS_FILE = "parity_prompts.txt"


def sample_prompts(count: int) -> list[str]:
    """`count` prompts from the bundled prompt list (cycled if more are asked than it holds)."""
    text = resources.files("tritonllm.builders").joinpath("data", SAMPLE_PROMPTS_FILE).read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    return [prompts[i % len(prompts)] for i in range(count)]


def heldout_texts() -> list[str]:
    from .fp8 import HELDOUT_FILE, load_prompts

    return [text for _, text in load_prompts(HELDOUT_FILE)]


@dataclass
class StepDifference:
    step: str  # "prefill", "prefill chunk 2", "decode 1", ...
    new_tokens: int
    past_length: int
    max_abs_logit_diff: float
    same_argmax: bool


@dataclass
class ParityReport:
    hf_dir: str
    onnx_dir: str
    prompt_lengths: list[int]
    tolerance: float
    steps: list[StepDifference] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(step.max_abs_logit_diff <= self.tolerance for step in self.steps)

    @property
    def max_abs_logit_diff(self) -> float:
        return max(step.max_abs_logit_diff for step in self.steps)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed, "max_abs_logit_diff": self.max_abs_logit_diff},
                          indent=2) + "\n"


def _tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def _chat_tokens(tokenizer, prompt: str) -> list[int]:
    return encode_user_turn(tokenizer, prompt) or tokenizer(prompt)["input_ids"]


def check_parity(hf_dir: Path, onnx_dir: Path, batch: int = 4, decode_steps: int = 3,
                 tolerance: float = FP32_TOLERANCE) -> ParityReport:
    """Compare the serving executor with torch fp32; raise BuildError when a step differs too much.

    Both sides are fed torch's greedy tokens, so they see the same inputs.
    """
    from transformers import AutoModelForCausalLM

    if batch < 2 or decode_steps < 1:
        raise BuildError(f"check_parity needs batch >= 2 (rows of different lengths) and decode_steps >= 1; "
                         f"got batch={batch}, decode_steps={decode_steps}")
    tokenizer = _tokenizer(hf_dir)
    token_lists = [_chat_tokens(tokenizer, prompt) for prompt in sample_prompts(batch)]
    # Different lengths on purpose, so the shorter rows are right-padded in the fresh run.
    token_lists = [tokens[:max(4, len(tokens) - 3 * row)] for row, tokens in enumerate(token_lists)]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    longest = max(len(tokens) for tokens in token_lists) + decode_steps + 1
    executor = OnnxDecoder(onnx_dir, batch, longest)
    report = ParityReport(str(hf_dir), str(onnx_dir), [len(tokens) for tokens in token_lists], tolerance)

    @torch.no_grad()
    def reference() -> np.ndarray:
        return np.stack([model(torch.tensor([tokens])).logits[0, -1].float().numpy() for tokens in token_lists])

    def compare(name: str, actual: np.ndarray, new_tokens: int) -> np.ndarray:
        """Record the step's difference; returns torch's greedy tokens."""
        expected = reference()
        report.steps.append(StepDifference(
            step=name, new_tokens=new_tokens, past_length=min(len(t) for t in token_lists) - new_tokens,
            max_abs_logit_diff=float(np.max(np.abs(expected - actual))),
            same_argmax=bool(np.array_equal(expected.argmax(-1), actual.argmax(-1)))))
        return expected.argmax(-1)

    chunk = 2
    tails = [tokens[-chunk:] for tokens in token_lists]
    for tokens in token_lists:
        del tokens[-chunk:]
    compare("prefill (right-padded batch)", executor.prefill(0, token_lists), max(map(len, token_lists)))
    starts = [len(tokens) for tokens in token_lists]
    for tokens, tail in zip(token_lists, tails):
        tokens.extend(tail)
    chunk_logits = np.concatenate([executor.extend(row, start, tail) for row, (start, tail) in
                                   enumerate(zip(starts, tails))])
    next_ids = compare("prefill chunk of 2", chunk_logits, chunk)
    for number in range(1, decode_steps + 1):
        for tokens, token in zip(token_lists, next_ids.tolist()):
            tokens.append(token)
        next_ids = compare(f"decode {number}", executor.decode([tokens[-1] for tokens in token_lists]), 1)

    if not report.passed:
        worst = max(report.steps, key=lambda step: step.max_abs_logit_diff)
        raise BuildError(f"parity check failed for {onnx_dir}: at step '{worst.step}' max |logit difference| vs "
                         f"torch fp32 is {worst.max_abs_logit_diff:.3g}, allowed {tolerance:.3g}")
    return report


@dataclass
class AgreementReport:
    texts: int
    scored_tokens: int
    top1_agreement: float  # candidate argmax == reference argmax, teacher-forced on the text
    reference_perplexity: float
    candidate_perplexity: float

    @property
    def perplexity_increase(self) -> float:
        return self.candidate_perplexity / self.reference_perplexity - 1.0


def agreement(reference_dir: Path, candidate_dir: Path, tokenizer_dir: Path, texts: list[str] | None = None,
              context_tokens: int = 16, scored_tokens: int = 48, batch: int = 16) -> AgreementReport:
    """Teacher-forced comparison on held-out text: both builds read `context_tokens`, then each next token of the
    text; per position, top-1 agreement and each build's negative log-likelihood of the text's token."""
    tokenizer = _tokenizer(tokenizer_dir)
    texts = texts if texts is not None else heldout_texts()
    # Encoded as the server encodes a raw prompt: with the special tokens the tokenizer adds (Gemma's BOS, without
    # which it reads text badly; SmolLM2 adds none).
    token_lists = [tokens[:context_tokens + scored_tokens] for tokens in
                   (tokenizer(text)["input_ids"] for text in texts)]
    token_lists = [tokens for tokens in token_lists if len(tokens) > context_tokens]
    if not token_lists:
        raise BuildError(f"no held-out text is longer than {context_tokens} tokens")
    length = context_tokens + scored_tokens
    executors = [OnnxDecoder(folder, batch, length) for folder in (reference_dir, candidate_dir)]
    agreed = scored = 0
    nll = [0.0, 0.0]
    for start in range(0, len(token_lists), batch):
        rows = token_lists[start:start + batch]
        logits = [executor.prefill(0, [tokens[:context_tokens] for tokens in rows]) for executor in executors]
        for position in range(context_tokens, max(len(tokens) for tokens in rows)):
            live = [row for row, tokens in enumerate(rows) if position < len(tokens)]
            targets = np.array([rows[row][position] for row in live])
            picks = [array[live] for array in logits]
            agreed += int(np.sum(picks[0].argmax(-1) == picks[1].argmax(-1)))
            scored += len(live)
            for side, array in enumerate(picks):
                shifted = array - array.max(-1, keepdims=True)
                log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
                nll[side] -= float(log_probs[np.arange(len(live)), targets].sum())
            # Rows that ended are fed their last token again; their scores are no longer read.
            feed = [tokens[min(position, len(tokens) - 1)] for tokens in rows]
            logits = [executor.decode(feed) for executor in executors]
    return AgreementReport(len(token_lists), scored, agreed / scored, float(np.exp(nll[0] / scored)),
                           float(np.exp(nll[1] / scored)))
