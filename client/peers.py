"""Systems a user would otherwise pick, run in-process on the same prompts: the baselines of `tritonllm bench`.

- `HFSequential`: Hugging Face `generate`, one request at a time (fp32).
- `HFStaticBatching`: collect up to 8 requests within 50 ms, left-pad, `generate` them as one batch.
- `TritonStream`: our deployment over gRPC streaming (the system under test).
All force the output length (`min_new_tokens` / `min_tokens` = max), as benchmark tools do with "ignore eos".
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

from tritonllm.client.api import GenerationParams, LLMClient


class TritonStream:
    def __init__(self, url: str, model: str = "ensemble", name: str = "tritonllm") -> None:
        self.name = name
        self.client = LLMClient(url, protocol="grpc", model=model)

    def stream(self, prompt: str, output_tokens: int) -> Iterator[float]:
        params = GenerationParams(max_tokens=output_tokens, min_tokens=output_tokens)
        for event in self.client.events(prompt, params, stream=True):
            yield event.received_at


class _StepClock:
    """A logits processor that only timestamps each decoding step into per-row queues (the HF "stream")."""

    def __init__(self, sinks: list[queue.Queue]) -> None:
        self.sinks = sinks

    def __call__(self, input_ids, scores):
        now = time.perf_counter()
        for sink in self.sinks:
            sink.put(now)
        return scores


class _HFModel:
    def __init__(self, hf_dir: str, threads: int | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def generate(self, prompts: list[str], output_tokens: int, sinks: list[queue.Queue]) -> None:
        from transformers import LogitsProcessorList

        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with self.torch.inference_mode():
            self.model.generate(**batch, max_new_tokens=output_tokens, min_new_tokens=output_tokens,
                                do_sample=False, pad_token_id=self.pad_id,
                                logits_processor=LogitsProcessorList([_StepClock(sinks)]))


def _drain(sink: queue.Queue, output_tokens: int) -> Iterator[float]:
    for _ in range(output_tokens):
        item = sink.get()
        if isinstance(item, BaseException):
            raise item
        yield item


class HFSequential:
    name = "hf-generate-sequential"

    def __init__(self, hf_dir: str, threads: int | None = None) -> None:
        self.model = _HFModel(hf_dir, threads)
        self.lock = threading.Lock()  # one request at a time, as a plain `generate` server does

    def stream(self, prompt: str, output_tokens: int) -> Iterator[float]:
        sink: queue.Queue = queue.Queue()
        with self.lock:
            self.model.generate([prompt], output_tokens, [sink])
        return _drain(sink, output_tokens)


class HFStaticBatching:
    name = "hf-static-batching"

    def __init__(self, hf_dir: str, max_batch: int = 8, window_s: float = 0.05, threads: int | None = None) -> None:
        self.model = _HFModel(hf_dir, threads)
        self.max_batch, self.window_s = max_batch, window_s
        self.waiting: queue.Queue = queue.Queue()
        threading.Thread(target=self._batch_loop, daemon=True, name="hf-static-batcher").start()

    def stream(self, prompt: str, output_tokens: int) -> Iterator[float]:
        sink: queue.Queue = queue.Queue()
        self.waiting.put((prompt, output_tokens, sink))
        return _drain(sink, output_tokens)

    def _batch_loop(self) -> None:
        while True:
            batch = [self.waiting.get()]
            deadline = time.perf_counter() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.waiting.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            sinks = [sink for _, _, sink in batch]
            try:
                self.model.generate([p for p, _, _ in batch], max(n for _, n, _ in batch), sinks)
            except Exception as error:
                for sink in sinks:
                    sink.put(error)
