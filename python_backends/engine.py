"""In-flight (continuous) batching engine over ONNX Runtime.

One loop thread owns the executor (onnx_runner.OnnxDecoder: the session and the KV slot pool). Every iteration it
drops cancelled sequences, asks the scheduler (scheduler.py) for a plan, runs it (slot moves, prefix loads, prefill
runs within `prefill_chunk_tokens`, one batched decode step over every running sequence), samples the next token
of each sequence that got logits, emits it and marks finished sequences, which the scheduler retires. When the plan
lets sequences draft (speculative.py), the decode step becomes a verification of each row's drafted tokens: tokens
are sampled position by position while they match the drafts, and the KV of rejected positions is rolled back. Requests arrive
from any thread through `submit`; outputs leave through each request's `emit` callback, called on the loop thread.
A request with a `guide` (structured output, guided.py) has its grammar compiled in `submit`; the masks of guided
rows are computed on guided.MaskWorker's thread while the forward pass that needs them runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from tritonllm.contract import SPECULATIVE_DRAFTERS, EngineSettings
from tritonllm.python_backends.detokenizer import ENGINE_CONTEXT_TOKENS
from tritonllm.python_backends.errors import InvalidArgument, Unavailable
from tritonllm.python_backends.guided import GrammarCompiler, GuideSpec, MaskWorker, PendingMasks, TokenGuide
from tritonllm.python_backends.onnx_runner import OnnxDecoder
from tritonllm.python_backends.prefix_cache import PrefixCache
from tritonllm.python_backends.sampling import Sampler, SamplingParams, sample_batch
from tritonllm.python_backends.scheduler import PrefillRun, Scheduler, SchedulerLimits, SequenceState, StepPlan
from tritonllm.python_backends.speculative import ModelDrafter, PromptLookup
from tritonllm.python_backends.stop_criteria import FinishReason, finish_reason

log = logging.getLogger(__name__)

# `is_cancelled` of a Triton request is a round trip to the server process; waiting requests (up to max_queue_size)
# are polled at this period rather than every step. Running sequences are polled every step.
WAITING_CANCEL_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. `sampling.end_id` None: it ends only by max tokens, stop words or cancellation."""

    input_ids: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    streaming: bool = False
    exclude_input_in_output: bool = False
    tenant: str = ""  # prefix reuse never crosses tenants
    guide: GuideSpec | None = None  # structured output: new tokens follow this grammar
    speculative: str | None = None  # drafter (contract.SPECULATIVE_DRAFTERS, "off": none); None: the engine's default


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
    kv_tokens_in_use: int  # tokens held in the slots of admitted sequences
    decode_steps: int
    prompt_tokens: int
    tokens_generated: int
    prefill_padding_ratio: float  # right padding / real prompt tokens computed in batched fresh prefills
    decode_kv_bytes_per_step: float  # KV bytes read (past) + written (new tokens) per decode step, averaged
    decode_tokens: int  # tokens sampled by decode steps (verifying steps included)
    decode_row_steps: int  # sum over those steps of their rows: decode_tokens / this = tokens per target step (1 plain)
    verify_runs: int  # single-row runs that verified drafted tokens (a verifying step runs one per row)
    speculative_drafter: str  # EngineSettings.speculative_drafter: the default of requests naming none
    drafted_tokens: int  # proposed by the drafters and verified
    accepted_tokens: int  # of those, kept (each one a target step saved)
    drafted_by: dict[str, int]  # drafted_tokens per drafter
    accepted_by: dict[str, int]  # accepted_tokens per drafter
    kv_bytes_copied: int  # by slot moves and prefix loads/stores
    prefix_lookup_tokens: int  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int  # of those, loaded from cached blocks instead of computed
    prefix_cached_tokens: int  # tokens held by the prefix cache now
    finished: dict[str, int]  # sequences by finish reason


class TokenTimer(Protocol):
    def record(self, first_token_seconds: list[float], inter_token_seconds: list[float]) -> None:
        """Called on the loop thread once per step that sampled tokens: seconds from submit to each first token,
        and between consecutive tokens of each sequence. Must return quickly (no I/O)."""


@dataclass(eq=False, kw_only=True)
class _Sequence(SequenceState):
    request: GenerationRequest
    emit: Callable[[EngineOutput], None]
    is_cancelled: Callable[[], bool]
    sampler: Sampler
    guide: TokenGuide | None = None
    drafter: str = "off"  # contract.SPECULATIVE_DRAFTERS; speculative (the scheduler's flag) unless "off"
    sent: int = 0  # generated ids already emitted (streaming)
    finished: bool = False  # the final output was sent
    last_token_at: float = field(default_factory=time.perf_counter)  # submit time until the first token

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length:]


@dataclass
class _Totals:
    prompt_tokens: int = 0
    tokens_generated: int = 0
    decode_tokens: int = 0
    decode_row_steps: int = 0
    drafted_by: dict[str, int] = field(default_factory=dict)
    accepted_by: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)


class Engine:
    """Continuous batching of generation requests over one ONNX decoder graph (builders/onnx_graph.py)."""

    def __init__(self, onnx_path: Path | str, settings: EngineSettings, token_timer: TokenTimer | None = None,
                 tokenizer_dir: Path | str | None = None, draft_onnx_path: Path | str | None = None) -> None:
        """`tokenizer_dir` (a folder holding tokenizer.json) enables guided requests; without it they are refused.
        `draft_onnx_path` (a decoder graph with the target's vocabulary) enables the draft_model drafter."""
        settings.validate()
        if settings.speculative_drafter == ModelDrafter.name and draft_onnx_path is None:
            raise ValueError("engine.speculative_drafter = 'draft_model' needs a draft model graph "
                             "(parameter draft_onnx_path; build with --draft int8|int4 or --draft-model DIR)")
        self.settings = settings
        self.executor = OnnxDecoder(onnx_path, settings.max_batch_size, settings.max_context_length,
                                    settings.intra_op_threads)
        self.vocab_size = self.executor.vocab_size
        self.token_timer = token_timer
        self.grammars = None if tokenizer_dir is None else GrammarCompiler(tokenizer_dir, self.vocab_size)
        self.masks = None if self.grammars is None else MaskWorker(self.grammars)
        self.prefix_cache = PrefixCache(settings.prefix_block_tokens, settings.prefix_cache_max_tokens)
        self.prompt_lookup = PromptLookup(settings.prompt_lookup_max_ngram, settings.prompt_lookup_min_ngram)
        self.draft_model = None
        if draft_onnx_path is not None:
            self.draft_model = ModelDrafter(draft_onnx_path, settings.max_batch_size, settings.max_context_length,
                                            settings.intra_op_threads)
            if self.draft_model.vocab_size != self.vocab_size:
                raise ValueError(f"draft model {draft_onnx_path} has a vocabulary of {self.draft_model.vocab_size} "
                                 f"tokens, the target {self.vocab_size}; allowed: a draft sharing the tokenizer")
        # What a request's `speculative` input may name.
        self.drafters = tuple(name for name in SPECULATIVE_DRAFTERS
                              if name != ModelDrafter.name or self.draft_model is not None)
        self.scheduler = Scheduler(SchedulerLimits(settings.max_batch_size, settings.kv_cache_max_tokens,
                                                   settings.prefill_chunk_tokens, settings.prefill_group_ratio,
                                                   settings.speculative_max_draft_tokens,
                                                   settings.speculative_max_batch_size),
                                   self.prefix_cache)
        self._incoming: deque[_Sequence] = deque()  # submitted, not yet handed to the scheduler (any thread)
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
            queued = len(self._incoming) + len(self.scheduler.waiting)
            if queued >= self.settings.max_queue_size:
                raise Unavailable(f"engine queue is full ({queued} waiting); retry later")
            self._incoming.append(sequence)
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
        params.validate(self.vocab_size)
        guide = None
        if request.guide is not None:
            if self.grammars is None:
                raise InvalidArgument(f"input {request.guide.input_name}: this engine has no tokenizer configured "
                                      "(parameter tokenizer_path), so it cannot constrain its output")
            guide = self.grammars.compile(request.guide)
        drafter = self.settings.speculative_drafter if request.speculative is None else request.speculative
        if drafter not in self.drafters:
            raise InvalidArgument(f"speculative = {drafter!r} is not allowed; allowed: {', '.join(self.drafters)}"
                                  + ("" if self.draft_model else " (draft_model needs a build with a draft model)"))
        if guide is not None:
            drafter = "off"  # a grammar mask per drafted position would need every token before it
        return _Sequence(tokens=prompt, prompt_length=len(prompt),
                         reserved_tokens=len(prompt) + request.max_new_tokens, tenant=request.tenant,
                         request=request, emit=emit, is_cancelled=is_cancelled, sampler=Sampler(params, len(prompt)),
                         guide=guide, drafter=drafter, speculative=drafter != "off")

    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters (read without stopping the loop)."""
        counters, pool, prefix = self.executor.counters, self.executor.pool, self.prefix_cache.stats
        scheduler = self.scheduler
        with self._wake:
            waiting = len(self._incoming) + len(scheduler.waiting)
            decoding, prefilling = len(scheduler.decoding), len(scheduler.prefilling)
        return EngineStats(
            running=decoding, prefilling=prefilling, waiting=waiting,
            kv_tokens_reserved=scheduler.reserved_tokens,
            kv_tokens_in_use=int(pool.lengths[:decoding + prefilling].sum()), decode_steps=counters.decode_steps,
            prompt_tokens=self._totals.prompt_tokens, tokens_generated=self._totals.tokens_generated,
            prefill_padding_ratio=counters.prefill_padding_ratio,
            decode_kv_bytes_per_step=counters.decode_kv_bytes / max(counters.decode_steps, 1),
            decode_tokens=self._totals.decode_tokens, decode_row_steps=self._totals.decode_row_steps,
            verify_runs=counters.verify_runs,
            speculative_drafter=self.settings.speculative_drafter,
            drafted_tokens=sum(self._totals.drafted_by.values()),
            accepted_tokens=sum(self._totals.accepted_by.values()),
            drafted_by=dict(self._totals.drafted_by), accepted_by=dict(self._totals.accepted_by),
            kv_bytes_copied=pool.bytes_copied, prefix_lookup_tokens=prefix.lookup_tokens,
            prefix_hit_tokens=prefix.hit_tokens, prefix_cached_tokens=self.prefix_cache.tokens,
            finished=dict(self._totals.finished))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; every request still waiting or running gets a final UNAVAILABLE-style error output."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)
        if self.masks is not None:
            self.masks.close()

    # ---- loop -------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not (self._incoming or self.scheduler.has_work):
                    self._wake.wait()
                if self._stopping:
                    break
                while self._incoming:
                    self.scheduler.add(self._incoming.popleft())
            try:
                self._iteration()
            except Exception as error:  # a failed run must not take the loop down: fail what was in flight
                log.exception("engine iteration failed")
                self._fail_in_flight(RuntimeError(f"engine failure: {type(error).__name__}: {error}"))
        shutting_down = Unavailable("engine is shutting down; retry later")
        self._fail_in_flight(shutting_down)
        with self._wake:
            waiting = list(self._incoming) + list(self.scheduler.waiting)
            self._incoming.clear()
            self.scheduler.waiting.clear()
        for sequence in waiting:
            self._finish(sequence, FinishReason.ERROR, shutting_down)

    def _iteration(self) -> None:
        self._drop_cancelled()
        plan = self.scheduler.schedule()
        self._execute(plan)
        self.scheduler.update(plan)

    def _execute(self, plan: StepPlan) -> None:
        executor, pool = self.executor, self.executor.pool
        for source, target in plan.moves:
            pool.move(source, target)
            if self.draft_model is not None:
                self.draft_model.move(source, target)
        for load in plan.loads:
            for number, block in enumerate(load.blocks):
                pool.write(load.slot, number * self.prefix_cache.block_tokens, block)
        for run in plan.prefills:
            self._prefill(run)
        for store in plan.stores:
            self.prefix_cache.store(store.key, pool.read(store.slot, store.start,
                                                          store.start + self.prefix_cache.block_tokens))
        if plan.decode:
            sequences: list[_Sequence] = plan.decode  # type: ignore[assignment]
            masks = self._start_masks(sequences)
            before = self._totals.tokens_generated
            drafts = [self._draft(slot, sequence, limit)
                      for slot, (sequence, limit) in enumerate(zip(sequences, plan.draft_limits))]
            if any(tokens for tokens, _ in drafts):
                self._verify(plan, sequences, drafts, masks)
            else:
                self._append_tokens(sequences, executor.decode([sequence.tokens[-1] for sequence in sequences]),
                                    masks)
            self._totals.decode_tokens += self._totals.tokens_generated - before
            self._totals.decode_row_steps += len(sequences)

    def _draft(self, slot: int, sequence: _Sequence, limit: int) -> tuple[list[int], list | None]:
        """The drafted tokens of the sequence in `slot` (none when its limit is 0), with the draft's distributions
        when a draft model sampled them."""
        if limit <= 0:
            return [], None
        if sequence.drafter == PromptLookup.name:
            return self.prompt_lookup.propose(sequence.tokens, limit), None
        return self.draft_model.propose(slot, sequence, sequence.tokens, limit, sequence.sampler)

    def _verify(self, plan: StepPlan, sequences: list[_Sequence], drafts: list[tuple[list[int], list | None]],
                masks: PendingMasks | None) -> None:
        """Score every row's last token + drafts (one run per row); position by position, choose each row's token
        with the drafted one proposed (greedy: the target's argmax, sampled: speculative sampling) while the chosen
        tokens equal the drafts; roll the slots back to what was kept."""
        lengths = [len(sequence.tokens) for sequence in sequences]
        logits = [self.executor.verify(slot, [sequence.tokens[-1], *tokens])
                  for slot, (sequence, (tokens, _)) in enumerate(zip(sequences, drafts))]

        def proposal(row: int, position: int) -> tuple[int, object] | None:
            tokens, distributions = drafts[row]
            if position >= len(tokens):
                return None
            return tokens[position], None if distributions is None else distributions[position]

        rows = list(range(len(sequences)))
        for position in range(max(len(tokens) for tokens, _ in drafts) + 1):
            self._append_tokens([sequences[row] for row in rows], np.stack([logits[row][position] for row in rows]),
                                masks if position == 0 else None, [proposal(row, position) for row in rows])
            rows = [row for row in rows if position < len(drafts[row][0]) and not sequences[row].done
                    and sequences[row].tokens[-1] == drafts[row][0][position]]
            if not rows:
                break
        plan.drafted = [len(tokens) for tokens, _ in drafts]
        plan.accepted = [max(0, len(sequence.tokens) - length - 1) for sequence, length in zip(sequences, lengths)]
        for sequence, drafted, accepted in zip(sequences, plan.drafted, plan.accepted):
            if drafted:
                totals = self._totals
                totals.drafted_by[sequence.drafter] = totals.drafted_by.get(sequence.drafter, 0) + drafted
                totals.accepted_by[sequence.drafter] = totals.accepted_by.get(sequence.drafter, 0) + accepted
        for slot, sequence in enumerate(sequences):
            if not sequence.done:  # the newest token's KV is written by the next step, as after a decode
                self.executor.truncate(slot, len(sequence.tokens) - 1)

    def _prefill(self, run: PrefillRun) -> None:
        sequences: list[_Sequence] = run.sequences  # type: ignore[assignment]
        chunks = [sequence.tokens[start:end] for sequence, (start, end) in zip(sequences, run.ranges)]
        completed = [row for row in range(len(sequences)) if run.completes(row)]
        masks = self._start_masks([sequences[row] for row in completed])
        if run.fresh:
            logits = self.executor.prefill(run.first_slot, chunks)
        else:
            logits = self.executor.extend(run.first_slot, run.ranges[0][0], chunks[0])
        self._totals.prompt_tokens += sum(sequences[row].prompt_length for row in completed)
        if completed:
            self._append_tokens([sequences[row] for row in completed],
                                logits if len(completed) == len(sequences) else logits[completed], masks)

    def _drop_cancelled(self) -> None:
        for sequence in self.scheduler.in_flight():
            if not sequence.done and sequence.is_cancelled():
                self._finish(sequence, FinishReason.CANCELLED)
        now = time.monotonic()
        if now - self._last_waiting_poll < WAITING_CANCEL_POLL_SECONDS:
            return
        self._last_waiting_poll = now
        with self._wake:
            cancelled = self.scheduler.drop_waiting(lambda sequence: sequence.is_cancelled())
        for sequence in cancelled:
            self._finish(sequence, FinishReason.CANCELLED)

    def _start_masks(self, sequences: list[_Sequence]) -> PendingMasks | None:
        """Begin the grammar masks of the guided ones among `sequences` (their next logits rows, in order)."""
        if self.masks is None:
            return None
        return self.masks.start([sequence.guide for sequence in sequences],
                                [sequence.sampler.params.end_id for sequence in sequences])

    def _append_tokens(self, sequences: list[_Sequence], logits: np.ndarray, masks: PendingMasks | None,
                       drafted: list | None = None) -> None:
        """Sample the next token of every live sequence from its logits row, emit it, finish where due. `drafted`:
        per sequence, the drafted token at this position and the draft's distribution (sampling.sample_batch)."""
        live = [row for row, sequence in enumerate(sequences) if not sequence.done]
        if not live:
            return
        chosen = [sequences[row] for row in live]
        if masks is not None:
            rows = masks.apply(logits, live)
        else:
            rows = logits if len(live) == len(sequences) else logits[live]
        next_ids = sample_batch(rows, [s.sampler for s in chosen], [s.tokens for s in chosen],
                                None if drafted is None else [drafted[row] for row in live])
        if self.token_timer is not None:
            self._time_tokens(chosen)
        self._totals.tokens_generated += len(chosen)
        for sequence, token in zip(chosen, next_ids.tolist()):
            sequence.tokens.append(token)
            reason = finish_reason(sequence.sampler.params, sequence.generated, sequence.request.max_new_tokens)
            if reason is None and sequence.guide is not None:  # a finishing token needs no next mask
                if not sequence.guide.advance(token):  # only when bans left the grammar no token to allow
                    self._finish(sequence, FinishReason.ERROR, InvalidArgument(
                        f"input {sequence.request.guide.input_name}: no token is allowed by both the grammar and "
                        f"bad_words/min_tokens after {len(sequence.generated) - 1} tokens ({sequence.guide.error})"))
                    continue
                if sequence.guide.complete:
                    reason = FinishReason.GRAMMAR
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
        """Mark the sequence done (the scheduler frees its slot and KV at the next step) and send its final output."""
        if sequence.finished:
            return
        sequence.done = sequence.finished = True
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
            if not sequence.finished:
                self._finish(sequence, FinishReason.CANCELLED)

    def _fail_in_flight(self, error: Exception) -> None:
        """Fail every admitted sequence and start over with empty slots."""
        for sequence in self.scheduler.in_flight():
            self._finish(sequence, FinishReason.ERROR, error)
        self.scheduler.clear_in_flight()
        self.executor.pool.lengths[:] = 0
        if self.draft_model is not None:
            self.draft_model.clear()
