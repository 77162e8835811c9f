"""The scheduler of the in-flight batching engine: it decides every step, the executor runs it (vLLM v1's shape).

`schedule()` returns a `StepPlan`:
- slot moves that keep the decoding sequences at slots 0..R-1 and the prefilling ones right after them, in order
  (a decode step binds one contiguous range of slots; the executor's pool copies only the tokens a slot holds);
- admissions: waiting requests in arrival order while a slot is free and the KV budget (prompt + max new tokens of
  every admitted sequence, reserved at admission) allows; a request that does not fit waits and later requests do
  not overtake it. Each admitted prompt is looked up in the prefix cache, and the blocks found are loaded into its
  slot instead of being recomputed;
- prefill runs within `prefill_chunk_tokens` tokens a step: fresh prompts of similar length (longest <= shortest x
  `prefill_group_ratio`) together in one run, a long prompt in chunks, a prompt after a reused prefix as a
  continuation of its slot. Prompts complete in slot order, so completed ones join the decode range without moves;
- prefix blocks to store once the runs are done (full prompt blocks not cached yet);
- the decode rows: every decoding sequence, one token each, or, when speculating, each row with up to
  `draft_limits[i]` drafted tokens verified in its own run. Speculation is a latency tool: a verifying step reads
  the weights once per row, a decode step once per batch, so it stops above `speculative_max_batch` rows. Each
  sequence's own limit adapts to its measured acceptance (speculative.next_draft_limit, from the `drafted` and
  `accepted` counts the engine records in the plan).

`update(plan)` records what the executor computed and moves completed prompts into the decode range. Finished or
cancelled sequences are marked `done` by the engine and leave at the next `schedule()`. Nothing here touches ONNX
Runtime: the policy is unit-tested on its own (tests/test_scheduler.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tritonllm.python_backends.prefix_cache import PrefixCache
from tritonllm.python_backends.speculative import next_draft_limit


@dataclass(eq=False)
class SequenceState:
    """What the scheduler knows of a sequence; the engine's sequence extends it."""

    tokens: list[int]  # prompt + generated so far
    prompt_length: int
    reserved_tokens: int  # KV budget held from admission to retirement
    tenant: str = ""
    slot: int = -1
    computed: int = 0  # prompt tokens whose KV is in the slot (prefill progress)
    prefix_hit_tokens: int = 0
    admitted: bool = False
    done: bool = False
    speculative: bool = False  # may draft tokens (greedy, unguided, the engine has a drafter)
    draft_limit: int = 0  # drafted tokens it may verify in one step, adapted to its acceptance


@dataclass
class PrefillRun:
    """One executor run: `fresh` prompts into empty consecutive slots, or a continuation of one slot."""

    first_slot: int
    sequences: list[SequenceState]
    ranges: list[tuple[int, int]]  # prompt tokens [start, end) of each sequence computed by this run
    fresh: bool

    def completes(self, row: int) -> bool:
        return self.ranges[row][1] == self.sequences[row].prompt_length


@dataclass
class PrefixLoad:
    slot: int
    blocks: list[np.ndarray]


@dataclass
class PrefixStore:
    slot: int
    start: int  # first token of the block in the slot
    key: bytes


@dataclass
class StepPlan:
    moves: list[tuple[int, int]] = field(default_factory=list)  # (from slot, to slot), in this order
    loads: list[PrefixLoad] = field(default_factory=list)
    prefills: list[PrefillRun] = field(default_factory=list)
    stores: list[PrefixStore] = field(default_factory=list)  # after the prefill runs
    decode: list[SequenceState] = field(default_factory=list)  # sequence i is in slot i
    draft_limits: list[int] = field(default_factory=list)  # per decode row; empty: plain decode
    # Recorded by the engine when it ran a verification: per decode row, tokens drafted and accepted.
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SchedulerLimits:
    slots: int  # sequences in flight (decode batch + prefilling)
    kv_budget_tokens: int
    prefill_chunk_tokens: int
    prefill_group_ratio: float
    max_draft_tokens: int = 0  # 0: no speculation
    speculative_max_batch: int = 0  # decode rows a verifying step may have


class Scheduler:
    def __init__(self, limits: SchedulerLimits, prefix_cache: PrefixCache) -> None:
        self.limits = limits
        self.prefix_cache = prefix_cache
        self.waiting: deque[SequenceState] = deque()
        self.decoding: list[SequenceState] = []  # decoding[i].slot == i
        self.prefilling: list[SequenceState] = []  # prefilling[j].slot == len(decoding) + j
        self.reserved_tokens = 0

    # ---- queue ------------------------------------------------------------------------------------------------

    def add(self, sequence: SequenceState) -> None:
        self.waiting.append(sequence)

    def drop_waiting(self, is_gone: Callable[[SequenceState], bool]) -> list[SequenceState]:
        """Remove and return the waiting sequences for which `is_gone` holds (cancelled before admission)."""
        gone = [sequence for sequence in self.waiting if is_gone(sequence)]
        for sequence in gone:
            self.waiting.remove(sequence)
        return gone

    def in_flight(self) -> list[SequenceState]:
        return self.decoding + self.prefilling

    def clear_in_flight(self) -> None:
        """Forget every admitted sequence (after a failed step); their KV reservations are released."""
        for sequence in self.in_flight():
            if sequence.admitted:
                self.reserved_tokens -= sequence.reserved_tokens
                sequence.admitted = False
        self.decoding, self.prefilling = [], []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.decoding or self.prefilling)

    # ---- one step ---------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._retire(plan)
        self._admit(plan)
        self._plan_prefill(plan)
        plan.decode = list(self.decoding)
        self._plan_drafts(plan)
        return plan

    def update(self, plan: StepPlan) -> None:
        """The executor ran `plan`: prompts advanced; completed ones join the decode range (in slot order)."""
        for run in plan.prefills:
            for sequence, (_, end) in zip(run.sequences, run.ranges):
                sequence.computed = end
        while self.prefilling and self.prefilling[0].computed == self.prefilling[0].prompt_length:
            self.decoding.append(self.prefilling.pop(0))
        for sequence, drafted, accepted in zip(plan.decode, plan.drafted, plan.accepted):
            sequence.draft_limit = next_draft_limit(sequence.draft_limit, drafted, accepted,
                                                    self.limits.max_draft_tokens)

    def _plan_drafts(self, plan: StepPlan) -> None:
        if (self.limits.max_draft_tokens == 0 or not 0 < len(plan.decode) <= self.limits.speculative_max_batch
                or not any(sequence.speculative for sequence in plan.decode)):
            return
        # A drafted token past the last one the sequence may generate could never be kept.
        plan.draft_limits = [max(0, min(sequence.draft_limit, sequence.reserved_tokens - len(sequence.tokens) - 1))
                             if sequence.speculative else 0 for sequence in plan.decode]

    def _retire(self, plan: StepPlan) -> None:
        """Release done sequences; fill the holes so decoding stays at 0..R-1 and prefilling right after it."""
        for sequence in self.decoding + self.prefilling:
            if sequence.done and sequence.admitted:
                self.reserved_tokens -= sequence.reserved_tokens
                sequence.admitted = False
        decoding = [sequence for sequence in self.decoding if not sequence.done]
        prefilling = [sequence for sequence in self.prefilling if not sequence.done]
        if len(decoding) == len(self.decoding) and len(prefilling) == len(self.prefilling):
            return
        count = len(decoding)
        stay = [sequence for sequence in decoding if sequence.slot < count]
        movers = [sequence for sequence in decoding if sequence.slot >= count]
        holes = sorted(set(range(count)) - {sequence.slot for sequence in stay})
        targets = {id(sequence): hole for sequence, hole in zip(movers, holes)}
        targets.update({id(sequence): count + index for index, sequence in enumerate(prefilling)})
        # Every move goes to a lower slot, so in ascending target order each target is free when it is written.
        moving = sorted((s for s in decoding + prefilling if targets.get(id(s), s.slot) != s.slot),
                        key=lambda s: targets[id(s)])
        for sequence in moving:
            plan.moves.append((sequence.slot, targets[id(sequence)]))
            sequence.slot = targets[id(sequence)]
        self.decoding = sorted(decoding, key=lambda sequence: sequence.slot)
        self.prefilling = prefilling

    def _admit(self, plan: StepPlan) -> None:
        limits = self.limits
        while self.waiting and len(self.decoding) + len(self.prefilling) < limits.slots:
            head = self.waiting[0]
            if self.reserved_tokens + head.reserved_tokens > limits.kv_budget_tokens:
                break  # the head waits for KV to free up; later requests do not overtake it
            self.waiting.popleft()
            head.admitted = True
            head.draft_limit = limits.max_draft_tokens if head.speculative else 0
            self.reserved_tokens += head.reserved_tokens
            head.slot = len(self.decoding) + len(self.prefilling)
            self.prefilling.append(head)
            blocks = self.prefix_cache.match(head.tenant, head.tokens[:head.prompt_length])
            if blocks:
                plan.loads.append(PrefixLoad(head.slot, blocks))
                head.computed = head.prefix_hit_tokens = len(blocks) * self.prefix_cache.block_tokens

    def _plan_prefill(self, plan: StepPlan) -> None:
        limits = self.limits
        budget = limits.prefill_chunk_tokens
        index = 0
        while index < len(self.prefilling) and budget > 0:
            sequence = self.prefilling[index]
            remaining = sequence.prompt_length - sequence.computed
            if sequence.computed == 0 and remaining <= budget:
                group, width = [sequence], remaining
                index += 1
                while index < len(self.prefilling):
                    candidate = self.prefilling[index]
                    length = candidate.prompt_length
                    widest, narrowest = max(width, length), min(group[0].prompt_length, length)
                    if (candidate.computed or widest * (len(group) + 1) > budget
                            or widest > narrowest * limits.prefill_group_ratio):
                        break
                    group.append(candidate)
                    width = widest
                    index += 1
                plan.prefills.append(PrefillRun(group[0].slot, group, [(0, s.prompt_length) for s in group], True))
                budget -= width * len(group)
                continue
            tokens = min(remaining, budget)
            plan.prefills.append(PrefillRun(sequence.slot, [sequence],
                                            [(sequence.computed, sequence.computed + tokens)], sequence.computed == 0))
            budget -= tokens
            if tokens < remaining:
                break  # prompts complete in slot order: the next one waits for this one
            index += 1
        for run in plan.prefills:
            for sequence, (_, end) in zip(run.sequences, run.ranges):
                for block, key in self.prefix_cache.missing(sequence.tenant, sequence.tokens[:sequence.prompt_length],
                                                            end):
                    plan.stores.append(PrefixStore(sequence.slot, block * self.prefix_cache.block_tokens, key))
