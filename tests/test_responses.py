"""Response builders: every object validates against spec/openapi.yaml and OpenAI's schemas."""

from __future__ import annotations

import copy
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from qwen_jax import responses as R

SPEC = yaml.safe_load((Path(__file__).resolve().parent.parent / "spec/openapi.yaml").read_text())


def spec_validator(name: str, spec: dict = SPEC) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", **spec})


def assert_valid(name: str, obj: dict) -> None:
    errors = [e.message for e in spec_validator(name).iter_errors(obj)]
    assert not errors, errors


def openapi30_to_jsonschema(node):
    """OpenAI's extract still uses OpenAPI 3.0 `nullable: true`; turn it into a null type."""
    if isinstance(node, list):
        return [openapi30_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi30_to_jsonschema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


TOOL_CALL = {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
LOGPROBS = R.logprobs_content(
    [R.TokenLogprob("Hi", -0.25, None, [R.TokenLogprob("Hi", -0.25), R.TokenLogprob("Yo", -2.0)])]
)


def sample_completion() -> dict:
    choices = [
        R.choice(0, "Hello!", None, "stop", None),
        R.choice(1, None, [TOOL_CALL], "tool_calls", None),
        R.choice(2, "Hi", None, "length", LOGPROBS),
    ]
    usage = R.usage(10, 5, cached_tokens=4)  # OpenAI's prompt_tokens_details too
    return R.completion_response("chatcmpl-x", 1700000000, "m", choices, usage)


def sample_chunks() -> list[dict]:
    cid, t = "chatcmpl-y", 1700000000
    return [
        R.chunk(cid, t, "m", [R.chunk_choice(0, {"role": "assistant", "content": ""})]),
        R.chunk(cid, t, "m", [R.chunk_choice(0, {"content": "Hi"}, logprobs=LOGPROBS)]),
        R.chunk(
            cid,
            t,
            "m",
            [R.chunk_choice(0, {"tool_calls": [{"index": 0, **TOOL_CALL}]})],
        ),
        R.chunk(cid, t, "m", [R.chunk_choice(0, {}, "stop")]),
        R.chunk(cid, t, "m", [], usage=R.usage(3, 2)),
    ]


def test_completion_matches_spec():
    obj = sample_completion()
    assert_valid("ChatCompletionResponse", obj)
    assert obj["object"] == "chat.completion"
    assert [c["index"] for c in obj["choices"]] == [0, 1, 2]
    assert obj["choices"][1]["message"]["tool_calls"] == [TOOL_CALL]
    assert "tool_calls" not in obj["choices"][0]["message"]
    json.dumps(obj, allow_nan=False)  # strict JSON


def test_chunks_match_spec():
    chunks = sample_chunks()
    for c in chunks:
        assert_valid("ChatCompletionChunk", c)
        assert c["object"] == "chat.completion.chunk"
    assert "usage" not in chunks[0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 5


def test_objects_match_openai_schemas(shared_reference):
    extract = yaml.safe_load(
        (shared_reference / "openai-chat-completions-extract.yaml").read_text()
    )
    openai = openapi30_to_jsonschema(extract)
    for name, obj in [("CreateChatCompletionResponse", sample_completion())] + [
        ("CreateChatCompletionStreamResponse", c) for c in sample_chunks()
    ]:
        errors = [e.message for e in spec_validator(name, openai).iter_errors(obj)]
        assert not errors, (name, errors)
    models = R.model_list("m", 1700000000, max_model_len=4096)  # OpenAI's schema allows more
    assert not list(spec_validator("ListModelsResponse", openai).iter_errors(models))


@given(st.integers(0, 10**7), st.integers(0, 10**7))
def test_usage_counts_and_cost(prompt, completion):
    u = R.usage(prompt, completion)
    assert_valid("Usage", u)
    assert "prompt_tokens_details" not in u
    cached = R.usage(prompt, completion, cached_tokens=prompt // 2)
    assert_valid("Usage", cached)
    assert cached == {**u, "prompt_tokens_details": {"cached_tokens": prompt // 2}}
    assert u["total_tokens"] == prompt + completion
    # $0.025 / $0.05 per million tokens (the seed document's price line), exact arithmetic.
    exact = (
        Fraction(prompt) * Fraction(25, 1000) + Fraction(completion) * Fraction(5, 100)
    ) / 10**6
    assert math.isclose(u["estimated_cost"], float(exact), rel_tol=1e-9, abs_tol=1e-12)


def test_usage_prices_are_configurable():
    u = R.usage(1_000_000, 2_000_000, price_in_per_m=1.0, price_out_per_m=3.0)
    assert u["estimated_cost"] == pytest.approx(7.0)


def test_logprobs_bytes_and_clamping():
    out = R.logprobs_content(
        [
            ("é", -1.5, None, [("é", -1.5, None, ())]),
            ("\ufffd", float("-inf"), b"\xe4\xbd", ()),  # half of a UTF-8 character
            ("x", 1e-7, None, ()),  # float noise above 0
        ]
    )
    assert_valid("Logprobs", out)
    a, b, c = out["content"]
    assert a["bytes"] == [0xC3, 0xA9] and a["top_logprobs"][0]["bytes"] == [0xC3, 0xA9]
    assert b["bytes"] == [0xE4, 0xBD] and b["logprob"] == -9999.0
    assert c["logprob"] == 0.0
    json.dumps(out, allow_nan=False)


def test_nan_logprob_is_reported_as_the_minimum():
    """NaN (a broken logit) cannot go out as JSON; like -inf it reads as OpenAI's -9999."""
    out = R.logprobs_content([("a", float("nan"), None, [("a", float("nan")), ("b", -1e30)])])
    assert_valid("Logprobs", out)
    (entry,) = out["content"]
    assert entry["logprob"] == R.MIN_LOGPROB
    assert [t["logprob"] for t in entry["top_logprobs"]] == [R.MIN_LOGPROB, R.MIN_LOGPROB]
    json.dumps(out, allow_nan=False)


def test_chunk_stop_reason_only_on_the_finishing_chunk():
    """vLLM's `stop_reason` rides on the chunk that ends a choice (null for an end of turn);
    chunks before it carry no such key, whatever stop_reason is passed."""
    middle = R.chunk_choice(0, {"content": "a"}, stop_reason="END")
    assert "stop_reason" not in middle
    assert R.chunk_choice(0, {}, "stop", stop_reason="END")["stop_reason"] == "END"
    assert R.chunk_choice(0, {}, "stop", stop_reason=7)["stop_reason"] == 7
    end_of_turn = R.chunk_choice(0, {}, "stop")
    assert "stop_reason" in end_of_turn and end_of_turn["stop_reason"] is None
    for c in (middle, end_of_turn):
        assert_valid("ChatCompletionChunk", R.chunk("chatcmpl-s", 1, "m", [c]))


def test_finish_reasons_match_spec():
    spec_enum = SPEC["components"]["schemas"]["Choice"]["properties"]["finish_reason"]["enum"]
    assert set(R.FINISH_REASONS) == set(spec_enum)
    with pytest.raises(ValueError, match="finish_reason"):
        R.choice(0, "x", None, "cancelled", None)
    with pytest.raises(ValueError, match="finish_reason"):
        R.chunk_choice(0, {}, "error")


def test_sse_event_format():
    obj = sample_chunks()[1]
    ev = R.sse_event(obj)
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n") and ev.count(b"\n") == 2
    assert json.loads(ev[len(b"data: ") :]) == obj
    assert R.sse_event("[DONE]") == b"data: [DONE]\n\n"
    multi = R.sse_event(R.chunk("chatcmpl-z", 1, "m", [R.chunk_choice(0, {"content": "a\nb é"})]))
    assert multi.count(b"\n") == 2 and "é".encode() in multi  # newline escaped, UTF-8 raw


def test_completion_ids_are_unique_and_prefixed():
    ids = {R.new_completion_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("chatcmpl-") and len(i) > 16 for i in ids)


def test_model_list_and_builders_are_pure():
    models = R.model_list("Qwen/Qwen2.5-7B-Instruct", 1700000000)
    assert_valid("ModelList", models)
    assert models["data"][0]["id"] == "Qwen/Qwen2.5-7B-Instruct"
    assert "max_model_len" not in models["data"][0]
    with_len = R.model_list("m", 1700000000, max_model_len=8192)
    assert_valid("ModelList", with_len)
    assert with_len["data"][0]["max_model_len"] == 8192
    choices = [R.choice(0, "a", None, "stop", None)]
    before = copy.deepcopy(choices)
    R.completion_response("chatcmpl-a", 1, "m", choices, R.usage(1, 1))
    assert choices == before
