"""Token choice: parameter checks, greedy and sampled rows, bans, words lists and stop criteria."""

from __future__ import annotations

import numpy as np
import pytest

from tritonllm.python_backends.errors import InvalidArgument
from tritonllm.python_backends.sampling import (TOP_P_PRESELECT, Sampler, SamplingParams, sample_batch,
                                                words_from_list)
from tritonllm.python_backends.stop_criteria import FinishReason, finish_reason

VOCAB = 100


@pytest.mark.parametrize(("changes", "named", "allowed"), [
    ({"temperature": -0.5}, "temperature", ">= 0"),
    ({"temperature": float("nan")}, "temperature", ">= 0"),
    ({"top_k": -1}, "top_k", f"vocabulary size {VOCAB}"),
    ({"top_k": VOCAB + 1}, "top_k", f"vocabulary size {VOCAB}"),
    ({"top_p": 0.0}, "top_p", "0 < top_p <= 1"),
    ({"top_p": 1.5}, "top_p", "0 < top_p <= 1"),
    ({"seed": -1}, "seed", "2**64-1"),
    ({"seed": 2**64}, "seed", "2**64-1"),
    ({"min_tokens": -2}, "min_tokens", ">= 0"),
    ({"end_id": VOCAB}, "end_id", f"0..{VOCAB - 1}"),
    ({"stop_words": ((1, VOCAB),)}, "stop_words", f"0..{VOCAB - 1}"),
    ({"bad_words": ((),)}, "bad_words", "non-empty"),
])
def test_validate_names_the_input_and_the_allowed_range(changes, named, allowed):
    with pytest.raises(InvalidArgument) as caught:
        SamplingParams(**changes).validate(VOCAB)
    assert str(caught.value).startswith(f"{named} = ")
    assert allowed in str(caught.value)


def test_absent_inputs_mean_greedy_and_top_k_or_top_p_alone_samples_at_temperature_one():
    assert SamplingParams.from_optional().greedy
    assert SamplingParams.from_optional(top_k=1).greedy
    assert SamplingParams.from_optional(top_p=0.9).temperature == 1.0
    assert SamplingParams.from_optional(top_k=40).temperature == 1.0
    assert SamplingParams.from_optional(temperature=0.0, top_k=40).greedy
    assert not SamplingParams.from_optional(temperature=0.7).greedy
    SamplingParams.from_optional(seed=2**64 - 1, stop_words=[[1, 2]], bad_words=[[3]]).validate(VOCAB)


def _logits(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, VOCAB)).astype(np.float32)


def test_greedy_rows_take_the_argmax_and_respect_bans():
    logits = _logits(3)
    best = logits.argmax(axis=1)
    second = np.argsort(-logits, axis=1)[:, 1]
    plain = Sampler(SamplingParams(), prompt_length=1)
    banned_single = Sampler(SamplingParams(bad_words=((int(best[1]),),)), prompt_length=1)
    min_tokens = Sampler(SamplingParams(end_id=int(best[2]), min_tokens=2), prompt_length=1)
    chosen = sample_batch(logits, [plain, banned_single, min_tokens], [[7], [7], [7, 8]])
    assert chosen.tolist() == [best[0], second[1], second[2]]
    # min_tokens reached (2 generated after a 1-token prompt): end_id is allowed again.
    assert sample_batch(logits[2:], [min_tokens], [[7, 8, 9]]).tolist() == [best[2]]


def test_multi_token_bad_word_bans_its_last_id_only_after_its_prefix():
    logits = _logits(1)
    best = int(logits.argmax())
    sampler = Sampler(SamplingParams(bad_words=((5, 6, best),)), prompt_length=1)
    assert sample_batch(logits, [sampler], [[1, 5, 6]]).tolist() != [best]
    assert sample_batch(logits, [sampler], [[1, 6, 5]]).tolist() == [best]


def test_seeded_draws_repeat_whatever_the_batch_mates():
    logits = _logits(4)
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=1234)

    def draws(rows_with_mates: bool) -> list[int]:
        sampler = Sampler(params, prompt_length=1)
        mates = [Sampler(SamplingParams(temperature=1.0), 1), Sampler(SamplingParams(), 1)]
        out = []
        for step in range(20):
            row = logits[step % 4][None]
            if rows_with_mates:
                batch = np.concatenate([logits[:1], row, logits[2:3]])
                out.append(int(sample_batch(batch, [mates[0], sampler, mates[1]], [[1]] * 3)[1]))
            else:
                out.append(int(sample_batch(row, [sampler], [[1]])[0]))
        return out

    assert draws(False) == draws(True)
    assert len(set(draws(False))) > 1  # it really samples


def test_top_k_and_top_p_keep_only_their_candidates():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (VOCAB - 4)], dtype=np.float32))
    top_k = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=1), 1)
    top_p = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=1), 1)
    tiny_p = Sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=1), 1)
    seen_k = {int(top_k.sample(logits[0], [])) for _ in range(300)}
    seen_p = {int(top_p.sample(logits[0], [])) for _ in range(300)}
    assert seen_k == {0, 1}
    assert seen_p == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert {int(tiny_p.sample(logits[0], [])) for _ in range(50)} == {0}


def test_sampled_frequencies_follow_the_tempered_softmax():
    probabilities = np.array([0.6, 0.3, 0.1])
    logits = np.full(VOCAB, -1e9, dtype=np.float32)
    logits[:3] = np.log(probabilities)
    temperature = 2.0
    sampler = Sampler(SamplingParams(temperature=temperature, seed=7), 1)
    counts = np.bincount([sampler.sample(logits, []) for _ in range(6000)], minlength=3)[:3]
    expected = probabilities ** (1 / temperature) / (probabilities ** (1 / temperature)).sum()
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.03)


def test_top_p_over_a_flat_vocabulary_sorts_beyond_the_preselection():
    vocab = 4 * TOP_P_PRESELECT
    logits = np.zeros(vocab, dtype=np.float32)  # the preselected head holds only a quarter of the mass
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=3), 1)
    picks = [sampler.sample(logits, []) for _ in range(400)]
    # ties sort stably by id, so the nucleus is the lowest half of the ids
    assert max(picks) < vocab // 2 + 1 and min(picks) >= 0
    assert max(picks) > TOP_P_PRESELECT


def test_words_list_round_trip_and_errors():
    words = np.array([[5, 6, 7, 8, 0], [2, 3, 4, -1, -1]], dtype=np.int32)
    assert words_from_list(words, "stop_words_list") == ((5, 6), (7,), (8,))
    assert words_from_list(np.array([[0], [-1]], dtype=np.int32), "stop_words_list") == ()
    assert words_from_list(None, "stop_words_list") == ()
    with pytest.raises(InvalidArgument, match="bad_words_list must have shape"):
        words_from_list(np.zeros((3, 2), dtype=np.int32), "bad_words_list")
    with pytest.raises(InvalidArgument, match="bad_words_list: end offsets"):
        words_from_list(np.array([[5, 6], [2, 1]], dtype=np.int32), "bad_words_list")


def test_finish_reasons():
    params = SamplingParams(end_id=2, stop_words=((8, 9),))
    assert finish_reason(params, [5, 2], 10) is FinishReason.END_ID
    assert finish_reason(params, [8, 9], 10) is FinishReason.STOP_WORD
    assert finish_reason(params, [9, 8], 10) is None
    assert finish_reason(params, [5, 6, 7], 3) is FinishReason.LENGTH
    assert finish_reason(SamplingParams(), [2], 5) is None
