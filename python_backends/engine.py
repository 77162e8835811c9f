"""In-flight (continuous) batching engine over ONNX Runtime.

One loop thread owns the runner. Every iteration it drops cancelled sequences, admits waiting requests while the KV
budget and the batch size allow, runs at most `prefill_chunk_tokens` of prefill work (so running streams keep
flowing while long prompts are read), decodes every running sequence in one batched call, emits the new tokens and
retires finished sequences. Requests arrive from any thread through `submit`; outputs leave through each request's
`emit` callback, called on the loop thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from tritonllm.contract import EngineSettings
from tritonllm.python_backends.detokenizer import ENGINE_CONTEXT_TOKENS
from tritonllm.python_backends.errors import InvalidArgument, Unavailable
from tritonllm.python_backends.onnx_runner import DecodeBatch, OnnxRunner, PrefillGroup
from tritonllm.python_backends.sampling import Sampler, SamplingParams, sample_batch
from tritonllm.python_backends.stop_criteria import FinishReason, finish_reason

log = logging.getLogger(__name__)

# `is_cancelled` of a Triton request is a round trip to the server process; waiting requests (up to max_queue_size)
# are polled at this period rather than every step. Running sequences are polled every step.
WAITING_CANCEL_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. `sampling.end_id` None means the engine's default end id."""

    input_ids: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    streaming: bool = False
    exclude_input_in_output: bool = False


@dataclass(frozen=True)
class EngineOutput:
    """One response: `token_ids[:context_length]` were sent before and are repeated only as decoding context.

    The final output carries `finish_reason`; a CANCELLED or ERROR one carries no tokens, ERROR has `error` set
    (Unavailable when the engine shuts down).
    """

    token_ids: list[int]
    context_length: int
    final: bool
    finish_reason: FinishReason | None = None
    error: Exception | None = None


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences in the decode batch
    prefilling: int  # admitted sequences whose prompt is being read
    waiting: int
    kv_tokens_reserved: int  # prompt + max new tokens of every admitted sequence
    kv_tokens_in_use: int  # real tokens held in the decode batch's cache
    kv_slots_allocated: int  # rows x columns of the decode batch's cache (real + left padding)
    decode_steps: int
    prompt_tokens: int
    tokens_generated: int
    prefill_padding_ratio: float  # padded / real prompt tokens computed
    decode_padding_ratio: float  # padded / real KV slots attended
    decode_kv_bytes_per_step: float  # cache bytes read + written by the concat, averaged over steps
    finished: dict[str, int]  # sequences by finish reason


class TokenTimer(Protocol):
    def record(self, first_token_seconds: list[float], inter_token_seconds: list[float]) -> None:
        """Called on the loop thread once per step that sampled tokens: seconds from submit to each first token,
        and between consecutive tokens of each sequence. Must return quickly (no I/O)."""


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    emit: Callable[[EngineOutput], None]
    is_cancelled: Callable[[], bool]
    sampler: Sampler
    tokens: list[int]  # prompt + generated
    prompt_length: int
    reserved_tokens: int
    sent: int = 0  # generated ids already emitted (streaming)
    admitted: bool = False  # holds a KV reservation
    done: bool = False
    last_token_at: float = field(default_factory=time.perf_counter)  # submit time until the first token

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length:]


@dataclass
class _Prefill:
    group: PrefillGroup
    sequences: list[_Sequence]


@dataclass
class _Totals:
    prompt_tokens: int = 0
    tokens_generated: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class Engine:
    """Continuous batching of generation requests over one ONNX decoder-with-past."""

    def __init__(self, onnx_path: Path | str, settings: EngineSettings, end_id_default: int | None = None,
                 pad_id_default: int = 0, token_timer: TokenTimer | None = None) -> None:
        settings.validate()
        path = Path(onnx_path)
        self.settings = settings
        self.runner = OnnxRunner(path / "model.onnx" if path.is_dir() else path, settings.intra_op_threads)
        self.vocab_size = self.runner.vocab_size
        self.end_id_default = end_id_default
        self.pad_id = pad_id_default
        self.token_timer = token_timer
        self._batch = DecodeBatch(self.runner)
        self._running: list[_Sequence] = []  # aligned with the decode batch's rows
        self._prefilling: list[_Prefill] = []
        self._waiting: deque[_Sequence] = deque()
        self._reserved_tokens = 0
        self._totals = _Totals()
        self._last_waiting_poll = 0.0
        self._stopping = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- requests ---------------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, emit: Callable[[EngineOutput], None],
               is_cancelled: Callable[[], bool] = lambda: False) -> None:
        """Queue a request; raises InvalidArgument for bad input and Unavailable when the queue is full."""
        sequence = self._prepare(request, emit, is_cancelled)
        with self._wake:
            if self._stopping:
                raise Unavailable("engine is shutting down; retry later")
            if len(self._waiting) >= self.settings.max_queue_size:
                raise Unavailable(f"engine queue is full ({len(self._waiting)} waiting); retry later")
            self._waiting.append(sequence)
            self._wake.notify()

    def _prepare(self, request: GenerationRequest, emit: Callable[[EngineOutput], None],
                 is_cancelled: Callable[[], bool]) -> _Sequence:
        prompt = [int(token) for token in request.input_ids]
        context = self.settings.max_context_length
        if not 0 < len(prompt) < context:
            raise InvalidArgument(f"input_ids: a prompt of {len(prompt)} tokens is not allowed; allowed: "
                                  f"1..{context - 1} tokens (max_context_length {context})")
        if not all(0 <= token < self.vocab_size for token in prompt):
            raise InvalidArgument(f"input_ids: token ids must be in 0..{self.vocab_size - 1}")
        room = context - len(prompt)
        if not 0 < request.max_new_tokens <= room:
            raise InvalidArgument(f"request_output_len = {request.max_new_tokens} is not allowed; allowed: "
                                  f"1..{room} (max_context_length {context} minus the {len(prompt)} prompt tokens)")
        params = request.sampling
        if params.end_id is None and self.end_id_default is not None:
            params = replace(params, end_id=self.end_id_default)
        params.validate(self.vocab_size)
        return _Sequence(request=request, emit=emit, is_cancelled=is_cancelled,
                         sampler=Sampler(params, len(prompt)), tokens=prompt, prompt_length=len(prompt),
                         reserved_tokens=len(prompt) + request.max_new_tokens)

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters (read without stopping the loop)."""
        counters = self.runner.counters
        with self._wake:
            waiting = len(self._waiting)
        return EngineStats(
            running=len(self._running), prefilling=sum(len(p.sequences) for p in self._prefilling), waiting=waiting,
            kv_tokens_reserved=self._reserved_tokens, kv_tokens_in_use=int(self._batch.lengths.sum()),
            kv_slots_allocated=self._batch.rows * self._batch.columns, decode_steps=counters.decode_steps,
            prompt_tokens=self._totals.prompt_tokens, tokens_generated=self._totals.tokens_generated,
            prefill_padding_ratio=counters.prefill_padding_ratio, decode_padding_ratio=counters.decode_padding_ratio,
            decode_kv_bytes_per_step=counters.decode_kv_bytes / max(counters.decode_steps, 1),
            finished=dict(self._totals.finished))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; every request still waiting or running gets a final UNAVAILABLE-style error output."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # ---- loop -------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not (self._waiting or self._running or self._prefilling):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._iteration()
            except Exception as error:  # a failed run must not take the loop down: fail what was in flight
                log.exception("engine iteration failed")
                self._fail_in_flight(RuntimeError(f"engine failure: {type(error).__name__}: {error}"))
        shutting_down = Unavailable("engine is shutting down; retry later")
        self._fail_in_flight(shutting_down)
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for sequence in waiting:
            self._finish(sequence, FinishReason.ERROR, shutting_down)

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._run_prefill()
        self._retire_done()
        if self._running:
            logits = self._batch.step(np.array([sequence.tokens[-1] for sequence in self._running]))
            self._append_tokens(self._running, logits)

    def _drop_cancelled(self) -> None:
        for sequence in self._running + [s for p in self._prefilling for s in p.sequences]:
            if not sequence.done and sequence.is_cancelled():
                self._finish(sequence, FinishReason.CANCELLED)
        now = time.monotonic()
        if now - self._last_waiting_poll < WAITING_CANCEL_POLL_SECONDS:
            return
        self._last_waiting_poll = now
        with self._wake:
            cancelled = [sequence for sequence in self._waiting if sequence.is_cancelled()]
            for sequence in cancelled:
                self._waiting.remove(sequence)
        for sequence in cancelled:
            self._finish(sequence, FinishReason.CANCELLED)

    def _admit(self) -> None:
        """Move waiting requests in arrival order into prefill groups while batch size and KV budget allow."""
        admitted: list[_Sequence] = []
        in_flight = len(self._running) + sum(len(p.sequences) for p in self._prefilling)
        with self._wake:
            while self._waiting and in_flight + len(admitted) < self.settings.max_batch_size:
                head = self._waiting[0]
                if self._reserved_tokens + head.reserved_tokens > self.settings.kv_cache_max_tokens:
                    break  # the head waits for KV to free up; later requests do not overtake it
                admitted.append(self._waiting.popleft())
                head.admitted = True
                self._reserved_tokens += head.reserved_tokens
        for group in self._group_by_length(admitted):
            self._totals.prompt_tokens += sum(sequence.prompt_length for sequence in group)
            prefill = self.runner.start_prefill([sequence.tokens for sequence in group], self.pad_id)
            self._prefilling.append(_Prefill(prefill, group))

    def _group_by_length(self, sequences: list[_Sequence]) -> list[list[_Sequence]]:
        """Runs of similar prompt lengths (longest <= shortest * prefill_group_ratio), so padding stays small."""
        groups: list[list[_Sequence]] = []
        for sequence in sorted(sequences, key=lambda s: s.prompt_length):
            if groups and sequence.prompt_length <= groups[-1][0].prompt_length * self.settings.prefill_group_ratio:
                groups[-1].append(sequence)
            else:
                groups.append([sequence])
        return groups

    def _run_prefill(self) -> None:
        """Spend up to prefill_chunk_tokens on prefill (at least one chunk); finished groups join the decode batch."""
        budget = full = self.settings.prefill_chunk_tokens
        for prefill in self._prefilling:
            group = prefill.group
            while not group.finished and (budget >= group.rows or budget == full):
                budget -= self.runner.prefill_step(group, budget)
        finished = [prefill for prefill in self._prefilling if prefill.group.finished]
        if not finished:
            return
        self._prefilling = [prefill for prefill in self._prefilling if not prefill.group.finished]
        self._batch.merge([prefill.group for prefill in finished])
        for prefill in finished:
            self._running.extend(prefill.sequences)
            self._append_tokens(prefill.sequences, prefill.group.last_logits)

    def _append_tokens(self, sequences: list[_Sequence], logits: np.ndarray) -> None:
        """Sample the next token of every live sequence from its logits row, emit it, finish where due."""
        live = [row for row, sequence in enumerate(sequences) if not sequence.done]
        if not live:
            return
        chosen = [sequences[row] for row in live]
        rows = logits if len(live) == len(sequences) else logits[live]
        next_ids = sample_batch(rows, [s.sampler for s in chosen], [s.tokens for s in chosen])
        if self.token_timer is not None:
            self._time_tokens(chosen)
        self._totals.tokens_generated += len(chosen)
        for sequence, token in zip(chosen, next_ids.tolist()):
            sequence.tokens.append(token)
            reason = finish_reason(sequence.sampler.params, sequence.generated, sequence.request.max_new_tokens)
            if reason is None:
                if sequence.request.streaming:
                    self._send(sequence, self._stream_piece(sequence, sequence.generated))
            else:
                self._finish(sequence, reason)

    def _time_tokens(self, sequences: list[_Sequence]) -> None:
        """Report when these sequences got their next token (called before it is appended)."""
        now = time.perf_counter()
        first: list[float] = []
        gaps: list[float] = []
        for sequence in sequences:
            started = len(sequence.tokens) > sequence.prompt_length
            (gaps if started else first).append(now - sequence.last_token_at)
            sequence.last_token_at = now
        self.token_timer.record(first, gaps)

    def _retire_done(self) -> None:
        keep = [row for row, sequence in enumerate(self._running) if not sequence.done]
        if len(keep) < len(self._running):
            self._running = [self._running[row] for row in self._batch.retire(keep)]

    # ---- outputs ----------------------------------------------------------------------------------------------

    @staticmethod
    def _stream_piece(sequence: _Sequence, output: list[int], final: bool = False,
                      reason: FinishReason | None = None) -> EngineOutput:
        """The ids of `output` not sent yet, after up to ENGINE_CONTEXT_TOKENS already-sent ids as context."""
        context = output[max(0, sequence.sent - ENGINE_CONTEXT_TOKENS):sequence.sent]
        new = output[sequence.sent:]
        sequence.sent = len(output)
        return EngineOutput(context + new, len(context), final, reason)

    def _finish(self, sequence: _Sequence, reason: FinishReason, error: Exception | None = None) -> None:
        """Release the sequence's KV reservation and send its final output."""
        if sequence.done:
            return
        sequence.done = True
        if sequence.admitted:
            self._reserved_tokens -= sequence.reserved_tokens
        self._totals.finished[reason.value] = self._totals.finished.get(reason.value, 0) + 1
        if reason in (FinishReason.CANCELLED, FinishReason.ERROR):
            self._send(sequence, EngineOutput([], 0, True, reason, error))
            return
        output = sequence.generated[:-1] if reason is FinishReason.END_ID else sequence.generated
        if sequence.request.streaming:
            self._send(sequence, self._stream_piece(sequence, output, True, reason))
        else:
            prefix = [] if sequence.request.exclude_input_in_output else sequence.tokens[:sequence.prompt_length]
            self._send(sequence, EngineOutput(prefix + output, 0, True, reason))

    def _send(self, sequence: _Sequence, output: EngineOutput) -> None:
        try:
            sequence.emit(output)
        except Exception:  # the client is gone: stop spending steps on it
            log.exception("emit failed; dropping the sequence")
            if not sequence.done:
                self._finish(sequence, FinishReason.CANCELLED)

    def _fail_in_flight(self, error: Exception) -> None:
        for sequence in self._running + [s for p in self._prefilling for s in p.sequences]:
            self._finish(sequence, FinishReason.ERROR, error)
        self._prefilling = []
        self._running = []
        self._batch = DecodeBatch(self.runner)
