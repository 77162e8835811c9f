"""End to end against a real tritonserver serving the bundled SmolLM2: HF parity, byte-exact streaming, parameters."""

from __future__ import annotations

import numpy as np
import pytest

from tritonllm.client.api import GenerationParams, LLMClient

pytestmark = [pytest.mark.server, pytest.mark.model]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a GPU is in one sentence.",
    "def fibonacci(n):",
    "Translate to French: good morning, my friend.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "Count from one to ten.",
]
NON_ASCII_PROMPTS = [
    "Écris une phrase en français sur l'été, avec des accents.",
    "请用中文写一句关于春天的话。",
    "Reply with three emoji that describe happiness, like 😀.",
    "Schreibe einen Satz über Bäume und Flüsse.",
]
NEW_TOKENS = 24
COUNTING = "Count: one, two, three,"  # the model continues " four, five, six, ..."


@pytest.fixture(scope="module")
def hf_reference(smollm2_hf_dir):
    """Greedy continuation ids from Hugging Face `generate` (fp32) on the same converted model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, torch_dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id

    def reference(prompt: str, chat: bool = True) -> tuple[list[int], list[int]]:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        else:
            ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)
        generated = out[0, len(ids):].tolist()
        stops = eos if isinstance(eos, list) else [eos]
        for i, token in enumerate(generated):
            if token in stops:
                generated = generated[:i]
                break
        return ids, generated

    reference.tokenizer = tokenizer
    return reference


def engine_ids(server, input_ids: list[int], max_tokens: int, end_id: int) -> list[int]:
    """Greedy ids straight from the `engine` model (TensorRT-LLM input names), gRPC stream, not streaming."""
    import queue

    import tritonclient.grpc as grpcclient

    arrays = {"input_ids": np.array([input_ids], np.int32), "input_lengths": np.array([[len(input_ids)]], np.int32),
              "request_output_len": np.array([[max_tokens]], np.int32),
              "end_id": np.array([[end_id]], np.int32), "streaming": np.array([[False]], np.bool_),
              "exclude_input_in_output": np.array([[True]], np.bool_)}
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "BOOL" if array.dtype == np.bool_ else "INT32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.endpoints.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("engine", inputs, enable_empty_final_response=True)
    ids: list[int] = []
    while True:
        result, error = results.get(timeout=120)
        assert error is None, error
        if result.as_numpy("output_ids") is not None:
            length = int(result.as_numpy("sequence_length").reshape(-1)[0])
            ids += result.as_numpy("output_ids").reshape(-1)[:length].tolist()
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    return ids


def test_engine_greedy_ids_equal_hf_generate(server, hf_reference):
    for prompt in PROMPTS:
        input_ids, expected = hf_reference(prompt)
        end_id = hf_reference.tokenizer.eos_token_id
        assert engine_ids(server, input_ids, NEW_TOKENS, end_id) == expected, prompt


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensemble_greedy_text_equals_hf_generate(server, hf_reference, protocol):
    url = server.endpoints.grpc_url if protocol == "grpc" else server.endpoints.http_url
    client = LLMClient(url, protocol=protocol)
    params = GenerationParams(max_tokens=NEW_TOKENS, apply_chat_template=True)
    for prompt in PROMPTS:
        _, expected = hf_reference(prompt)
        text = "".join(client.stream(prompt, params))
        assert text == hf_reference.tokenizer.decode(expected, skip_special_tokens=True), prompt


def test_raw_prompt_without_chat_template(grpc_client, hf_reference):
    _, expected = hf_reference(PROMPTS[4], chat=False)
    text = grpc_client.generate(PROMPTS[4], GenerationParams(max_tokens=NEW_TOKENS, apply_chat_template=False))
    assert text == hf_reference.tokenizer.decode(expected, skip_special_tokens=True)


def test_streamed_equals_non_streamed_byte_exact(client):
    params = GenerationParams(max_tokens=40, apply_chat_template=True)
    saw_non_ascii = False
    for prompt in NON_ASCII_PROMPTS + PROMPTS[:2]:
        pieces = list(client.stream(prompt, params))
        whole = client.generate(prompt, params)
        assert "".join(pieces) == whole, prompt
        # U+FFFD only where the stream really ended inside a character (max_tokens cut a multi-token emoji)
        assert "\ufffd" not in whole[:-1], prompt
        saw_non_ascii |= any(ord(ch) > 127 for ch in whole)
        assert len(pieces) > 1, "streaming must deliver more than one piece"
    assert saw_non_ascii, "the prompts should make the model write non-ASCII text"


def test_leading_spaces_survive_streaming(grpc_client):
    params = GenerationParams(max_tokens=30, apply_chat_template=True)
    pieces = list(grpc_client.stream("Write the words: one two three four five.", params))
    assert any(piece.startswith(" ") for piece in pieces[1:]), pieces
    assert "".join(pieces) == grpc_client.generate("Write the words: one two three four five.", params)


def test_exclude_input_in_output_false_echoes_prompt(grpc_client):
    prompt = "The quick brown fox"
    params = GenerationParams(max_tokens=8, exclude_input_in_output=False)
    whole = grpc_client.generate(prompt, params)
    assert whole.startswith(prompt) and len(whole) > len(prompt)
    # As with TensorRT-LLM, a stream carries generated tokens only: the client already has its prompt.
    assert "".join(grpc_client.stream(prompt, params)) == whole[len(prompt):]


def test_max_tokens_is_respected(grpc_client, hf_reference):
    text = grpc_client.generate(COUNTING, GenerationParams(max_tokens=5))
    assert 1 <= len(hf_reference.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 5
    assert len(grpc_client.generate(COUNTING, GenerationParams(max_tokens=12))) > len(text)


def test_end_id_stops_generation(grpc_client, hf_reference):
    full = grpc_client.generate(COUNTING, GenerationParams(max_tokens=12))
    comma = hf_reference.tokenizer.convert_tokens_to_ids(",")
    stopped = grpc_client.generate(COUNTING, GenerationParams(max_tokens=12, end_id=comma))
    assert "," in full and stopped and "," not in stopped  # end_id itself is never in the output
    assert full.startswith(stopped)


def test_stop_words_stop_generation(grpc_client):
    full = grpc_client.generate(COUNTING, GenerationParams(max_tokens=12))
    stopped = grpc_client.generate(COUNTING, GenerationParams(max_tokens=12, stop_words=[","]))
    assert stopped.endswith(",") and stopped.count(",") == 1  # a stop word stays in the output
    assert full.startswith(stopped) and len(stopped) < len(full)
    assert "".join(grpc_client.stream(COUNTING, GenerationParams(max_tokens=12, stop_words=[","]))) == stopped


def test_min_tokens_keeps_generating_past_end_id(grpc_client, hf_reference):
    comma = hf_reference.tokenizer.convert_tokens_to_ids(",")
    stopped = grpc_client.generate(COUNTING, GenerationParams(max_tokens=6, end_id=comma))
    longer = grpc_client.generate(COUNTING, GenerationParams(max_tokens=6, end_id=comma, min_tokens=6))
    assert longer.startswith(stopped) and len(longer) > len(stopped)  # end_id was banned before the 6th token


def test_bad_words_are_never_generated(grpc_client):
    text = grpc_client.generate(COUNTING, GenerationParams(max_tokens=12, bad_words=[" five"]))
    assert " five" not in text and text


def test_seeded_sampling_is_reproducible(client):
    params = GenerationParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234,
                              apply_chat_template=True)
    first = client.generate("Tell me a story about a dragon.", params)
    assert client.generate("Tell me a story about a dragon.", params) == first
    assert "".join(client.stream("Tell me a story about a dragon.", params)) == first
    other = client.generate("Tell me a story about a dragon.", GenerationParams(
        max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=99, apply_chat_template=True))
    assert other != first


def test_client_cancellation_then_server_still_answers(grpc_client):
    stream = grpc_client.stream("Write a long essay about the history of Rome.",
                                GenerationParams(max_tokens=400, apply_chat_template=True))
    received = [next(stream), next(stream)]
    stream.close()  # leaves the generator: the client cancels the request on the server
    assert received
    assert grpc_client.generate("Say hello.", GenerationParams(max_tokens=8, apply_chat_template=True))
