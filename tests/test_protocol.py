"""Request validation: defaults, every field's bad values (naming the param), errors, max_tokens."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from qwen_jax import protocol
from qwen_jax.protocol import APIError, resolve_max_tokens, validate_chat_request

MODEL = "Qwen/Qwen2.5-7B-Instruct"
MSGS = [{"role": "user", "content": "Hello!"}]
BASE = {"model": MODEL, "messages": MSGS}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get-time", "description": "now"}},
]
SPEC = yaml.safe_load((Path(__file__).resolve().parent.parent / "spec/openapi.yaml").read_text())
ERROR_VALIDATOR = Draft202012Validator({"$ref": "#/components/schemas/ErrorResponse", **SPEC})


def ok(**fields):
    return validate_chat_request({**BASE, **fields}, served_model_name=MODEL)


def err(body, **kw) -> APIError:
    with pytest.raises(APIError) as e:
        validate_chat_request(body, served_model_name=MODEL, **kw)
    assert ERROR_VALIDATOR.is_valid(e.value.to_dict())
    return e.value


def test_defaults_are_the_seed_documents():
    r = ok()
    s = r.sampling
    # The seed document's "Default value" lines.
    assert (s.temperature, s.top_p, s.min_p, s.top_k) == (1, 1, 0, 0)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0, 0, 1)
    assert s.seed is None and s.logit_bias == ()
    assert (r.n, r.stream, r.include_usage, r.max_tokens, r.stop) == (1, False, False, None, ())
    assert (r.logprobs, r.top_logprobs, r.user) == (False, 0, None)
    assert (r.tools, r.tool_choice, r.parallel_tool_calls, r.response_format) == (
        None,
        "none",
        True,
        None,
    )
    assert r.messages == tuple(MSGS) and r.model == MODEL


def test_null_means_default_and_unknown_fields_are_ignored():
    nulls = {k: None for k in ("temperature", "top_p", "n", "stop", "seed", "tools", "stream")}
    assert ok(**nulls) == ok()
    hints = ok(metadata={"a": 1}, service_tier="auto", store=False)
    assert hints == ok() and hints.ignored_fields == ("metadata", "service_tier", "store")


def test_deprecated_function_calling_is_refused_not_ignored():
    fn = {"name": "f", "parameters": {"type": "object"}}
    for fields, param in (({"functions": [fn]}, "functions"),
                          ({"function_call": {"name": "f"}}, "function_call"),
                          ({"functions": [fn], "function_call": "auto"}, "functions"),
                          ({"function_call": "bogus"}, "function_call"),
                          ({"function_call": []}, "function_call")):
        e = err({**BASE, **fields})
        assert e.status == 400 and e.param == param and "'tools'" in e.message
    # Empty or no-op values, as some clients send them, pass.
    assert ok(functions=[], function_call="none") == ok(functions=None, function_call="auto")


def test_vllm_structured_outputs_in_either_spelling():
    """structured_outputs (vLLM 0.10.2+) and the older top-level guided_* fields give the same
    request; a schema may come as its JSON text; no-op options pass; the rest is refused."""
    from qwen_jax.protocol import StructuredOutput

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    same = [
        (StructuredOutput("json", schema), [{"guided_json": schema},
                                            {"guided_json": json.dumps(schema)},
                                            {"structured_outputs": {"json": schema}},
                                            {"structured_outputs": {"json": json.dumps(schema),
                                                                    "disable_fallback": True}}]),
        (StructuredOutput("json", {"type": "object"}),
         [{"structured_outputs": {"json_object": True, "regex": None}}]),
        (StructuredOutput("regex", r"\d+"), [{"guided_regex": r"\d+"},
                                              {"structured_outputs": {"regex": r"\d+"}}]),
        (StructuredOutput("choice", ("yes", "no")),
         [{"guided_choice": ["yes", "no"]},
          {"structured_outputs": {"choice": ["yes", "no"], "disable_any_whitespace": True}}]),
    ]
    for want, spellings in same:
        for fields in spellings:
            r = ok(**fields)
            assert r.structured_output == want, fields
            assert validate_chat_request(r.to_body(), served_model_name=MODEL) == r
    assert ok(structured_outputs={"json_object": False}).structured_output is None
    assert ok(guided_json=None, structured_outputs={}).structured_output is None
    for fields, param in [
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": "[1]"}, "guided_json"),
        ({"guided_json": 3}, "guided_json"),
        ({"guided_regex": ""}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a", 1]}, "guided_choice"),
        ({"guided_choice": "a"}, "guided_choice"),
        ({"guided_grammar": "root ::= 'a'"}, "guided_grammar"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ({"structured_outputs": {"grammar": "root ::= 'a'"}}, "structured_outputs.grammar"),
        ({"structured_outputs": "json"}, "structured_outputs"),
        ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"structured_outputs": {"regex": "a"}, "guided_json": schema}, "guided_json"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ]:
        e = err({**BASE, **fields})
        assert e.status == 400 and e.param == param, (fields, e.param, e.message)
    # NaN / Infinity inside a schema (Python's JSON parser takes them) would compile as null.
    for fields, param in [({"guided_json": '{"const": NaN}'}, "guided_json.const"),
                          ({"response_format": {"type": "json_schema", "json_schema": {
                              "name": "x", "schema": {"enum": [float("inf")]}}}},
                           "response_format.json_schema.schema.enum[0]"),
                          ({"structured_outputs": {"regex": "a", "disable_fallback": "no"}},
                           "structured_outputs.disable_fallback")]:
        e = err({**BASE, **fields})
        assert e.status == 400 and e.param == param, (fields, e.param, e.message)
    # A text response_format constrains nothing, so it goes with a structured output.
    assert ok(guided_regex="a", response_format={"type": "text"}).structured_output


def test_fields_are_carried():
    r = ok(
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.05,
        seed=42,
        logit_bias={"10": -100, "3": 2.5},
        n=3,
        max_tokens=7,
        stop="\n",
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=5,
        user="u-1",
    )
    s = r.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p) == (0.7, 0.8, 20, 0.05)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.5, 1.05)
    assert s.seed == 42 and s.logit_bias == ((3, 2.5), (10, -100.0))
    assert (r.n, r.max_tokens, r.stop, r.stream, r.include_usage) == (3, 7, ("\n",), True, True)
    assert (r.logprobs, r.top_logprobs, r.user) == (True, 5, "u-1")


def test_vllm_extensions_are_carried_and_checked():
    r = ok(stop_token_ids=[7, 3.0, 7], ignore_eos=True, min_tokens=4,
           include_stop_str_in_output=True)
    assert (r.stop_token_ids, r.ignore_eos, r.min_tokens) == ((7, 3), True, 4)
    assert r.include_stop_str_in_output is True
    assert (ok().stop_token_ids, ok().ignore_eos, ok().min_tokens) == ((), False, 0)
    assert ok().include_stop_str_in_output is ok(include_stop_str_in_output=None).\
        include_stop_str_in_output is False
    for fields, param in (({"stop_token_ids": 5}, "stop_token_ids"),
                          ({"stop_token_ids": [-1]}, "stop_token_ids"),
                          ({"stop_token_ids": [True]}, "stop_token_ids"),
                          ({"stop_token_ids": [1.5]}, "stop_token_ids"),
                          ({"stop_token_ids": [0] * 1025}, "stop_token_ids"),
                          ({"ignore_eos": 1}, "ignore_eos"),
                          ({"include_stop_str_in_output": "no"}, "include_stop_str_in_output"),
                          ({"min_tokens": -1}, "min_tokens"),
                          ({"min_tokens": 2.5}, "min_tokens")):
        assert err({**BASE, **fields}).param == param
    # Token ids past the model's vocabulary are refused when the server knows its size.
    e = err({**BASE, "stop_token_ids": [300]}, vocab_limit=300)
    assert e.param == "stop_token_ids" and "300" in e.message
    assert validate_chat_request({**BASE, "stop_token_ids": [299]}, served_model_name=MODEL,
                                 vocab_limit=300).stop_token_ids == (299,)


def test_max_completion_tokens_wins():
    assert ok(max_tokens=5, max_completion_tokens=9).max_tokens == 9
    assert ok(max_completion_tokens=9).max_tokens == 9
    assert ok(max_tokens=0).max_tokens == 0


def test_top_k_minus_one_is_off_as_in_vllm():
    """LangChain's VLLMOpenAI and other clients written for vLLM send top_k -1 by default."""
    assert ok(top_k=-1).sampling.top_k == 0 == ok().sampling.top_k


def test_integral_floats_are_integers():
    assert ok(n=2.0, top_k=5.0, seed=3.0).n == 2
    assert isinstance(ok(top_k=5.0).sampling.top_k, int)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", True),  # bool is not a number
        ("temperature", "1"),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", 2.01),
        ("temperature", -0.1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("min_p", -0.01),
        ("top_k", 1000),
        ("top_k", 2.5),
        ("top_k", -2),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0),
        ("repetition_penalty", 5.5),
        ("seed", -1),
        ("seed", 2**63),
        ("seed", "7"),
        ("n", 0),
        ("n", 5),
        ("n", True),
        ("n", 1.5),
        ("max_tokens", -1),
        ("max_tokens", 1_000_001),
        ("max_tokens", "8"),
        ("max_completion_tokens", -1),
        ("top_logprobs", 21),
        ("logprobs", 1),
        ("stream", "true"),
        ("parallel_tool_calls", 0),
        ("user", 5),
        ("stop", 5),
        ("stop", ""),
        ("stop", ["a", 1]),
        ("stop", [f"s{i}" for i in range(17)]),
        ("logit_bias", [[1, 2]]),
        ("logit_bias", {"x": 1}),
        ("logit_bias", {"-1": 1}),
        ("logit_bias", {"1": 101}),
        ("logit_bias", {"1": True}),
        ("logit_bias", "a"),
        ("stream_options", "yes"),
        ("tools", {"type": "function"}),
        ("tool_choice", "sometimes"),
        ("tool_choice", 3),
        ("response_format", "json"),
    ],
)
def test_bad_values_name_the_param(field, value):
    e = err(
        {**BASE, "logprobs": True, field: value}
        if field == "top_logprobs"
        else {**BASE, field: value}
    )
    assert (e.status, e.type) == (400, "invalid_request_error")
    assert e.param == field, e
    assert e.message


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": MSGS}, "model"),
        ({"model": 7, "messages": MSGS}, "model"),
        ({"model": MODEL}, "messages"),
        ({**BASE, "messages": []}, "messages"),
        ({**BASE, "messages": "hi"}, "messages"),
        ({**BASE, "messages": ["hi"]}, "messages[0]"),
        ({**BASE, "messages": [*MSGS, {"content": "x"}]}, "messages[1].role"),
        ({**BASE, "messages": [{"role": 1, "content": "x"}]}, "messages[0].role"),
        (
            {**BASE, "stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
        ({**BASE, "stream_options": {"include_usage": True}}, "stream_options"),  # no stream
        ({**BASE, "stream": False, "stream_options": {}}, "stream_options"),
        ({**BASE, "top_logprobs": 3}, "top_logprobs"),  # needs logprobs: true
        ({**BASE, "tools": [{"type": "custom", "custom": {}}]}, "tools[0].type"),
        ({**BASE, "tools": [{"type": "function"}]}, "tools[0].function"),
        (
            {**BASE, "tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools[0].function.name",
        ),
        ({**BASE, "tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
        (
            {**BASE, "tools": [{"type": "function", "function": {"name": "f", "parameters": 1}}]},
            "tools[0].function.parameters",
        ),
        (  # OpenAI: the arguments of a call are an object
            {**BASE, "tools": [TOOLS[0], {"type": "function", "function": {
                "name": "g", "parameters": {"type": "string"}}}]},
            "tools[1].function.parameters",
        ),
        ({**BASE, "tool_choice": "required"}, "tool_choice"),
        ({**BASE, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        (
            {
                **BASE,
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
        ),
        ({**BASE, "tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice.function"),
        ({**BASE, "response_format": {"type": "xml"}}, "response_format.type"),
        ({**BASE, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {**BASE, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        (
            {**BASE, "response_format": {"type": "json_schema", "json_schema": {"schema": True}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_structural_errors_name_the_param(body, param):
    e = err(body)
    assert e.status == 400 and e.param == param, e


def test_range_messages_print_integer_bounds_in_full():
    assert "[0, 9223372036854775808)" in err({**BASE, "seed": 2**63}).message


def test_body_must_be_an_object():
    for body in ([], "x", None, 3):
        e = err(body)
        assert e.status == 400 and e.type == "invalid_request_error"


def test_other_model_is_404_model_not_found():
    e = err({**BASE, "model": "gpt-4o"})
    assert (e.status, e.code, e.type, e.param) == (
        404,
        "model_not_found",
        "invalid_request_error",
        "model",
    )
    assert "gpt-4o" in e.message


def test_logit_bias_vocab_limit():
    assert ok(logit_bias={"99": 1}).sampling.logit_bias == ((99, 1.0),)
    e = err({**BASE, "logit_bias": {"100": 1}}, vocab_limit=100)
    assert e.param == "logit_bias" and "100" in e.message


def test_tool_choice_defaults_and_forms():
    assert ok(tools=TOOLS).tool_choice == "auto"
    assert ok(tools=TOOLS).tools == tuple(TOOLS)
    assert ok(tools=[]).tools is None and ok(tools=[]).tool_choice == "none"
    assert ok(tool_choice="auto").tool_choice == "none"  # nothing to call without tools
    assert ok(tools=TOOLS, tool_choice="none").tool_choice == "none"
    assert ok(tools=TOOLS, tool_choice="required").tool_choice == "required"
    named = {"type": "function", "function": {"name": "get-time"}}
    assert ok(tools=TOOLS, tool_choice=named).tool_choice == named
    assert ok(tools=TOOLS, parallel_tool_calls=False).parallel_tool_calls is False


def test_response_format_forms():
    assert ok(response_format={"type": "text"}).response_format is None
    assert ok(response_format={"type": "json_object"}).response_format == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    rf = ok(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    assert rf.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "r", "schema": schema, "strict": False},
    }


def test_stop_forms():
    assert ok(stop="END").stop == ("END",)
    assert ok(stop=["a", "b"]).stop == ("a", "b")
    assert ok(stop=[]).stop == ()
    assert len(ok(stop=[f"s{i}" for i in range(16)]).stop) == 16


def test_sampler_errors_become_400(monkeypatch):
    from qwen_jax.sampler import SamplingParamError

    def reject(*a, **k):
        raise SamplingParamError("min_p", "min_p is not allowed here")

    monkeypatch.setattr(protocol, "validate_sampling_params", reject)
    e = err(BASE)
    assert (e.status, e.param) == (400, "min_p") and "min_p" in e.message


# ------------------------------------------------------------------------ error constructors

CONSTRUCTORS = [
    (protocol.invalid_request("bad", "x"), 400),
    (protocol.missing_parameter("model"), 400),
    (protocol.model_not_found("m"), 404),
    (protocol.malformed_json("Expecting value"), 400),
    (protocol.unsupported_media_type("text/plain"), 415),
    (protocol.unauthorized(provided=True), 401),
    (protocol.unauthorized(provided=False), 401),
    (protocol.path_not_found("GET", "/v2/x"), 404),
    (protocol.method_not_allowed("GET", "/v1/chat/completions", ("POST",)), 405),
    (protocol.payload_too_large(1024), 413),
    (protocol.queue_full(), 429),
    (protocol.server_error(), 500),
    (protocol.context_length_exceeded(9000, 8192), 400),
]


@pytest.mark.parametrize(
    "error,status", CONSTRUCTORS, ids=lambda x: getattr(x, "code", None) or str(x)
)
def test_error_constructors(error, status):
    assert isinstance(error, Exception) and error.status == status
    d = error.to_dict()
    assert ERROR_VALIDATOR.is_valid(d), d
    assert set(d["error"]) == {"message", "type", "param", "code"}
    assert d["error"]["message"]


# ------------------------------------------------------------------------ resolve_max_tokens


@given(st.one_of(st.none(), st.integers(0, 10**6)), st.integers(0, 5000), st.integers(1, 5000))
def test_resolve_max_tokens(requested, prompt, max_len):
    room = max_len - prompt
    if room <= 0:
        with pytest.raises(APIError) as e:
            resolve_max_tokens(requested, prompt, max_len)
        assert e.value.status == 400 and e.value.code == "context_length_exceeded"
        assert str(prompt) in e.value.message and str(max_len) in e.value.message
        return
    got = resolve_max_tokens(requested, prompt, max_len)
    assert 0 <= got <= room and prompt + got <= max_len
    assert got == (room if requested is None else min(requested, room))


# ------------------------------------------------------------------------ round trips

finite = dict(allow_nan=False, allow_infinity=False)
valid_fields = st.fixed_dictionaries(
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
        "logit_bias": st.dictionaries(
            st.integers(0, 151664).map(str), st.floats(-100, 100, **finite), max_size=3
        ),
        "n": st.integers(1, 4),
        "max_tokens": st.integers(0, 10**6),
        "stop": st.one_of(
            st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1), max_size=16)
        ),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 20),
        "user": st.text(max_size=8),
        "tools": st.just(TOOLS),
        "parallel_tool_calls": st.booleans(),
        "response_format": st.sampled_from(
            [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {}}}]
        ),
        "stop_token_ids": st.lists(st.integers(0, 151664), max_size=3, unique=True),
        "ignore_eos": st.booleans(),
        "min_tokens": st.integers(0, 100),
        "include_stop_str_in_output": st.booleans(),
        "add_generation_prompt": st.booleans(),
        "continue_final_message": st.booleans(),
    },
)


def consistent(fields: dict) -> dict:
    """valid_fields made valid together."""
    if fields.get("top_logprobs"):
        fields["logprobs"] = True
    if "stream_options" in fields:  # only valid on a stream
        fields["stream"] = True
    if fields.get("continue_final_message"):  # not with a generation prompt asked for
        fields.pop("add_generation_prompt", None)
    return fields


@given(valid_fields)
def test_valid_requests_round_trip(fields):
    r = ok(**consistent(fields))
    assert r.add_generation_prompt == (fields.get("add_generation_prompt", True)
                                       and not fields.get("continue_final_message", False))
    for name in ("temperature", "top_p", "top_k", "min_p", "seed"):
        if name in fields:
            assert getattr(r.sampling, name) == fields[name]
    for name in ("n", "max_tokens", "stream", "user", "top_logprobs"):
        if name in fields:
            assert getattr(r, name) == fields[name]
    if "logit_bias" in fields:
        assert dict(r.sampling.logit_bias) == {int(k): v for k, v in fields["logit_bias"].items()}
    if isinstance(fields.get("stop"), str):
        assert r.stop == (fields["stop"],)
    # The canonical body validates back to the same request.
    assert validate_chat_request(r.to_body(), served_model_name=MODEL) == r


@given(valid_fields, st.dictionaries(st.from_regex(r"x_[a-z_]{1,10}", fullmatch=True),
                                     st.none() | st.integers() | st.text(max_size=3),
                                     max_size=3))
def test_fields_that_validation_does_not_read_are_reported_as_ignored(fields, extra):
    """Every field a request may carry is read, whatever it is combined with; any other field
    (a typo, an unknown option) is reported for the server's log, not silently dropped."""
    fields = consistent(fields)
    assert ok(**fields).ignored_fields == ()
    assert ok(**fields, **extra).ignored_fields == tuple(sorted(extra))


def test_a_misspelt_option_and_unused_hints_are_reported_as_ignored():
    r = ok(max_token=3, store=True, metadata={"a": "b"}, temperature=0.5)
    assert r.ignored_fields == ("max_token", "metadata", "store")
    assert r.max_tokens is None and r.sampling.temperature == 0.5


# --------------------------------------------------------------- what JSON carries but text can't

# A request with strings in many places: messages, a tool, stop, a schema (and their keys).
RICH = {
    **BASE,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
    ],
    "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
    "stop": ["END", "\n\n"],
    "user": "someone",
}


def _string_paths(value, path=""):
    """(path, container, key) of every string value and every dict key in a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else k
            yield sub, value, ("key", k)
            if isinstance(v, str):
                yield sub, value, ("value", k)
            else:
                yield from _string_paths(v, sub)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, str):
                yield f"{path}[{i}]", value, ("value", i)
            else:
                yield from _string_paths(v, f"{path}[{i}]")


def _depth(value) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(
        value, list) else ()
    return 1 + max(map(_depth, children), default=0) if isinstance(value, (dict, list)) else 0


def test_rich_request_is_valid():
    assert ok(**{k: v for k, v in RICH.items() if k not in BASE}).stop == ("END", "\n\n")


@given(data=st.data(), surrogate=st.integers(0xD800, 0xDFFF).map(chr))
def test_a_lone_surrogate_anywhere_is_a_400_naming_its_place(data, surrogate):
    body = copy.deepcopy(RICH)
    paths = list(_string_paths(body))
    path, container, (kind, key) = data.draw(st.sampled_from(paths))
    if kind == "value":
        text = container[key]
        at = data.draw(st.integers(0, len(text)))
        container[key] = text[:at] + surrogate + text[at:]
        expected = path
    else:
        container[key + surrogate] = container.pop(key)
        expected = path + f"\\u{ord(surrogate):04x}"
    e = err(body)
    assert e.status == 400 and e.param == expected
    # The error itself must be writable as UTF-8 JSON (the server sends it).
    json.dumps(e.to_dict(), ensure_ascii=False).encode("utf-8")


def test_surrogate_pairs_are_characters_not_errors():
    pair = json.loads('"\\ud83d\\ude00"')  # JSON's escape of one character outside the BMP
    body = {**BASE, "messages": [{"role": "user", "content": pair}]}
    assert validate_chat_request(body, served_model_name=MODEL).messages[0]["content"] == "😀"


@pytest.mark.parametrize("field", ["tools", "response_format", "messages"])
def test_nesting_depth_limit(field):
    def nested(levels):
        s = {"type": "integer"}
        for _ in range(levels):
            s = {"type": "array", "items": s}
        return s

    def body(levels):
        if field == "tools":
            return {**BASE, "tools": [{"type": "function", "function": {
                "name": "f", "parameters": {"type": "object", "properties": {
                    "a": nested(levels)}}}}]}
        if field == "response_format":
            return {**BASE, "response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": nested(levels)}}}
        return {**BASE, "messages": [{"role": "user", "content": "hi", "extra": nested(levels)}]}

    levels = next(n for n in range(200) if _depth(body(n)) > protocol.MAX_JSON_DEPTH)
    assert _depth(body(levels - 1)) == protocol.MAX_JSON_DEPTH
    validate_chat_request(body(levels - 1), served_model_name=MODEL)  # at the limit: accepted
    e = err(body(levels))
    assert e.status == 400 and e.param == field and str(protocol.MAX_JSON_DEPTH) in e.message
