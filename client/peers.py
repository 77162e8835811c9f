"""Systems a user would otherwise pick, run in-process on the same prompts: the baselines of `tritonllm bench`.

- `HFSequential`: Hugging Face `generate`, one request at a time (fp32).
- `HFStaticBatching`: collect up to 8 requests within 50 ms, left-pad, `generate` them as one batch.
- `TritonStream`: our deployment over gRPC streaming (the system under test).
- `OpenAICompletionsStream`: an OpenAI-compatible server (vLLM, llama.cpp's llama-server) over `/v1/completions` SSE.
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


class OpenAICompletionsStream:
    """An OpenAI-compatible server (vLLM's api_server, llama.cpp's llama-server) over `/v1/completions` SSE.

    Greedy (temperature 0), `max_tokens` = the requested length, `ignore_eos` so the length is forced; peer-specific
    fields (`min_tokens` for vLLM; `cache_prompt: false`, `repeat_penalty: 1.0` for llama-server) come in
    `extra_body`, which overrides the defaults here. One `time.perf_counter()` is yielded for each SSE data chunk
    that carries new text or token ids. When the server reports `usage.completion_tokens` (vLLM with
    `stream_options.include_usage`; llama-server's final chunk) a length other than the one asked for raises, so a
    peer that stopped early never counts as fast.
    """

    def __init__(self, base_url: str, model: str, name: str = "openai", extra_body: dict | None = None,
                 timeout_s: float = 600.0) -> None:
        self.name = name
        self.url = base_url.rstrip("/") + "/v1/completions"
        self.model = model
        self.extra_body = dict(extra_body or {})
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def body(self, prompt: str, output_tokens: int) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0.0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        body.update(self.extra_body)
        return body

    def stream(self, prompt: str, output_tokens: int) -> Iterator[float]:
        import json

        response = self._session().post(self.url, json=self.body(prompt, output_tokens), stream=True,
                                        timeout=self.timeout_s)
        with response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code} from {self.url}: {response.text[:300]}")
            completion_tokens = None
            for line in response.iter_lines():
                if not line or not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise RuntimeError(f"server error: {chunk['error']}")
                usage = chunk.get("usage") or {}
                if usage.get("completion_tokens") is not None:
                    completion_tokens = usage["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    if choice.get("text") or choice.get("token_ids") or choice.get("tokens"):
                        yield now
                        break
            if completion_tokens is not None and completion_tokens != output_tokens:
                raise RuntimeError(f"{self.name}: {completion_tokens} tokens generated, {output_tokens} asked for")
