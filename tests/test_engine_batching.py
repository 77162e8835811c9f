"""The in-flight batching engine on a tiny random Llama exported to ONNX (no server)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from support import TINY_VOCAB, Collector, run_request

from tritonllm.contract import EngineSettings
from tritonllm.python_backends.detokenizer import ENGINE_CONTEXT_TOKENS
from tritonllm.python_backends.engine import Engine, GenerationRequest
from tritonllm.python_backends.errors import InvalidArgument, Unavailable
from tritonllm.python_backends.onnx_runner import OnnxDecoder
from tritonllm.python_backends.sampling import SamplingParams
from tritonllm.python_backends.stop_criteria import FinishReason

VOCAB = TINY_VOCAB


def settings(**changes) -> EngineSettings:
    values = {"max_batch_size": 16, "max_queue_size": 64, "max_context_length": 256, "kv_cache_max_tokens": 8192,
              "prefill_chunk_tokens": 64, "intra_op_threads": 1}
    return EngineSettings(**{**values, **changes})


run = run_request


def prompts(count: int, seed: int = 0, shortest: int = 1, longest: int = 60) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, int(rng.integers(shortest, longest + 1))).tolist() for _ in range(count)]


def greedy(prompt: list[int], max_new_tokens: int, **request) -> GenerationRequest:
    return GenerationRequest(prompt, max_new_tokens, exclude_input_in_output=True, **request)


def test_executor_reads_the_model_facts(tiny_onnx):
    executor = OnnxDecoder(tiny_onnx, slots=4, max_length=128)
    assert (executor.num_layers, executor.kv_heads, executor.head_dim, executor.vocab_size) == (2, 2, 16, VOCAB)
    assert executor.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert [buffer.shape for buffer in executor.pool.buffers] == [(4, 2, 128, 16)] * 4


def _greedy_alone(executor: OnnxDecoder, prompt: list[int], steps: int) -> list[int]:
    tokens = [int(executor.prefill(0, [prompt])[0].argmax())]
    for _ in range(steps):
        tokens.append(int(executor.decode(tokens[-1:])[0].argmax()))
    return tokens


def test_chunked_and_batched_prefill_match_one_whole_prompt(tiny_onnx):
    executor = OnnxDecoder(tiny_onnx, slots=4, max_length=128)
    rows = prompts(3, seed=1, shortest=20, longest=40)
    alone = np.concatenate([executor.prefill(0, [prompt]) for prompt in rows])
    batched = executor.prefill(0, rows)  # right-padded in one run
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert executor.pool.lengths[:3].tolist() == [len(prompt) for prompt in rows]
    for slot, prompt in enumerate(rows):  # a fresh chunk of 7, then continuations of 7 on top of the slot
        logits = executor.prefill(slot, [prompt[:7]])
        for start in range(7, len(prompt), 7):
            logits = executor.extend(slot, start, prompt[start:start + 7])
        np.testing.assert_allclose(logits[0], alone[slot], atol=1e-5)


def test_decode_over_slots_of_different_lengths_and_slot_moves_keep_every_row_exact(tiny_onnx):
    executor = OnnxDecoder(tiny_onnx, slots=5, max_length=128)
    rows = prompts(5, seed=2, shortest=3, longest=30)
    expected = [_greedy_alone(executor, prompt, 10) for prompt in rows]
    first = executor.prefill(0, rows)
    tokens = [[int(row.argmax())] for row in first]
    owners = list(range(5))
    attended_bytes, counted_before, copied_before = 0, executor.counters.decode_kv_bytes, executor.pool.bytes_copied
    for step in range(10):
        if step == 4:  # the sequence in slot 1 retires; the last slot moves into the hole
            moved_tokens = int(executor.pool.lengths[4])
            executor.pool.move(4, 1)
            owners, tokens = [owners[0], owners[4], owners[2], owners[3]], [tokens[0], tokens[4], tokens[2], tokens[3]]
        logits = executor.decode([row_tokens[-1] for row_tokens in tokens])
        attended_bytes += int(executor.pool.lengths[:len(tokens)].sum()) * executor.kv_bytes_per_token
        for row_tokens, row_logits in zip(tokens, logits):
            row_tokens.append(int(row_logits.argmax()))
    for owner, row_tokens in zip(owners, tokens):
        assert row_tokens == expected[owner][:len(row_tokens)]
    # A step reads each row's past and writes its one new token in place; a move copies only the tokens held.
    assert executor.counters.decode_kv_bytes - counted_before == attended_bytes
    assert executor.pool.bytes_copied - copied_before == moved_tokens * executor.kv_bytes_per_token


def test_greedy_batched_equals_greedy_alone_with_staggered_arrivals(tiny_onnx):
    requests = [greedy(prompt, max_new_tokens=4 + index % 13) for index, prompt in enumerate(prompts(32, seed=3))]
    alone_engine = Engine(tiny_onnx, settings(max_batch_size=1))
    try:
        expected = [run(alone_engine, request).generated for request in requests]
    finally:
        alone_engine.shutdown()

    engine = Engine(tiny_onnx, settings(max_batch_size=16, prefill_chunk_tokens=48))
    collectors = [Collector() for _ in requests]
    delays = np.random.default_rng(4).uniform(0, 0.03, size=len(requests))

    def client(index: int) -> None:
        time.sleep(float(delays[index]) * (index % 4))
        engine.submit(requests[index], collectors[index].emit)

    try:
        threads = [threading.Thread(target=client, args=(index,)) for index in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for collector in collectors:
            collector.wait()
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert [collector.generated for collector in collectors] == expected
    assert stats.tokens_generated == sum(len(tokens) for tokens in expected)
    assert stats.prompt_tokens == sum(len(request.input_ids) for request in requests)
    assert stats.finished == {"length": 32}
    assert stats.kv_tokens_reserved == 0 and stats.running == 0
    assert stats.decode_steps < sum(len(tokens) for tokens in expected)  # steps were shared


def test_seeded_sampling_repeats_whatever_the_batch_mates_and_greedy_rows_stay_greedy(tiny_onnx):
    seeded = GenerationRequest(prompts(1, seed=5)[0], 16, SamplingParams(temperature=0.9, top_k=50, top_p=0.95,
                                                                         seed=2024), exclude_input_in_output=True)
    greedy_request = greedy(prompts(1, seed=6)[0], 16)
    engine = Engine(tiny_onnx, settings())
    try:
        seeded_alone = run(engine, seeded).generated
        greedy_alone = run(engine, greedy_request).generated
        mates = [GenerationRequest(prompt, 16, SamplingParams(temperature=1.0)) for prompt in prompts(5, seed=7)]
        collectors = {name: Collector() for name in ("seeded", "greedy", *range(len(mates)))}
        for name, request in [("seeded", seeded), ("greedy", greedy_request), *enumerate(mates)]:
            engine.submit(request, collectors[name].emit)
        for collector in collectors.values():
            collector.wait()
    finally:
        engine.shutdown()
    assert collectors["seeded"].generated == seeded_alone
    assert collectors["greedy"].generated == greedy_alone
    assert seeded_alone != greedy_alone


def test_cancellation_frees_the_sequence_within_one_step_and_capacity_is_reused(tiny_onnx):
    engine = Engine(tiny_onnx, settings(max_batch_size=1))
    long_request = Collector()
    steps_at_cancel = []

    def cancel_after_three_tokens(output: EngineOutput) -> None:
        long_request.emit(output)
        if len(long_request.outputs) == 3:
            long_request.cancelled = True
            steps_at_cancel.append(engine.stats().decode_steps)

    try:
        engine.submit(GenerationRequest(prompts(1)[0], 200, streaming=True), cancel_after_three_tokens,
                      lambda: long_request.cancelled)
        queued = Collector()
        engine.submit(greedy(prompts(1, seed=8)[0], 5), queued.emit)  # waits: max_batch_size is 1
        final = long_request.wait()
        assert final.finish_reason is FinishReason.CANCELLED and final.token_ids == []
        assert len(long_request.outputs) == 4  # three tokens, then the cancellation, no token in between
        assert queued.wait().finish_reason is FinishReason.LENGTH
        assert len(queued.generated) == 5
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert stats.finished == {"cancelled": 1, "length": 1}
    assert stats.kv_tokens_reserved == 0
    # the queued request's 4 decode steps, plus at most the step that was already running when the flag was set
    assert stats.decode_steps - steps_at_cancel[0] <= 4


def test_request_beyond_the_kv_budget_waits_then_runs(tiny_onnx):
    budget = 64
    engine = Engine(tiny_onnx, settings(max_context_length=64, kv_cache_max_tokens=budget))
    first, second = greedy(prompts(1, seed=9, shortest=10, longest=10)[0], 40), greedy(prompts(1, seed=10)[0][:10], 20)
    order: list[str] = []
    reserved: list[int] = []

    def tracking(name: str, collector: Collector):
        def emit(output: EngineOutput) -> None:
            order.append(name)
            reserved.append(engine.stats().kv_tokens_reserved)
            collector.emit(output)
        return emit

    try:
        expected_second = run(engine, second).generated
        collectors = {"first": Collector(), "second": Collector()}
        engine.submit(first, tracking("first", collectors["first"]))
        engine.submit(second, tracking("second", collectors["second"]))
        for collector in collectors.values():
            collector.wait()
    finally:
        engine.shutdown()
    assert order.index("second") > order.index("first")  # 50 + 30 reserved tokens exceed 64: it waited
    assert max(reserved) <= budget
    assert collectors["second"].generated == expected_second
    assert len(collectors["first"].generated) == 40


def test_full_queue_is_unavailable(tiny_onnx):
    engine = Engine(tiny_onnx, settings(max_batch_size=1, max_queue_size=2))
    running = Collector()
    try:
        engine.submit(GenerationRequest(prompts(1)[0], 200), running.emit, lambda: running.cancelled)
        while engine.stats().running + engine.stats().prefilling == 0:
            time.sleep(0.01)
        queued = [Collector(), Collector()]
        for collector in queued:
            engine.submit(greedy([5, 6, 7], 3), collector.emit)
        with pytest.raises(Unavailable, match=r"engine queue is full \(2 waiting\); retry later"):
            engine.submit(greedy([5, 6, 7], 3), Collector().emit)
        running.cancelled = True
        for collector in queued:
            assert collector.wait().finish_reason is FinishReason.LENGTH
    finally:
        engine.shutdown()


def test_end_id_stop_words_max_tokens_min_tokens_and_bad_words(tiny_onnx):
    prompt = prompts(1, seed=11, shortest=12, longest=12)[0]
    engine = Engine(tiny_onnx, settings())
    try:
        reference = run(engine, greedy(prompt, 12)).generated
        # the first id whose first appearance is at position >= 3 serves as end id
        position = next(i for i in range(3, 12) if reference[i] not in reference[:i])
        end_id = reference[position]

        ended = run(engine, greedy(prompt, 12, sampling=SamplingParams(end_id=end_id)))
        assert ended.generated == reference[:position]  # the end id itself is not in the output
        assert ended.outputs[-1].finish_reason is FinishReason.END_ID

        held = run(engine, greedy(prompt, 12, sampling=SamplingParams(end_id=end_id, min_tokens=position + 2)))
        assert held.generated[:position] == reference[:position]
        assert end_id not in held.generated[:position + 2]

        stop_word = (reference[position - 1], reference[position])
        stopped = run(engine, greedy(prompt, 12, sampling=SamplingParams(stop_words=(stop_word,))))
        first_stop = next(i for i in range(1, 12) if tuple(reference[i - 1:i + 1]) == stop_word)
        assert stopped.generated == reference[:first_stop + 1]  # stop tokens stay in the output
        assert stopped.outputs[-1].finish_reason is FinishReason.STOP_WORD

        assert run(engine, greedy(prompt, 7)).generated == reference[:7]

        banned = run(engine, greedy(prompt, 4, sampling=SamplingParams(bad_words=((reference[2],),))))
        assert banned.generated[:2] == reference[:2] and banned.generated[2] != reference[2]
        banned_pair = run(engine, greedy(prompt, 4, sampling=SamplingParams(bad_words=((reference[0],
                                                                                        reference[1]),))))
        assert banned_pair.generated[0] == reference[0] and banned_pair.generated[1] != reference[1]

        with_prompt = run(engine, GenerationRequest(prompt, 5))
        assert with_prompt.outputs[-1].token_ids == prompt + reference[:5]
        assert len(with_prompt.outputs) == 1 and with_prompt.outputs[0].context_length == 0

        streamed = run(engine, GenerationRequest(prompt, 12, SamplingParams(end_id=end_id), streaming=True))
        assert streamed.generated == reference[:position]
        sent = 0
        for output in streamed.outputs:
            assert output.context_length == min(sent, ENGINE_CONTEXT_TOKENS)
            sent += len(output.token_ids) - output.context_length
        assert [output.final for output in streamed.outputs] == [False] * position + [True]
        assert streamed.outputs[-1].token_ids[streamed.outputs[-1].context_length:] == []  # end id withheld
    finally:
        engine.shutdown()


def test_chunked_prefill_gives_the_same_tokens_as_unchunked(tiny_onnx):
    requests = [greedy(prompt, 8) for prompt in prompts(6, seed=12, shortest=30, longest=90)]

    def generate(chunk_tokens: int) -> tuple[list[list[int]], int]:
        engine = Engine(tiny_onnx, settings(prefill_chunk_tokens=chunk_tokens))
        collectors = [Collector() for _ in requests]
        try:
            for request, collector in zip(requests, collectors):
                engine.submit(request, collector.emit)
            for collector in collectors:
                collector.wait()
            return [collector.generated for collector in collectors], engine.executor.counters.prefill_runs
        finally:
            engine.shutdown()

    chunked, chunked_runs = generate(8)
    whole, whole_runs = generate(256)
    assert chunked == whole
    assert chunked_runs > whole_runs


def test_bad_requests_are_refused_at_submit(tiny_onnx):
    engine = Engine(tiny_onnx, settings(max_context_length=32, kv_cache_max_tokens=64, prefill_chunk_tokens=16))
    try:
        with pytest.raises(InvalidArgument, match=r"input_ids: a prompt of 40 tokens .* allowed: 1\.\.31 tokens"):
            engine.submit(greedy([5] * 40, 1), Collector().emit)
        with pytest.raises(InvalidArgument, match=r"input_ids: a prompt of 0 tokens"):
            engine.submit(greedy([], 1), Collector().emit)
        with pytest.raises(InvalidArgument, match=r"request_output_len = 30 is not allowed; allowed: 1\.\.22"):
            engine.submit(greedy([5] * 10, 30), Collector().emit)
        with pytest.raises(InvalidArgument, match=r"input_ids: token ids must be in 0\.\.49151"):
            engine.submit(greedy([VOCAB], 1), Collector().emit)
        with pytest.raises(InvalidArgument, match=r"temperature = -1.0 is not allowed"):
            engine.submit(greedy([5], 1, sampling=SamplingParams(temperature=-1.0)), Collector().emit)
    finally:
        engine.shutdown()


def test_shutdown_ends_every_request_with_unavailable(tiny_onnx):
    engine = Engine(tiny_onnx, settings(max_batch_size=1))
    collectors = [Collector() for _ in range(3)]
    for collector in collectors:
        engine.submit(GenerationRequest([5, 6, 7], 200), collector.emit)
    engine.shutdown()
    for collector in collectors:
        final = collector.wait()
        assert final.finish_reason is FinishReason.ERROR and isinstance(final.error, Unavailable)
    with pytest.raises(Unavailable, match="shutting down"):
        engine.submit(greedy([5], 1), Collector().emit)


def _generate_all(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    collectors = [Collector() for _ in requests]
    for request, collector in zip(requests, collectors):
        engine.submit(request, collector.emit)
    for collector in collectors:
        collector.wait()
    return [collector.generated for collector in collectors]


def test_prefix_reuse_gives_the_same_greedy_tokens_and_skips_the_shared_prefix(tiny_onnx):
    shared = prompts(1, seed=20, shortest=70, longest=70)[0]
    requests = [greedy(shared + tail, 6) for tail in prompts(8, seed=21, shortest=1, longest=20)]
    outputs, hits = {}, {}
    for reuse in (False, True):
        engine = Engine(tiny_onnx, settings(prefix_cache_max_tokens=4096 if reuse else 0, prefix_block_tokens=16))
        try:
            first = run(engine, requests[0]).generated  # computes (and, with reuse, stores) the shared prefix
            outputs[reuse] = [first] + _generate_all(engine, requests[1:])
            hits[reuse] = engine.stats().prefix_hit_tokens
        finally:
            engine.shutdown()
    assert outputs[True] == outputs[False]
    assert hits[False] == 0
    assert hits[True] == 7 * (70 // 16) * 16  # every later request reuses the shared prefix's full blocks


def test_a_cached_prefix_never_serves_another_tenant(tiny_onnx):
    prompt = prompts(1, seed=22, shortest=64, longest=64)[0]
    engine = Engine(tiny_onnx, settings(prefix_cache_max_tokens=4096, prefix_block_tokens=16))
    try:
        alice = run(engine, greedy(prompt, 5, tenant="alice")).generated
        assert engine.stats().prefix_hit_tokens == 0
        bob = run(engine, greedy(prompt, 5, tenant="bob")).generated
        assert engine.stats().prefix_hit_tokens == 0  # same prompt, other tenant: computed again
        again = run(engine, greedy(prompt, 5, tenant="alice")).generated
        assert engine.stats().prefix_hit_tokens == 48  # (64 - 1) // 16 full blocks
    finally:
        engine.shutdown()
    assert alice == bob == again
