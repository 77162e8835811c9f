"""Gates for an exported decoder: logits parity with torch fp32 (fp32 exports) and greedy-token agreement with the
fp32 export (int8).

Both run the graph the way the engine does: a batch of prompts of different lengths, left-padded to a common length,
prefilled (parity: in two chunks, the second on a non-empty past), then decoded token by token, each side feeding its
own KV cache back in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .errors import BuildError
from .onnx_export import ONNX_FILE, io_names, load_causal_lm

# Max |logit difference| an fp32 export may show against torch fp32 (the build gate runs batch 4, left-padded, prefill
# in two chunks + 3 decode steps). Measured on SmolLM2-135M (logits up to ~30): 7.06e-5 at batch 4, the same on every
# build (float32 summation order); a damaged weight gives differences near 1.
FP32_TOLERANCE = 1e-4
# Distinct English prompts; parity takes the first `batch`, agreement as many as asked.
SAMPLE_PROMPTS_FILE = "parity_prompts.txt"


def sample_prompts(count: int) -> list[str]:
    """`count` prompts from the bundled prompt list (cycled if more are asked than it holds)."""
    text = resources.files("tritonllm.builders").joinpath("data", SAMPLE_PROMPTS_FILE).read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    return [prompts[i % len(prompts)] for i in range(count)]


@dataclass
class LeftPaddedBatch:
    """New tokens of a batch, left-padded, with the mask and positions that continue each row's past."""

    input_ids: np.ndarray  # int64 [batch, sequence]
    attention_mask: np.ndarray  # int64 [batch, past + sequence]
    position_ids: np.ndarray  # int64 [batch, sequence]


def left_pad(token_lists: list[list[int]], pad_id: int) -> LeftPaddedBatch:
    """A prefill batch: rows padded on the left to the longest; positions count real tokens only."""
    width = max(len(tokens) for tokens in token_lists)
    input_ids = np.full((len(token_lists), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(token_lists), width), dtype=np.int64)
    for row, tokens in enumerate(token_lists):
        input_ids[row, width - len(tokens):] = tokens
        attention_mask[row, width - len(tokens):] = 1
    return LeftPaddedBatch(input_ids, attention_mask, _positions(attention_mask, width))


def continue_batch(attention_mask: np.ndarray, new_ids: np.ndarray) -> LeftPaddedBatch:
    """The next step for rows whose past is described by `attention_mask`: all new tokens are real."""
    mask = np.concatenate([attention_mask, np.ones_like(new_ids)], axis=1)
    return LeftPaddedBatch(new_ids.astype(np.int64), mask, _positions(mask, new_ids.shape[1]))


def _positions(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    # A token's position is the count of real tokens before it; padding gets 0 (any valid index would do).
    positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
    return positions[:, -new_tokens:].astype(np.int64)


class OnnxDecoderRunner:
    """Runs an exported decoder with ONNX Runtime, keeping the KV cache between calls."""

    def __init__(self, onnx_dir: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        path = Path(onnx_dir) / ONNX_FILE
        if not path.is_file():
            raise BuildError(f"{path} does not exist; export the decoder first")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.num_layers = len(past_inputs) // 2
        _, self.kv_heads, _, self.head_dim = past_inputs[0].shape
        self.input_names, self.output_names = io_names(self.num_layers)
        self.past: list[np.ndarray] = []

    def reset(self, batch: int) -> None:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)  # the graph's cache dtype
        self.past = [empty] * (2 * self.num_layers)

    def step(self, batch: LeftPaddedBatch) -> np.ndarray:
        """Logits of the last new position of every row, [batch, vocab]; the cache grows by the new tokens."""
        feed = dict(zip(self.input_names, [batch.input_ids, batch.attention_mask, batch.position_ids, *self.past]))
        logits, *self.past = self.session.run(self.output_names, feed)
        return logits[:, -1, :].astype(np.float32)


class TorchDecoderRunner:
    """The same steps through the HF model in torch fp32: the reference."""

    def __init__(self, hf_dir: Path) -> None:
        self.model = load_causal_lm(hf_dir)
        self.cache = None

    def reset(self, batch: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    @torch.no_grad()
    def step(self, batch: LeftPaddedBatch) -> np.ndarray:
        output = self.model(input_ids=torch.from_numpy(batch.input_ids),
                            attention_mask=torch.from_numpy(batch.attention_mask),
                            position_ids=torch.from_numpy(batch.position_ids),
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = output.past_key_values
        return output.logits[:, -1, :].float().numpy()


@dataclass
class StepDifference:
    step: str  # "prefill chunk 1", "prefill chunk 2", "decode 1", ...
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


def check_parity(hf_dir: Path, onnx_dir: Path, batch: int = 2, decode_steps: int = 3,
                 tolerance: float = FP32_TOLERANCE) -> ParityReport:
    """Compare ONNX Runtime with torch fp32 on a left-padded batch; raise BuildError when a step differs too much.

    Steps: prefill chunk 1 (empty past), prefill chunk 2 (the last 2 prompt tokens on top of chunk 1's cache), then
    `decode_steps` single-token steps. Both sides are fed the torch model's greedy tokens, so they see the same inputs.
    """
    if batch < 2 or decode_steps < 1:
        raise BuildError(f"check_parity needs batch >= 2 (to exercise left padding) and decode_steps >= 1; "
                         f"got batch={batch}, decode_steps={decode_steps}")
    token_lists, pad_id = _prompt_tokens(sample_prompts(batch), hf_dir)
    # Different lengths on purpose, so the shorter rows are left-padded.
    token_lists = [tokens[: max(4, len(tokens) - 3 * row)] for row, tokens in enumerate(token_lists)]
    reference, candidate = TorchDecoderRunner(hf_dir), OnnxDecoderRunner(onnx_dir)
    report = ParityReport(str(hf_dir), str(onnx_dir), [len(tokens) for tokens in token_lists], tolerance)

    second_chunk = 2
    prefill = left_pad(token_lists, pad_id)
    chunks = [("prefill chunk 1", LeftPaddedBatch(prefill.input_ids[:, :-second_chunk],
                                                  prefill.attention_mask[:, :-second_chunk],
                                                  prefill.position_ids[:, :-second_chunk])),
              ("prefill chunk 2", LeftPaddedBatch(prefill.input_ids[:, -second_chunk:], prefill.attention_mask,
                                                  prefill.position_ids[:, -second_chunk:]))]

    def compare(name: str, step: LeftPaddedBatch) -> np.ndarray:
        """Run both sides on `step`, record the difference, return torch's greedy tokens [batch, 1]."""
        expected, actual = reference.step(step), candidate.step(step)
        report.steps.append(StepDifference(
            step=name, new_tokens=step.input_ids.shape[1],
            past_length=step.attention_mask.shape[1] - step.input_ids.shape[1],
            max_abs_logit_diff=float(np.max(np.abs(expected - actual))),
            same_argmax=bool(np.array_equal(expected.argmax(-1), actual.argmax(-1)))))
        return expected.argmax(-1)[:, None]

    for runner in (reference, candidate):
        runner.reset(len(token_lists))
    for name, chunk in chunks:
        next_ids = compare(name, chunk)
    attention_mask = prefill.attention_mask
    for number in range(1, decode_steps + 1):
        step = continue_batch(attention_mask, next_ids)
        attention_mask = step.attention_mask
        next_ids = compare(f"decode {number}", step)

    if not report.passed:
        worst = max(report.steps, key=lambda step: step.max_abs_logit_diff)
        raise BuildError(f"parity check failed for {onnx_dir}: at step '{worst.step}' (past {worst.past_length}, "
                         f"{worst.new_tokens} new tokens) max |logit difference| vs torch fp32 is "
                         f"{worst.max_abs_logit_diff:.3g}, allowed {tolerance:.3g}")
    return report


def greedy_agreement(reference_onnx_dir: Path, candidate_onnx_dir: Path, prompts: list[str] | list[list[int]],
                     new_tokens: int, tokenizer_dir: Path | None = None, batch_size: int = 8) -> float:
    """Fraction of greedy tokens the candidate picks the same as the reference (teacher-forced).

    The reference decodes greedily; the candidate is fed the reference's tokens and, at every step, its own argmax is
    compared with the reference's. Teacher forcing keeps one early disagreement from counting every later token as
    wrong. Prompts are strings (chat-templated with the tokenizer of `tokenizer_dir`) or token id lists.
    """
    token_lists, pad_id = _prompt_tokens(prompts, tokenizer_dir)
    reference, candidate = OnnxDecoderRunner(reference_onnx_dir), OnnxDecoderRunner(candidate_onnx_dir)
    agreed = total = 0
    for start in range(0, len(token_lists), batch_size):
        chunk = token_lists[start: start + batch_size]
        for runner in (reference, candidate):
            runner.reset(len(chunk))
        step = left_pad(chunk, pad_id)
        for _ in range(new_tokens):
            expected, actual = reference.step(step).argmax(-1), candidate.step(step).argmax(-1)
            agreed += int(np.sum(expected == actual))
            total += len(chunk)
            step = continue_batch(step.attention_mask, expected[:, None])
    return agreed / total


def _prompt_tokens(prompts: list[str] | list[list[int]], tokenizer_dir: Path | None) -> tuple[list[list[int]], int]:
    if not prompts:
        raise BuildError("no prompts given; at least one is needed")
    if all(isinstance(prompt, list) for prompt in prompts):
        return [list(prompt) for prompt in prompts], 0
    if tokenizer_dir is None:
        raise BuildError("text prompts need tokenizer_dir (a folder holding the tokenizer) to be tokenized")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    token_lists = [_chat_tokens(tokenizer, prompt) for prompt in prompts]
    return token_lists, tokenizer.pad_token_id or 0


def _chat_tokens(tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=True)
    return tokenizer(prompt)["input_ids"]
