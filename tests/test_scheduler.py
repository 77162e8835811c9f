"""The engine's scheduling policy on its own: no ONNX Runtime, no server (python_backends/scheduler.py)."""

from __future__ import annotations

import numpy as np

from tritonllm.python_backends.prefix_cache import PrefixCache
from tritonllm.python_backends.scheduler import Scheduler, SchedulerLimits, SequenceState


def scheduler(slots: int = 4, kv_budget: int = 10_000, chunk: int = 64, ratio: float = 1.2,
              prefix_tokens: int = 0, block: int = 4) -> Scheduler:
    return Scheduler(SchedulerLimits(slots, kv_budget, chunk, ratio), PrefixCache(block, prefix_tokens))


def sequence(length: int, new_tokens: int = 8, tenant: str = "", first_token: int = 0) -> SequenceState:
    tokens = list(range(first_token, first_token + length))
    return SequenceState(tokens=tokens, prompt_length=length, reserved_tokens=length + new_tokens, tenant=tenant)


def run_step(scheduler: Scheduler):
    """What the engine does with a plan, minus the model: prompts that complete get one token."""
    plan = scheduler.schedule()
    for run in plan.prefills:
        for row, member in enumerate(run.sequences):
            if run.completes(row):
                member.tokens.append(0)
    for member in plan.decode:
        member.tokens.append(0)
    scheduler.update(plan)
    return plan


def test_admission_is_in_arrival_order_within_slots_and_the_kv_budget():
    s = scheduler(slots=3, kv_budget=100)
    first, big, small = sequence(30, 10), sequence(50, 20), sequence(5, 5)
    for member in (first, big, small):
        s.add(member)
    s.schedule()
    # first (40) fits, big (70) would exceed 100 and waits; small may not overtake it.
    assert s.prefilling == [first] and list(s.waiting) == [big, small] and s.reserved_tokens == 40
    first.done = True
    s.schedule()
    assert [m for m in s.prefilling] == [big, small] and s.reserved_tokens == 80
    assert (big.slot, small.slot) == (0, 1)


def test_similar_fresh_prompts_share_one_run_and_long_ones_are_chunked_in_slot_order():
    s = scheduler(slots=4, chunk=64)
    a, b, c = sequence(20), sequence(22), sequence(150)
    for member in (a, b, c):
        s.add(member)
    plan = run_step(s)
    assert len(plan.prefills) == 2
    assert plan.prefills[0].fresh and plan.prefills[0].sequences == [a, b] and plan.prefills[0].first_slot == 0
    assert plan.prefills[1].fresh and plan.prefills[1].ranges == [(0, 64 - 44)]  # the rest of the budget
    assert s.decoding == [a, b] and s.prefilling == [c]
    plan = run_step(s)
    assert [r.ranges for r in plan.prefills] == [[(20, 84)]] and not plan.prefills[0].fresh
    assert plan.decode == [a, b]  # running streams get a token every step while c is read
    run_step(s)  # 84..148
    plan = run_step(s)
    assert [r.ranges for r in plan.prefills] == [[(148, 150)]] and c in s.decoding
    plan = run_step(s)
    assert plan.prefills == [] and plan.decode == [a, b, c] and c.slot == 2


def test_dissimilar_lengths_are_prefilled_apart():
    s = scheduler(slots=4, chunk=256, ratio=1.2)
    short, long = sequence(10), sequence(30)
    s.add(short)
    s.add(long)
    plan = s.schedule()
    assert [run.sequences for run in plan.prefills] == [[short], [long]]


def test_retirement_moves_only_down_and_keeps_decode_slots_contiguous():
    s = scheduler(slots=5, chunk=1000)
    members = [sequence(10 + i) for i in range(4)]
    for member in members:
        s.add(member)
    run_step(s)
    run_step(s)  # all four decode at slots 0..3
    late = sequence(40)
    s.add(late)
    members[1].done = True
    plan = s.schedule()
    assert plan.moves == [(3, 1)]  # the last decoding sequence fills the hole
    assert [m.slot for m in s.decoding] == [0, 1, 2] and s.decoding[1] is members[3]
    assert late.slot == 3 and plan.prefills[0].first_slot == 3
    for source, target in plan.moves:
        assert target < source


def test_prefix_blocks_are_reused_within_a_tenant_only():
    s = scheduler(slots=4, chunk=1000, prefix_tokens=64, block=4)
    owner = sequence(18, tenant="a")
    s.add(owner)
    plan = run_step(s)
    assert [store.start for store in plan.stores] == [0, 4, 8, 12]  # full blocks of the prompt
    for store in plan.stores:
        s.prefix_cache.store(store.key, np.zeros((1, 1, 4, 1)))
    same, other = sequence(18, tenant="a"), sequence(18, tenant="b")
    s.add(same)
    s.add(other)
    plan = s.schedule()
    assert [(load.slot, len(load.blocks)) for load in plan.loads] == [(same.slot, 4)]
    assert same.computed == 16 and other.computed == 0
    assert [run.ranges for run in plan.prefills if same in run.sequences] == [[(16, 18)]]


def test_the_last_prompt_token_is_always_computed():
    cache = PrefixCache(block_tokens=4, max_tokens=64)
    assert cache.reusable_blocks(16) == 3 and cache.reusable_blocks(17) == 4 and cache.reusable_blocks(1) == 0
