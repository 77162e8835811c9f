"""Speculative decoding: the drafters (prompt lookup, a draft model), the scheduler's policy, KV rollback, greedy
identity and distribution-preserving speculative sampling."""

from __future__ import annotations

import numpy as np
import pytest

from support import TINY_VOCAB, Collector

from tritonllm.contract import EngineSettings, SettingsError
from tritonllm.python_backends.engine import Engine, GenerationRequest
from tritonllm.python_backends.errors import InvalidArgument
from tritonllm.python_backends.onnx_runner import OnnxDecoder
from tritonllm.python_backends.prefix_cache import PrefixCache
from tritonllm.python_backends.sampling import Sampler, SamplingParams, draw, speculative_choice
from tritonllm.python_backends.scheduler import Scheduler, SchedulerLimits, SequenceState
from tritonllm.python_backends.speculative import ModelDrafter, PromptLookup, next_draft_limit


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
    with pytest.raises(SettingsError, match="speculative_drafter.*allowed: off / prompt_lookup / draft_model"):
        EngineSettings(speculative_drafter="medusa").validate()
    with pytest.raises(SettingsError, match="speculative_max_draft_tokens"):
        EngineSettings(speculative_max_draft_tokens=0).validate()
    with pytest.raises(SettingsError, match="prompt_lookup_min_ngram"):
        EngineSettings(prompt_lookup_min_ngram=4, prompt_lookup_max_ngram=3).validate()


# ---- speculative sampling (pure): the target's distribution is preserved ---------------------------------------------

def _chi_square_p_value(counts: np.ndarray, probabilities: np.ndarray) -> float:
    from scipy.stats import chisquare

    if counts[probabilities == 0].sum():
        return 0.0  # a token the target cannot produce (outside its top-k / top-p, or banned)
    support = probabilities > 0
    return float(chisquare(counts[support], probabilities[support] * counts.sum()).pvalue)


@pytest.mark.parametrize("params, banned", [
    (SamplingParams(temperature=0.7, top_k=12, seed=1), []),
    (SamplingParams(temperature=1.3, top_p=0.8, seed=2), [5]),
    (SamplingParams(temperature=1.0, seed=3), []),
])
def test_speculative_sampling_draws_from_the_target_distribution_whatever_the_draft(params, banned):
    """Over 8,000 fixed-seed draws, the kept-or-replaced token follows the target's processed distribution (chi-square)
    both for a draft model's q (x drawn from q) and for a deterministic drafter (q a point mass), while keeping the
    drafted token without the rule (always accepting) is detected as wrong by the same test."""
    vocab, draws = 40, 8000
    rng = np.random.default_rng(int(params.seed))
    target_logits = rng.normal(0.0, 2.0, vocab).astype(np.float32)
    draft_logits = (target_logits + rng.normal(0.0, 1.5, vocab)).astype(np.float32)
    sampler = Sampler(params, prompt_length=0)
    target = sampler.distribution(target_logits, banned)
    draft = sampler.distribution(draft_logits, banned)
    dense = np.zeros(vocab)
    dense[target[0]] = target[1]
    assert dense.sum() == pytest.approx(1.0)
    looked_up = int(np.argsort(dense)[-2])  # the second most likely token as a prompt-lookup draft
    with_model, with_lookup, always_kept = (np.zeros(vocab) for _ in range(3))
    kept = 0
    for _ in range(draws):
        drafted = draw(*draft, sampler.rng)
        token = speculative_choice(target, drafted, draft, sampler.rng)
        with_model[token] += 1
        kept += token == drafted
        with_lookup[speculative_choice(target, looked_up, None, sampler.rng)] += 1
        always_kept[drafted] += 1
    assert _chi_square_p_value(with_model, dense) > 1e-3
    assert _chi_square_p_value(with_lookup, dense) > 1e-3
    assert _chi_square_p_value(always_kept, dense) < 1e-6  # the test has the power to see a biased rule
    # Acceptance is sum(min(p, q)) in expectation: what makes a good draft pay.
    q_dense = np.zeros(vocab)
    q_dense[draft[0]] = draft[1]
    assert kept / draws == pytest.approx(np.minimum(dense, q_dense).sum(), abs=0.02)


def test_speculative_sampling_of_the_same_distribution_always_keeps_the_draft():
    sampler = Sampler(SamplingParams(temperature=0.9, seed=4), prompt_length=0)
    target = sampler.distribution(np.random.default_rng(4).normal(0, 1, 30).astype(np.float32), [])
    assert all(speculative_choice(target, token, target, sampler.rng) == token
               for token in (draw(*target, sampler.rng) for _ in range(200)))


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


def test_sampled_requests_speculate_reproducibly_and_off_keeps_plain_tokens(tiny_onnx):
    prompt = np.random.default_rng(7).integers(3, TINY_VOCAB, 30).tolist()
    sampling = SamplingParams(temperature=0.8, top_k=40, seed=11)
    sampled = GenerationRequest(prompt * 2, 48, sampling, exclude_input_in_output=True)
    expected, _ = _outputs(tiny_onnx, [sampled])
    settings = {"speculative_drafter": "prompt_lookup", "speculative_max_batch_size": 4}
    first, stats = _outputs(tiny_onnx, [sampled], **settings)
    again, _ = _outputs(tiny_onnx, [sampled], **settings)
    assert first == again and stats.drafted_by["prompt_lookup"] > 0  # the same seed, the same tokens
    assert all(len(output) == 48 and all(0 <= token < TINY_VOCAB for token in output) for output in first)
    off = GenerationRequest(prompt * 2, 48, sampling, exclude_input_in_output=True, speculative="off")
    outputs, stats = _outputs(tiny_onnx, [off], **settings)
    assert outputs == expected and stats.drafted_tokens == 0


# ---- the draft model drafter --------------------------------------------------------------------------------------

def test_model_drafter_rolls_back_and_resyncs_its_kv_with_the_target(tiny_onnx, tiny_draft_onnx):
    """Drafts equal the draft model's own greedy decoding, after a rejection (tokens the draft never proposed) and
    after a slot move."""
    prompt = np.random.default_rng(3).integers(3, TINY_VOCAB, 25).tolist()

    def greedy_continuation(tokens: list[int], count: int) -> list[int]:
        reference = OnnxDecoder(tiny_draft_onnx, slots=1, max_length=128)
        logits = reference.prefill(0, [tokens])[0]
        out = []
        for _ in range(count):
            out.append(int(np.argmax(logits)))
            logits = reference.decode([out[-1]])[0]
        return out

    drafter = ModelDrafter(tiny_draft_onnx, slots=3, max_length=128)
    owner, greedy = object(), Sampler(SamplingParams(), len(prompt))
    first, distributions = drafter.propose(1, owner, prompt, 4, greedy)
    assert first == greedy_continuation(prompt, 4) and distributions is None
    # The target kept 2 drafts and chose its own token after them; the draft's KV of drafts 3..4 is overwritten.
    history = prompt + first[:2] + [7]
    assert drafter.propose(1, owner, history, 3, greedy)[0] == greedy_continuation(history, 3)
    drafter.move(1, 0)
    history += [11, 12]
    assert drafter.propose(0, owner, history, 2, greedy)[0] == greedy_continuation(history, 2)
    # Another sequence in the same slot never reuses the first one's KV.
    other = prompt[:10] + [99]
    assert drafter.propose(0, object(), other, 2, greedy)[0] == greedy_continuation(other, 2)
    sampled, distributions = drafter.propose(2, object(), prompt, 3,
                                             Sampler(SamplingParams(temperature=1.0, seed=5), len(prompt)))
    assert len(sampled) == len(distributions) == 3
    assert all(token in ids for token, (ids, _) in zip(sampled, distributions))


def test_greedy_output_with_a_draft_model_is_identical_to_plain_decoding(tiny_onnx, tiny_draft_onnx):
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, TINY_VOCAB, int(rng.integers(5, 40))).tolist() for _ in range(5)]
    # Different lengths: sequences retire at different steps, so slots move under the draft's KV.
    requests = [GenerationRequest(prompt, 20 + 7 * index, exclude_input_in_output=True)
                for index, prompt in enumerate(prompts)]
    expected, _ = _outputs(tiny_onnx, requests, max_batch_size=1)
    for max_batch in (1, 4):
        engine = Engine(tiny_onnx, _settings(max_batch_size=max_batch, speculative_drafter="draft_model",
                                             speculative_max_batch_size=max_batch, speculative_max_draft_tokens=4),
                        draft_onnx_path=tiny_draft_onnx)
        try:
            outputs, stats = _generate(engine, requests), engine.stats()
        finally:
            engine.shutdown()
        assert outputs == expected
        drafted, accepted = stats.drafted_by["draft_model"], stats.accepted_by["draft_model"]
        assert drafted > accepted > 0 and "prompt_lookup" not in stats.drafted_by
        assert stats.decode_row_steps == stats.decode_tokens - accepted


def test_each_request_chooses_its_drafter_and_bad_choices_are_refused(tiny_onnx, tiny_draft_onnx):
    prompt = np.random.default_rng(5).integers(3, TINY_VOCAB, 20).tolist()
    engine = Engine(tiny_onnx, _settings(speculative_drafter="draft_model", speculative_max_batch_size=4),
                    draft_onnx_path=tiny_draft_onnx)
    try:
        choices = [None, "off", "prompt_lookup", "draft_model"]
        outputs = _generate(engine, [GenerationRequest(prompt * 2, 24, exclude_input_in_output=True,
                                                       speculative=choice) for choice in choices])
        stats = engine.stats()
        assert all(output == outputs[0] for output in outputs)
        assert set(stats.drafted_by) == {"draft_model", "prompt_lookup"}
        sampled = _generate(engine, [GenerationRequest(prompt, 24, SamplingParams(temperature=0.8, top_p=0.9, seed=s),
                                                       exclude_input_in_output=True) for s in (1, 2)])
        assert all(len(output) == 24 and all(0 <= token < TINY_VOCAB for token in output) for output in sampled)
        assert engine.stats().drafted_by["draft_model"] > stats.drafted_by["draft_model"]
        with pytest.raises(InvalidArgument, match="speculative = 'medusa' is not allowed; allowed: off, "
                                                  "prompt_lookup, draft_model"):
            engine.submit(GenerationRequest(prompt, 4, speculative="medusa"), lambda output: None)
    finally:
        engine.shutdown()
    plain = Engine(tiny_onnx, _settings())
    try:
        with pytest.raises(InvalidArgument, match="allowed: off, prompt_lookup .draft_model needs a build"):
            plain.submit(GenerationRequest(prompt, 4, speculative="draft_model"), lambda output: None)
    finally:
        plain.shutdown()
    with pytest.raises(ValueError, match="needs a draft model graph"):
        Engine(tiny_onnx, _settings(speculative_drafter="draft_model"))


def test_a_draft_model_with_another_vocabulary_is_refused(smollm2_tokenizer_dir, tmp_path):
    import json
    import shutil

    from tritonllm.builders.errors import BuildError
    from tritonllm.builders.pipeline import check_draft_vocabulary

    check_draft_vocabulary(smollm2_tokenizer_dir, smollm2_tokenizer_dir)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(smollm2_tokenizer_dir, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same tokens, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(BuildError, match="vocabulary differs from the target's .* 4 token/id pairs not in both.* "
                                         "allowed: a draft model with the target's tokenizer"):
        check_draft_vocabulary(smollm2_tokenizer_dir, other)
