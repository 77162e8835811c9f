"""Structured output in the engine (no server): a tiny random Llama with SmolLM2's tokenizer (same vocabulary).

The random model writes gibberish, which is what a constraint must survive: every finished answer must parse and
validate (jsonschema, independent of the grammar library), answers cut by max_tokens must be prefixes the grammar
accepts, and a guided row's tokens must not depend on what else is in the batch.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from support import Collector, run_request
from tokenizers import Tokenizer

from tritonllm.contract import EngineSettings
from tritonllm.python_backends.engine import Engine, GenerationRequest
from tritonllm.python_backends.errors import InvalidArgument
from tritonllm.python_backends.guided import GuideSpec
from tritonllm.python_backends.sampling import SamplingParams
from tritonllm.python_backends.stop_criteria import FinishReason

END_ID = 2  # SmolLM2's <|im_end|>

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                              "active": {"type": "boolean"}},
             "required": ["name", "active"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "maximum": 9999}, "email": {"type": "string",
                                                                                    "maxLength": 16}},
                 "required": ["id", "email"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"enum": ["S", "M", "L"]}},
              "required": ["color", "size"], "additionalProperties": False},
    "bounded_numbers": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99},
                                                         "score": {"type": "integer", "minimum": -5, "maximum": 5}},
                        "required": ["age", "score"], "additionalProperties": False},
}
PROMPTS = 12  # per schema, half greedy and half sampled


@pytest.fixture(scope="module")
def engine(tiny_onnx, smollm2_tokenizer_dir):
    engine = Engine(tiny_onnx, EngineSettings(max_batch_size=16, max_queue_size=128, max_context_length=256,
                                              kv_cache_max_tokens=16384, intra_op_threads=1),
                    tokenizer_dir=smollm2_tokenizer_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_tokenizer_dir / "tokenizer.json"))


def request(prompt: list[int], guide: GuideSpec | None, max_new_tokens: int = 48, **sampling) -> GenerationRequest:
    return GenerationRequest(prompt, max_new_tokens, SamplingParams(end_id=END_ID, **sampling),
                             exclude_input_in_output=True, guide=guide)


def submit_all(engine: Engine, requests: list[GenerationRequest]) -> list[Collector]:
    """Submit every request at once (so they share decode batches) and wait for all."""
    collectors = [Collector() for _ in requests]
    for one, collector in zip(requests, collectors):
        engine.submit(one, collector.emit)
    for collector in collectors:
        collector.wait()
    return collectors


def json_guide(schema: dict) -> GuideSpec:
    return GuideSpec("guided_json", json.dumps(schema))


def test_every_finished_answer_validates_and_cut_answers_are_prefixes(engine, tokenizer):
    requests, schemas = [], []
    for name, schema in SCHEMAS.items():
        for number in range(PROMPTS):
            sampling = {} if number % 2 == 0 else {"temperature": 1.0, "seed": number}
            requests.append(request([5 + number, 40 + len(name), 7], json_guide(schema), **sampling))
            schemas.append(schema)
    finished = 0
    for collector, schema, sent in zip(submit_all(engine, requests), schemas, requests):
        final = collector.outputs[-1]
        text = tokenizer.decode(collector.generated)
        assert final.finish_reason in (FinishReason.GRAMMAR, FinishReason.END_ID, FinishReason.LENGTH), final
        if final.finish_reason is FinishReason.LENGTH:
            assert len(collector.generated) == sent.max_new_tokens
            guide = engine.grammars.compile(sent.guide)  # the cut answer is a prefix the grammar accepts
            assert all(guide.advance(token) for token in collector.generated), text
        else:
            jsonschema.validate(json.loads(text), schema)
            finished += 1
    assert finished >= len(requests) * 3 // 4  # the bounds above make most answers end within max_tokens


def test_greedy_guided_answers_do_not_depend_on_free_requests_in_the_batch(engine):
    guided = [request([9, 10 + number], json_guide(SCHEMAS["nested"])) for number in range(4)]
    alone = [collector.generated for collector in submit_all(engine, guided)]
    free = [request([300 + number, 8, 9, 10], None, 40) for number in range(8)]
    mixed = submit_all(engine, free[:4] + guided + free[4:])
    assert [collector.generated for collector in mixed[4:8]] == alone
    unguided = [collector.generated for collector in submit_all(engine, free)]
    assert [collector.generated for collector in mixed[:4] + mixed[8:]] == unguided


def test_regex_choice_and_grammars_are_followed(engine, tokenizer):
    pattern = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"
    choices = ["yes", "no", "maybe later"]
    lark = 'start: "SELECT " COLUMN (", " COLUMN)* " FROM t"\nCOLUMN: /[a-z]{1,5}/'
    gbnf = 'root ::= "(" digit+ ")"\ndigit ::= [0-9]'
    guides = [GuideSpec("guided_regex", pattern), GuideSpec("guided_choice", json.dumps(choices)),
              GuideSpec("guided_grammar", lark), GuideSpec("guided_grammar", gbnf)]
    checks = [lambda text: re.fullmatch(pattern, text), lambda text: text in choices,
              lambda text: re.fullmatch(r"SELECT [a-z]{1,5}(, [a-z]{1,5})* FROM t", text),
              lambda text: re.fullmatch(r"\(\d+\)", text)]
    for number in range(3):
        sent = [request([20 + number, 21], guide, 32, temperature=1.0, seed=number) for guide in guides]
        for collector, check in zip(submit_all(engine, sent), checks):
            if collector.outputs[-1].finish_reason is not FinishReason.LENGTH:
                text = tokenizer.decode(collector.generated)
                assert check(text), text


def test_streamed_guided_pieces_join_to_the_whole_answer_and_stop_words_still_apply(engine, tokenizer):
    guide = json_guide(SCHEMAS["flat"])
    whole = run_request(engine, request([11, 12, 13], guide))
    streamed = run_request(engine, GenerationRequest([11, 12, 13], 48, SamplingParams(end_id=END_ID),
                                                     streaming=True, guide=guide))
    assert len(streamed.outputs) > 2 and streamed.generated == whole.generated
    assert tokenizer.decode(whole.generated).startswith('{"name": "')
    stop = tuple(whole.generated[1:3])
    stopped = run_request(engine, request([11, 12, 13], guide, stop_words=(stop,)))
    assert stopped.outputs[-1].finish_reason is FinishReason.STOP_WORD
    assert stopped.generated == whole.generated[:3]


def test_grammars_are_compiled_once_per_content(engine):
    spec = json_guide(SCHEMAS["enums"])
    first, second = engine.grammars.compile(spec), engine.grammars.compile(GuideSpec(spec.input_name, spec.text))
    assert first.matcher is not second.matcher  # each request has its own state ...
    assert engine.grammars._compiled[spec] is not None and len([key for key in engine.grammars._compiled
                                                                if key == spec]) == 1  # ... from one cached entry


@pytest.mark.parametrize(("name", "text", "says"), [
    ("guided_json", '{"type": "objec', "not valid JSON"),
    ("guided_json", '{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}', "/nope"),
    ("guided_json", '"a string"', "a JSON schema"),
    ("guided_regex", "(unclosed", "unclosed group"),
    ("guided_grammar", 'start: "a" /[0-9]+', "lexer error"),
    ("guided_choice", '["yes", 3]', "list of non-empty strings"),
])
def test_a_constraint_that_does_not_compile_is_refused_naming_the_input(engine, name, text, says):
    with pytest.raises(InvalidArgument, match=f"(?s)input {name}.*{re.escape(says)}"):
        engine.submit(request([5, 6], GuideSpec(name, text)), Collector().emit)


def test_two_constraints_or_no_tokenizer_are_refused(tiny_onnx):
    with pytest.raises(InvalidArgument, match="at most one of guided_json"):
        GuideSpec.from_inputs({"guided_json": "{}", "guided_regex": "a+", "guided_grammar": None})
    assert GuideSpec.from_inputs({"guided_json": None}) is None
    plain = Engine(tiny_onnx, EngineSettings(max_batch_size=2, max_context_length=64, kv_cache_max_tokens=256, prefill_chunk_tokens=64,
                                             intra_op_threads=1))
    try:
        with pytest.raises(InvalidArgument, match="guided_regex: this engine has no tokenizer"):
            plain.submit(request([5, 6], GuideSpec("guided_regex", "a+")), Collector().emit)
    finally:
        plain.shutdown()
