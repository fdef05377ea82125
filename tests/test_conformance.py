"""Spec conformance of a running server (ours by default, any via $QWEN_JAX_BASE_URL).

Hypothesis generates valid and invalid Chat Completions requests; every response is checked
against spec/openapi.yaml with jsonschema and against the behaviour rules: a valid request gets
200 and a schema-valid body (JSON or server-sent events), an invalid one a 4xx error object naming
the offending field, and nothing ever gets a 5xx. The `api_target` fixture (tests/conftest.py)
supplies base_url (ending in /v1), api_key and model.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

SPEC = yaml.safe_load((Path(__file__).resolve().parent.parent / "spec/openapi.yaml").read_text())
CHEAP = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def schema(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", **SPEC})


def assert_schema(name: str, obj) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in schema(name).iter_errors(obj)]
    assert not errors, (name, errors, obj)


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self):
        return json.loads(self.body)


def call(
    target,
    method: str,
    path: str,
    body=None,
    *,
    raw: bytes | None = None,
    content_type: str = "application/json",
    api_key: str | None = "default",
    root: bool = False,
) -> Reply:
    """One HTTP request to base_url + path (or, with `root`, to the server root + path)."""
    base = target.base_url.removesuffix("/v1") if root else target.base_url
    url = base + path
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": content_type} if data is not None else {}
    key = target.api_key if api_key == "default" else api_key
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            reply = Reply(r.status, r.headers.get("Content-Type", ""), r.read())
    except urllib.error.HTTPError as e:
        reply = Reply(e.code, e.headers.get("Content-Type", ""), e.read())
    assert reply.status < 500, (reply.status, reply.body[:500])
    return reply


def assert_error(reply: Reply, status: int | tuple[int, ...], param: str | None = None) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert reply.status in statuses, (reply.status, reply.body[:300])
    assert reply.content_type.startswith("application/json")
    err = reply.json()
    assert_schema("ErrorResponse", err)
    if param is not None:
        assert (err["error"]["param"] or "").startswith(param), err
    return err["error"]


def sse_events(reply: Reply) -> list:
    """Parse a text/event-stream body into JSON objects and the final "[DONE]"."""
    text = reply.body.decode("utf-8")
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.strip("\n").split("\n\n"):
        data = [line[5:].lstrip() for line in block.split("\n") if line.startswith("data:")]
        assert data, block
        payload = "\n".join(data)
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# --------------------------------------------------------------------------- request strategies

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
finite = dict(allow_nan=False, allow_infinity=False)
words = st.text(alphabet="abcdefghij klmnop", min_size=1, max_size=24)


@st.composite
def valid_requests(draw, model: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": draw(words)}]}
    if draw(st.booleans()):
        body["messages"].insert(0, {"role": "system", "content": draw(words)})
    body[draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))] = draw(st.integers(1, 8))
    optional = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "temperature": st.floats(0, 2, **finite),
                "top_p": st.floats(0, 1, exclude_min=True, **finite),
                "top_k": st.integers(0, 999),
                "min_p": st.floats(0, 1, **finite),
                "presence_penalty": st.floats(-2, 2, **finite),
                "frequency_penalty": st.floats(-2, 2, **finite),
                "repetition_penalty": st.floats(0.01, 5, **finite),
                "seed": st.integers(0, 2**63 - 1),
                "n": st.integers(1, 2),
                "stop": st.one_of(words, st.lists(words, max_size=3)),
                "stream": st.booleans(),
                "logprobs": st.booleans(),
                "user": words,
                "logit_bias": st.dictionaries(
                    st.integers(0, 100).map(str), st.floats(-100, 100, **finite), max_size=2
                ),
                # vLLM's extensions
                "stop_token_ids": st.lists(st.integers(0, 100), max_size=3),
                "ignore_eos": st.booleans(),
                "min_tokens": st.integers(0, 8),
                "include_stop_str_in_output": st.booleans(),
            },
        )
    )
    body.update(optional)
    if body.get("stream") and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    if body.get("logprobs"):
        body["top_logprobs"] = draw(st.integers(0, 5))
    extra = draw(st.sampled_from(["none", "tools", "json_object", "json_schema"]))
    if extra == "tools":
        body["tools"] = [WEATHER]
        choice = draw(st.sampled_from([None, "none", "auto", "required", "named"]))
        if choice == "named":
            body["tool_choice"] = {"type": "function", "function": {"name": "get_weather"}}
        elif choice is not None:
            body["tool_choice"] = choice
    elif extra == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif extra == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
            },
        }
    return body


def _without(field):
    def mutate(body):
        body.pop(field, None)

    return mutate


def _set(field, value):
    def mutate(body):
        body[field] = value
        if field == "top_logprobs":
            body["logprobs"] = True

    return mutate


# (field the error must name, mutation, expected status)
INVALID = [
    ("temperature", _set("temperature", 2.5), 400),
    ("temperature", _set("temperature", "hot"), 400),
    ("temperature", _set("temperature", True), 400),
    ("top_p", _set("top_p", 0), 400),
    ("top_p", _set("top_p", 1.01), 400),
    ("top_k", _set("top_k", 1000), 400),
    ("top_k", _set("top_k", 2.5), 400),
    ("min_p", _set("min_p", -0.5), 400),
    ("presence_penalty", _set("presence_penalty", -2.01), 400),
    ("frequency_penalty", _set("frequency_penalty", 3), 400),
    ("repetition_penalty", _set("repetition_penalty", 0), 400),
    ("repetition_penalty", _set("repetition_penalty", 5.5), 400),
    ("n", _set("n", 0), 400),
    ("n", _set("n", 5), 400),
    ("max_tokens", _set("max_tokens", -1), 400),
    ("max_completion_tokens", _set("max_completion_tokens", 1_000_001), 400),
    ("seed", _set("seed", -1), 400),
    ("stop", _set("stop", [str(i) for i in range(17)]), 400),
    ("stop", _set("stop", 7), 400),
    ("stream", _set("stream", "yes"), 400),
    ("logprobs", _set("logprobs", "yes"), 400),
    ("top_logprobs", _set("top_logprobs", 21), 400),
    ("logit_bias", _set("logit_bias", {"not-a-token": 1}), 400),
    ("logit_bias", _set("logit_bias", {"1": 101}), 400),
    ("user", _set("user", 12), 400),
    ("stop_token_ids", _set("stop_token_ids", [-1]), 400),
    ("stop_token_ids", _set("stop_token_ids", "7"), 400),
    ("ignore_eos", _set("ignore_eos", "yes"), 400),
    ("min_tokens", _set("min_tokens", -1), 400),
    ("include_stop_str_in_output", _set("include_stop_str_in_output", 1), 400),
    ("functions", _set("functions", [WEATHER["function"]]), 400),
    ("messages", _set("messages", []), 400),
    ("messages", _set("messages", "hello"), 400),
    ("messages", _set("messages", [{"content": "no role"}]), 400),
    ("messages", _without("messages"), 400),
    ("tool_choice", _set("tool_choice", "sometimes"), 400),
    ("tool_choice", _set("tool_choice", {"type": "function", "function": {"name": "nope"}}), 400),
    ("response_format", _set("response_format", {"type": "xml"}), 400),
    ("response_format", _set("response_format", {"type": "json_schema", "json_schema": {}}), 400),
    # JSON can carry these, a prompt cannot: a lone UTF-16 surrogate, and nesting without end.
    ("messages", _set("messages", [{"role": "user", "content": "hi \ud800"}]), 400),
    ("tools", _set("tools", [{"type": "function", "function": {
        "name": "get_weather", "description": "\udc00"}}]), 400),
    ("response_format", _set("response_format", json.loads("[" * 300 + "]" * 300)), 400),
    ("model", _without("model"), 400),
    ("model", _set("model", "no-such-model"), 404),
]


# --------------------------------------------------------------------------- the checks


def _matched_stops(body: dict) -> list[str]:
    """The stop strings the reply's text must not contain: none where a grammar constrains the
    output (JSON modes, forced tool calls), which ends where its grammar does, and none with
    min_tokens."""
    stops = [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []
    rf = (body.get("response_format") or {}).get("type")
    forced = body.get("tools") and body.get("tool_choice") not in (None, "none", "auto")
    # Nor in the text of the first min_tokens tokens, which a reply does not mark.
    free = rf in ("json_object", "json_schema") or forced or body.get("min_tokens")
    return [] if free else stops


def check_completion(body: dict, reply: Reply) -> None:
    assert reply.status == 200, reply.body[:500]
    assert reply.content_type.startswith("application/json")
    obj = reply.json()
    assert_schema("ChatCompletionResponse", obj)
    n, limit = body.get("n", 1), body.get("max_completion_tokens", body.get("max_tokens"))
    assert obj["model"] == body["model"]
    assert sorted(c["index"] for c in obj["choices"]) == list(range(n))
    u = obj["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] <= n * limit
    stops = _matched_stops(body)
    for c in obj["choices"]:
        content = c["message"]["content"] or ""
        assert not any(s in content for s in stops), (stops, content)
        if body.get("logprobs"):
            assert c["logprobs"] is not None
            for entry in c["logprobs"]["content"] or []:
                assert len(entry["top_logprobs"]) <= body.get("top_logprobs", 0)
        else:
            assert c["logprobs"] is None
        if c["finish_reason"] == "tool_calls":
            assert c["message"]["tool_calls"]
        if body.get("tool_choice", "auto" if body.get("tools") else "none") == "none":
            assert not c["message"].get("tool_calls")


def check_stream(body: dict, reply: Reply) -> None:
    assert reply.status == 200, reply.body[:500]
    assert reply.content_type.startswith("text/event-stream")
    events = sse_events(reply)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert chunks
    for c in chunks:
        assert_schema("ChatCompletionChunk", c)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    n = body.get("n", 1)
    if (body.get("stream_options") or {}).get("include_usage"):
        *chunks, last = chunks
        assert last["choices"] == [] and last["usage"] is not None
        u = last["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert all(c.get("usage") is None for c in chunks)
    stops = _matched_stops(body)
    for index in range(n):
        mine = [ch for c in chunks for ch in c["choices"] if ch["index"] == index]
        assert mine, f"no chunk for choice {index}"
        assert mine[0]["delta"].get("role") == "assistant"
        finishes = [ch["finish_reason"] for ch in mine if ch["finish_reason"] is not None]
        assert len(finishes) == 1 and mine[-1]["finish_reason"] is not None
        text = "".join(ch["delta"].get("content") or "" for ch in mine)
        assert not any(s in text for s in stops), (stops, text)
    assert {ch["index"] for c in chunks for ch in c["choices"]} == set(range(n))


@CHEAP
@given(data=st.data())
def test_valid_requests_get_schema_valid_replies(api_target, data):
    body = data.draw(valid_requests(api_target.model))
    reply = call(api_target, "POST", "/chat/completions", body)
    (check_stream if body.get("stream") else check_completion)(body, reply)


@CHEAP
@given(data=st.data())
def test_invalid_requests_get_errors_naming_the_param(api_target, data):
    body = data.draw(valid_requests(api_target.model))
    param, mutate, status = data.draw(st.sampled_from(INVALID))
    if param == "tool_choice":
        body.setdefault("tools", [WEATHER])
    mutate(body)
    err = assert_error(call(api_target, "POST", "/chat/completions", body), status, param)
    if status == 404:
        assert err["code"] == "model_not_found"


def test_models_list(api_target):
    reply = call(api_target, "GET", "/models")
    assert reply.status == 200
    obj = reply.json()
    assert_schema("ModelList", obj)
    assert api_target.model in [m["id"] for m in obj["data"]]
    one = call(api_target, "GET", f"/models/{api_target.model}")
    assert one.status == 200 and one.json()["id"] == api_target.model
    assert_schema("Model", one.json())
    assert "/v1/models/{model}" in SPEC["paths"]


def test_health(api_target):
    reply = call(api_target, "GET", "/health", api_key=None, root=True)
    if reply.status == 404 and os.environ.get("QWEN_JAX_BASE_URL"):
        pytest.skip("the external server has no /health (it is not an OpenAI endpoint)")
    assert reply.status == 200
    assert_schema("Health", reply.json())


def test_malformed_json_and_wrong_content_type(api_target):
    assert_error(call(api_target, "POST", "/chat/completions", raw=b'{"model": '), 400)
    assert_error(call(api_target, "POST", "/chat/completions", raw=b"[1, 2]"), 400)
    body = json.dumps({"model": api_target.model, "messages": []}).encode()
    assert_error(
        call(api_target, "POST", "/chat/completions", raw=body, content_type="text/plain"), 415
    )


def test_unknown_path_and_method(api_target):
    assert_error(call(api_target, "GET", "/no-such-endpoint"), 404)
    assert_error(call(api_target, "GET", "/chat/completions"), (404, 405))


def test_api_key_is_enforced(api_target):
    if not api_target.api_key:
        pytest.skip("the target server runs without an API key")
    body = {"model": api_target.model, "messages": [{"role": "user", "content": "hi"}]}
    for key in (None, "wrong-key"):
        assert_error(call(api_target, "POST", "/chat/completions", body, api_key=key), 401)
    assert_error(call(api_target, "GET", "/models", api_key="wrong-key"), 401)


def test_invalid_streaming_request_is_a_plain_json_error(api_target):
    body = {"model": api_target.model, "messages": [], "stream": True}
    assert_error(call(api_target, "POST", "/chat/completions", body), 400, "messages")


def test_stream_with_usage_and_several_choices(api_target):
    body = {
        "model": api_target.model,
        "messages": [{"role": "user", "content": "Count to three."}],
        "max_tokens": 4,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "top_logprobs": 2,
        "seed": 1,
    }
    check_stream(body, call(api_target, "POST", "/chat/completions", body))
