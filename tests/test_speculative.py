"""Speculative decoding: the prompt lookup drafter, the scheduler's policy, KV rollback and greedy identity."""

from __future__ import annotations

import numpy as np
import pytest

from support import TINY_VOCAB, Collector

from tritonllm.contract import EngineSettings, SettingsError
from tritonllm.python_backends.engine import Engine, GenerationRequest
from tritonllm.python_backends.onnx_runner import OnnxDecoder
from tritonllm.python_backends.prefix_cache import PrefixCache
from tritonllm.python_backends.sampling import SamplingParams
from tritonllm.python_backends.scheduler import Scheduler, SchedulerLimits, SequenceState
from tritonllm.python_backends.speculative import PromptLookup, next_draft_limit


# ---- drafter and adaptation (pure) ----------------------------------------------------------------------------------

def test_prompt_lookup_proposes_what_followed_the_longest_most_recent_match():
    drafter = PromptLookup(max_ngram=3, min_ngram=1)
    # "1 2 3" (at 0) is longer than the more recent "2 3" (at 5), so what followed it comes first.
    assert drafter.propose([1, 2, 3, 4, 9, 2, 3, 5, 7, 1, 2, 3], limit=2) == [4, 9]
    assert drafter.propose([8, 2, 3, 4, 9, 2, 3, 5, 7, 1, 2, 3], limit=2) == [5, 7]  # the most recent "2 3"
    assert drafter.propose([5, 6, 7, 8, 6, 7], limit=4) == [8, 6, 7]  # runs up to the end of the history
    assert drafter.propose([4, 1, 9, 1, 8, 1], limit=1) == [8]  # a 1-gram: its most recent earlier occurrence
    assert drafter.propose([1, 2, 3, 4], limit=5) == []
    assert drafter.propose([1, 2, 1, 2], limit=0) == []
    assert PromptLookup(max_ngram=3, min_ngram=2).propose([4, 1, 9, 1, 8, 1], limit=3) == []


def test_draft_limit_grows_on_full_acceptance_and_shrinks_on_a_rejection():
    assert next_draft_limit(4, drafted=4, accepted=4, maximum=8) == 6
    assert next_draft_limit(7, drafted=3, accepted=3, maximum=8) == 8
    assert next_draft_limit(4, drafted=4, accepted=1, maximum=8) == 3
    assert next_draft_limit(1, drafted=1, accepted=0, maximum=8) == 1
    assert next_draft_limit(5, drafted=0, accepted=0, maximum=8) == 5  # nothing was drafted: nothing measured


def _running(scheduler: Scheduler, count: int, speculative: bool = True) -> list[SequenceState]:
    sequences = [SequenceState(tokens=[1, 2, 3], prompt_length=3, reserved_tokens=3 + 10, speculative=speculative)
                 for _ in range(count)]
    for sequence in sequences:
        scheduler.add(sequence)
    scheduler.update(scheduler.schedule())  # admitted and prefilled
    return sequences


def test_scheduler_speculates_only_up_to_its_batch_size_and_adapts_each_limit():
    limits = SchedulerLimits(slots=8, kv_budget_tokens=1000, prefill_chunk_tokens=64, prefill_group_ratio=4.0,
                             max_draft_tokens=4, speculative_max_batch=2)
    scheduler = Scheduler(limits, PrefixCache(16, 0))
    first, second = _running(scheduler, 2)
    plan = scheduler.schedule()
    assert plan.draft_limits == [4, 4]
    plan.drafted, plan.accepted = [4, 4], [4, 1]
    first.tokens += [7] * 5
    second.tokens += [7] * 2
    scheduler.update(plan)
    plan = scheduler.schedule()
    # first: grown to 6, capped by max_draft_tokens; second: shrunk to 3, then capped by what it may still generate
    assert plan.draft_limits == [4, 3]
    first.tokens += [7] * 4  # 12 of 13 reserved tokens: its last token cannot be followed by a drafted one
    assert scheduler.schedule().draft_limits == [0, 3]
    _running(scheduler, 1)  # a third row: above speculative_max_batch
    assert scheduler.schedule().draft_limits == []


def test_scheduler_does_not_speculate_without_an_eligible_sequence_or_a_drafter():
    limits = SchedulerLimits(8, 1000, 64, 4.0, max_draft_tokens=4, speculative_max_batch=4)
    scheduler = Scheduler(limits, PrefixCache(16, 0))
    _running(scheduler, 2, speculative=False)
    assert scheduler.schedule().draft_limits == []
    off = Scheduler(SchedulerLimits(8, 1000, 64, 4.0, max_draft_tokens=0, speculative_max_batch=4),
                    PrefixCache(16, 0))
    _running(off, 1)
    assert off.schedule().draft_limits == []


def test_speculative_settings_are_validated():
    with pytest.raises(SettingsError, match="speculative_drafter.*allowed: off / prompt_lookup"):
        EngineSettings(speculative_drafter="medusa").validate()
    with pytest.raises(SettingsError, match="speculative_max_draft_tokens"):
        EngineSettings(speculative_max_draft_tokens=0).validate()
    with pytest.raises(SettingsError, match="prompt_lookup_min_ngram"):
        EngineSettings(prompt_lookup_min_ngram=4, prompt_lookup_max_ngram=3).validate()


# ---- executor: verification and KV rollback ---------------------------------------------------------------------------

def test_verify_scores_every_position_and_truncate_rolls_the_kv_back(tiny_onnx):
    prompt, continuation = list(range(3, 20)), [40, 41, 42, 43]
    reference = OnnxDecoder(tiny_onnx, slots=1, max_length=64)
    reference.prefill(0, [prompt])
    expected = np.stack([reference.decode([token])[0] for token in continuation])

    executor = OnnxDecoder(tiny_onnx, slots=2, max_length=64)
    executor.prefill(1, [prompt])
    scored = executor.verify(1, continuation)
    np.testing.assert_allclose(scored, expected, atol=1e-4)
    assert executor.pool.lengths[1] == len(prompt) + 4
    # Keep 40, 41; the KV written for 42, 43 is dropped and overwritten by what really follows.
    executor.truncate(1, len(prompt) + 2)
    after_rollback = executor.verify(1, [50, 51])
    reference = OnnxDecoder(tiny_onnx, slots=1, max_length=64)
    reference.prefill(0, [prompt])
    np.testing.assert_allclose(after_rollback, np.stack([reference.decode([token])[0] for token in [40, 41, 50, 51]])[2:],
                               atol=1e-4)
    with pytest.raises(ValueError, match="cannot keep"):
        executor.truncate(1, 100)


# ---- engine: greedy output identical to plain decoding ------------------------------------------------------------------

def _settings(**changes) -> EngineSettings:
    values = {"max_batch_size": 8, "max_context_length": 256, "kv_cache_max_tokens": 8192, "intra_op_threads": 1}
    return EngineSettings(**{**values, **changes})


def _generate(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    collectors = [Collector() for _ in requests]
    for request, collector in zip(requests, collectors):
        engine.submit(request, collector.emit)
    return [collector.wait().token_ids for collector in collectors]


def _outputs(tiny_onnx, requests: list[GenerationRequest], **settings) -> tuple[list[list[int]], object]:
    engine = Engine(tiny_onnx, _settings(**settings))
    try:
        return _generate(engine, requests), engine.stats()
    finally:
        engine.shutdown()


def test_greedy_output_with_prompt_lookup_is_identical_to_plain_decoding(tiny_onnx):
    rng = np.random.default_rng(7)
    random_prompts = [rng.integers(3, TINY_VOCAB, int(rng.integers(5, 40))).tolist() for _ in range(4)]
    plain_requests = [GenerationRequest(prompt, 48, exclude_input_in_output=True) for prompt in random_prompts]
    plain, _ = _outputs(tiny_onnx, plain_requests)
    # Prompts that repeat a passage: prompt lookup drafts from them (a random model copies little; the SmolLM2 test
    # below shows long accepted runs).
    repeating = [prompt + output[:40] + prompt for prompt, output in zip(random_prompts, plain)]
    requests = plain_requests + [GenerationRequest(prompt, 48, exclude_input_in_output=True) for prompt in repeating]
    expected, plain_stats = _outputs(tiny_onnx, requests, max_batch_size=1)
    for max_batch in (1, 4):
        outputs, stats = _outputs(tiny_onnx, requests, max_batch_size=max_batch, speculative_drafter="prompt_lookup",
                                  speculative_max_batch_size=max_batch, speculative_max_draft_tokens=6)
        assert outputs == expected
        assert stats.drafted_tokens > stats.accepted_tokens > 0
        assert stats.decode_tokens == plain_stats.decode_tokens
        assert stats.decode_row_steps == stats.decode_tokens - stats.accepted_tokens  # each accepted one saved a step
    assert plain_stats.drafted_tokens == 0 and plain_stats.decode_row_steps == plain_stats.decode_tokens


def test_sampled_requests_keep_their_seeded_tokens_and_do_not_speculate(tiny_onnx):
    prompt = np.random.default_rng(7).integers(3, TINY_VOCAB, 30).tolist()
    sampled = GenerationRequest(prompt, 48, SamplingParams(temperature=0.8, top_k=40, seed=11),
                                exclude_input_in_output=True)
    greedy = GenerationRequest(prompt * 2, 48, exclude_input_in_output=True)  # drafts: in the same steps
    expected, _ = _outputs(tiny_onnx, [sampled, greedy])
    outputs, stats = _outputs(tiny_onnx, [sampled], speculative_drafter="prompt_lookup",
                              speculative_max_batch_size=4)
    assert outputs == expected[:1] and stats.drafted_tokens == 0
    outputs, stats = _outputs(tiny_onnx, [sampled, greedy], speculative_drafter="prompt_lookup",
                              speculative_max_batch_size=4)
    assert outputs == expected and stats.drafted_tokens > 0
