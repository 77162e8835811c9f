"""Pure logic of the gateway without a server: OpenAI field checks, body bounds, keys, rate limits, replica choice."""

from __future__ import annotations

import json

import pytest

from tritonllm.contract import GatewaySettings, SettingsError
from tritonllm.gateway.auth import ApiKey, KeyRing, RateLimited, RateLimiter, TokenBucket, hash_key, parse_keys
from tritonllm.gateway.openai_api import APIError, Guide, json_depth, parse_body, parse_request
from tritonllm.gateway.replicas import ReplicaPool

SETTINGS = GatewaySettings(served_model_name="m")
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def refused(body: dict, kind: str = "chat") -> APIError:
    with pytest.raises(APIError) as caught:
        parse_request(body, kind, SETTINGS)
    return caught.value


def test_a_chat_request_is_read_with_openai_defaults_and_neutral_fields():
    request = parse_request({**CHAT, "max_completion_tokens": 5, "max_tokens": 9, "stop": "x", "n": 1,
                             "presence_penalty": 0, "user": "someone", "temperature": None}, "chat", SETTINGS)
    assert (request.max_tokens, request.stop, request.temperature, request.stream) == (5, ("x",), None, False)
    assert parse_request(CHAT, "chat", SETTINGS).max_tokens == SETTINGS.default_max_tokens
    completion = parse_request({"model": "m", "prompt": ["once"], "stream": True,
                                "stream_options": {"include_usage": True}}, "completion", SETTINGS)
    assert (completion.prompt, completion.include_usage) == ("once", True)
    forced = parse_request({**CHAT, "max_tokens": 7, "ignore_eos": True}, "chat", SETTINGS)
    assert forced.min_tokens == 7 and parse_request({**CHAT, "min_tokens": 3}, "chat", SETTINGS).min_tokens == 3


@pytest.mark.parametrize("body, param", [
    ({**CHAT, "tenant": "other"}, "tenant"), ({**CHAT, "n": 3}, "n"), ({**CHAT, "response_format": {}},
                                                                         "response_format"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({**CHAT, "response_format": {"type": "json_object", "schema": {}}}, "response_format"),
    ({**CHAT, "response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({**CHAT, "guided_choice": ["yes", 3]}, "guided_choice"), ({**CHAT, "guided_json": 5}, "guided_json"),
    ({**CHAT, "temperature": True}, "temperature"), ({**CHAT, "temperature": 2.5}, "temperature"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"), ({**CHAT, "max_tokens": 4, "min_tokens": 5}, "min_tokens"), ({**CHAT, "seed": 2**64}, "seed"), ({**CHAT, "stop": [""]}, "stop"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"model": "other", "messages": []}, "model")])
def test_each_bad_field_is_named(body, param):
    error = refused(body)
    assert error.param == param and error.status in (400, 404)
    assert error.body()["error"]["param"] == param and set(error.body()["error"]) == {"message", "type", "param",
                                                                                     "code"}


def test_completion_prompts_must_be_one_string():
    assert refused({"model": "m", "prompt": [1, 2, 3]}, "completion").param == "prompt"
    assert refused({"model": "m", "prompt": "x", "messages": []}, "completion").param == "messages"


def test_json_depth_ignores_brackets_in_strings_and_bounds_are_checked_before_parsing():
    assert json_depth(b'{"a": [[1], {"b": "[[[[{{{{"}]}') == 3
    assert json_depth(b'"just [ a string"') == 0
    with pytest.raises(APIError, match="nests JSON 17 levels"):
        parse_body(b"[" * 17 + b"]" * 17, SETTINGS)
    with pytest.raises(APIError) as too_big:
        parse_body(b" " * (SETTINGS.max_body_bytes + 1), SETTINGS)
    assert too_big.value.status == 413
    with pytest.raises(APIError, match="must be a JSON object"):
        parse_body(b"[1]", SETTINGS)


def test_gateway_settings_are_validated_naming_the_setting():
    for bad in (GatewaySettings(triton_grpc_urls=()), GatewaySettings(model="other"),
                GatewaySettings(max_json_depth=1000), GatewaySettings(triton_grpc_urls=("host-without-port",))):
        with pytest.raises(SettingsError, match="gateway\\."):
            bad.validate()
    GatewaySettings().validate()


def test_keys_are_stored_hashed_and_looked_up_from_bearer_tokens():
    keys = parse_keys(json.dumps({"keys": [{"sha256": hash_key("secret"), "tenant": "acme"}]}), "keys.json")
    ring = KeyRing(keys)
    assert ring.required and ring.lookup("Bearer secret").tenant == "acme"
    assert ring.lookup("Bearer wrong") is None and ring.lookup("secret") is None and ring.lookup(None) is None
    assert not KeyRing(()).required


@pytest.mark.parametrize("document, named", [
    ('{"keys": [{"sha256": "abc", "tenant": "t"}]}', "keys[0].sha256"),
    ('{"keys": [{"sha256": "' + "a" * 64 + '", "tenant": ""}]}', "keys[0].tenant"),
    ('{"keys": [{"sha256": "' + "a" * 64 + '", "tenant": "t", "rps": 1}]}', "keys[0]"),
    ('{"keys": [{"sha256": "' + "a" * 64 + '", "tenant": "t", "tokens_per_minute": "many"}]}',
     "keys[0].tokens_per_minute"),
    ("not json", "is not JSON"), ('{"other": []}', '"keys" list')])
def test_a_bad_keys_document_is_refused_naming_the_entry(document, named):
    with pytest.raises(SettingsError, match=named.replace("[", "\\[").replace("]", "\\]")):
        parse_keys(document, "keys.json")


def test_rate_limits_refuse_with_the_time_to_wait_and_refill():
    clock = Clock()
    fast = ApiKey(hash_key("a"), "a", requests_per_second=2)
    budget = ApiKey(hash_key("b"), "b", tokens_per_minute=60)
    limiter = RateLimiter((fast, budget), clock)
    limiter.admit(fast)
    limiter.admit(fast)
    with pytest.raises(RateLimited) as limited:
        limiter.admit(fast)
    assert limited.value.retry_after_seconds == 1
    clock.now = 0.5
    limiter.admit(fast)  # one request refilled after half a second

    limiter.admit(budget)
    limiter.charge_tokens(budget, 90)  # 30 over the budget of a minute
    with pytest.raises(RateLimited, match="tokens_per_minute") as over:
        limiter.admit(budget)
    assert over.value.retry_after_seconds == 31  # 31 tokens at one a second until a token is available
    clock.now = 32
    limiter.admit(budget)


def test_token_bucket_never_exceeds_its_capacity():
    clock = Clock()
    bucket = TokenBucket(rate=1.0, capacity=3.0, clock=clock)
    clock.now = 100
    assert bucket.seconds_until(3) == 0 and bucket.seconds_until(4) == 1


def test_replicas_are_chosen_by_fewest_in_flight_and_unready_ones_are_skipped():
    ready = {"a": True, "b": True, "c": False}
    pool = ReplicaPool(("a", "b", "c"), "ensemble", lambda url: "ensemble" if ready[url] else None)
    pool.check_all()
    first, second = pool.choose(set()), pool.choose(set())
    assert {first.url, second.url} == {"a", "b"}  # c is out of rotation; a and b take one each
    pool.release(first)
    assert pool.choose(set()).url == first.url  # now the least loaded
    assert pool.choose({"a", "b"}).url == "c"  # with no ready replica left, the others are tried
    assert pool.choose({"a", "b", "c"}) is None
    ready["c"] = True
    pool.check_all()
    assert pool.ready_count() == 3


def test_structured_output_fields_become_one_guided_input():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    guide = lambda **fields: parse_request({**CHAT, **fields}, "chat", SETTINGS).guide
    assert guide(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema,
                                                                          "strict": True}}) == Guide(
        "guided_json", json.dumps(schema), "response_format")
    assert guide(response_format={"type": "json_object"}) == Guide("guided_json", '{"type": "object"}',
                                                                   "response_format")
    assert guide(response_format={"type": "text"}) is None and guide() is None
    assert guide(guided_json=schema).text == json.dumps(schema)
    assert guide(guided_regex="[0-9]+") == Guide("guided_regex", "[0-9]+", "guided_regex")
    assert guide(guided_choice=["yes", "no"]) == Guide("guided_choice", '["yes", "no"]', "guided_choice")


def test_the_auto_model_is_the_first_candidate_a_replica_serves():
    served = {"a": "llm", "b": None}
    pool = ReplicaPool(("a", "b"), "ensemble", lambda url: served[url])
    assert [replica.model for replica in pool.replicas] == ["ensemble", "ensemble"]  # before any check
    pool.check_all()
    assert [(replica.model, replica.ready) for replica in pool.replicas] == [("llm", True), ("ensemble", False)]
    served["b"] = "ensemble"  # b's repository has no llm
    pool.check_all()
    assert [replica.model for replica in pool.replicas] == ["llm", "ensemble"] and pool.ready_count() == 2


@pytest.mark.parametrize("text", ["The capital of France is", "  two  spaces\tand\nlines", "日本語 and émoji 🎉",
                                  "<|im_start|>user\nhi<|im_end|>\n", ""])
def test_usage_counts_the_ids_the_tokenizer_gives(smollm2_tokenizer_dir, text):
    from tritonllm.gateway.tokens import PromptTokens

    tokens = PromptTokens(smollm2_tokenizer_dir)
    assert tokens.count_prompt(text) == len(tokens.tokenizer(text, add_special_tokens=True)["input_ids"])
    assert tokens.count_completion(text) == len(tokens.tokenizer(text, add_special_tokens=False)["input_ids"])
