"""spec/openapi.yaml and the request validator cannot drift: every range, default and enum agrees.

The spec's numbers are compared with `protocol.REQUEST_RANGES` (which holds the sampler's
`SAMPLING_RANGES`), then both are probed at each bound and just outside it, and a Hypothesis
property checks that the spec's JSON Schema and `validate_chat_request` accept the same bodies.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from qwen_jax import protocol, sampler
from qwen_jax.protocol import APIError, validate_chat_request

SPEC_PATH = Path(__file__).resolve().parent.parent / "spec" / "openapi.yaml"
SPEC = yaml.safe_load(SPEC_PATH.read_text())
SCHEMAS = SPEC["components"]["schemas"]
REQUEST = SCHEMAS["ChatCompletionRequest"]["properties"]
MODEL = "test-model"
BASE = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def spec_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", **SPEC})


REQUEST_VALIDATOR = spec_validator("ChatCompletionRequest")


def spec_accepts(body: dict) -> bool:
    return REQUEST_VALIDATOR.is_valid(body)


def validator_accepts(body: dict) -> bool:
    try:
        validate_chat_request(body, served_model_name=MODEL)
    except APIError as e:
        assert e.status == 400 and e.param, e
        return False
    return True


def numeric_schema(name: str) -> dict:
    s = REQUEST[name]
    return s["additionalProperties"] if name == "logit_bias" else s


def spec_range(name: str) -> tuple[float, float, bool, bool]:
    s = numeric_schema(name)
    low, low_inc = (s["minimum"], True) if "minimum" in s else (s["exclusiveMinimum"], False)
    high, high_inc = (s["maximum"], True) if "maximum" in s else (s["exclusiveMaximum"], False)
    return low, high, low_inc, high_inc


def spec_is_integer(name: str) -> bool:
    t = numeric_schema(name)["type"]
    return "integer" in (t if isinstance(t, list) else [t])


RANGED = sorted(
    name
    for name in REQUEST
    if any(k in numeric_schema(name) for k in ("minimum", "maximum", "exclusiveMinimum"))
)


def body_with(name: str, value) -> dict:
    if name == "logit_bias":
        return {**BASE, "logit_bias": {"0": value}}
    if name == "top_logprobs":
        return {**BASE, "logprobs": True, "top_logprobs": value}
    return {**BASE, name: value}


# --------------------------------------------------------------------------- the spec itself


def test_spec_is_valid_openapi_31_and_self_contained():
    assert SPEC["openapi"].startswith("3.1")
    assert {"/v1/chat/completions", "/v1/models", "/health"} <= set(SPEC["paths"])
    post = SPEC["paths"]["/v1/chat/completions"]["post"]
    assert {"application/json", "text/event-stream"} <= set(post["responses"]["200"]["content"])
    text = SPEC_PATH.read_text()
    refs = re.findall(r"\$ref: '([^']*)'", text)
    assert refs and all(r.startswith("#/components/") for r in refs)  # nothing outside the file
    for ref in refs:
        node = SPEC
        for part in ref[2:].split("/"):
            node = node[part]  # every reference resolves
    for schema in SCHEMAS.values():
        Draft202012Validator.check_schema(schema)


def test_every_numeric_range_equals_the_validator_table():
    spec_ranges = {name: spec_range(name) for name in RANGED}
    assert set(spec_ranges) == set(protocol.REQUEST_RANGES)
    for name, rng in spec_ranges.items():
        assert tuple(protocol.REQUEST_RANGES[name]) == rng, name
    integer_fields = {n for n in RANGED if spec_is_integer(n)}
    assert integer_fields == set(protocol.INTEGER_FIELDS)


def outside_and_inside(name: str):
    """(value, should_be_accepted) at each bound, just inside an open bound and just outside."""
    low, high, low_inc, high_inc = protocol.REQUEST_RANGES[name]
    if spec_is_integer(name):
        yield low, low_inc
        yield high, high_inc
        yield low - 1, False
        yield high + 1, False
        yield low + 1, True
        yield high - 1, True
    else:
        yield float(low), low_inc
        yield float(high), high_inc
        yield math.nextafter(float(low), -math.inf), False
        yield math.nextafter(float(high), math.inf), False
        yield math.nextafter(float(low), math.inf), True
        yield math.nextafter(float(high), -math.inf), True


@pytest.mark.parametrize("name", RANGED)
def test_validator_and_spec_agree_at_the_bounds(name):
    for value, accepted in outside_and_inside(name):
        body = body_with(name, value)
        assert validator_accepts(body) is accepted, (name, value)
        assert spec_accepts(body) is accepted, (name, value)
        if not accepted:
            with pytest.raises(APIError) as e:
                validate_chat_request(body, served_model_name=MODEL)
            assert e.value.param == name and e.value.type == "invalid_request_error"


def test_defaults_equal_the_validators_defaults():
    req = validate_chat_request(BASE, served_model_name=MODEL)
    s = req.sampling
    actual = {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "top_k": s.top_k,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "repetition_penalty": s.repetition_penalty,
        "n": req.n,
        "stream": req.stream,
        "logprobs": req.logprobs,
        "parallel_tool_calls": req.parallel_tool_calls,
    }
    spec_defaults = {k: v["default"] for k, v in REQUEST.items() if "default" in v}
    assert set(spec_defaults) == set(actual)
    for k, v in spec_defaults.items():
        assert actual[k] == v and type(actual[k]) in (type(v), float), k
    assert SCHEMAS["StreamOptions"]["properties"]["include_usage"]["default"] is req.include_usage


def test_enums_and_list_limits_agree():
    tc_enum = REQUEST["tool_choice"]["oneOf"][1]["enum"]
    assert tuple(tc_enum) == protocol.TOOL_CHOICE_MODES
    rf_types = [
        SCHEMAS[ref["$ref"].rsplit("/", 1)[1]]["properties"]["type"]["enum"][0]
        for ref in REQUEST["response_format"]["oneOf"][1:]
    ]
    assert tuple(rf_types) == protocol.RESPONSE_FORMAT_TYPES
    assert REQUEST["logit_bias"]["maxProperties"] == sampler.MAX_LOGIT_BIAS
    for k, ok in [(sampler.MAX_LOGIT_BIAS, True), (sampler.MAX_LOGIT_BIAS + 1, False)]:
        body = {**BASE, "logit_bias": {str(i): 1 for i in range(k)}}
        assert validator_accepts(body) is ok and spec_accepts(body) is ok
    stop_max = REQUEST["stop"]["oneOf"][2]["maxItems"]
    assert stop_max == protocol.MAX_STOP_STRINGS
    for k, ok in [(stop_max, True), (stop_max + 1, False)]:
        body = {**BASE, "stop": [f"s{i}" for i in range(k)]}
        assert validator_accepts(body) is ok and spec_accepts(body) is ok
    tools = [{"type": "function", "function": {"name": "f"}}]
    for mode in tc_enum:
        assert validator_accepts({**BASE, "tools": tools, "tool_choice": mode})
    assert not validator_accepts({**BASE, "tools": tools, "tool_choice": "sometimes"})
    assert not spec_accepts({**BASE, "tools": tools, "tool_choice": "sometimes"})
    for kind in rf_types:
        rf = {"type": kind}
        if kind == "json_schema":
            rf["json_schema"] = {"name": "x", "schema": {"type": "object"}}
        assert validator_accepts({**BASE, "response_format": rf}) and spec_accepts(
            {**BASE, "response_format": rf}
        )
    bad = {**BASE, "response_format": {"type": "xml"}}
    assert not validator_accepts(bad) and not spec_accepts(bad)


# JSON values of every kind, including each field's bounds, for the agreement property below.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.sampled_from([0, 1, 2, 4, 5, 20, 21, 999, 1000, 1_000_000, 2**63 - 1, 2**63, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 0.01, 0.5, 1.0, 1.5, 2.0, -2.0, 2.5, 5.0, 100.0, -100.5]),
    st.text(max_size=5),
)
json_values = st.one_of(
    json_scalars,
    st.lists(st.one_of(st.text(max_size=4), st.integers(0, 3)), max_size=18),
    st.dictionaries(
        st.one_of(st.sampled_from(["0", "17", "01", "x", "include_usage"])),
        json_scalars,
        max_size=3,
    ),
)
# Fields whose every rule the JSON Schema expresses (cross-field rules are tested elsewhere).
SCHEMA_FIELDS = sorted(
    set(REQUEST) - {"model", "messages", "tools", "tool_choice", "response_format", "top_logprobs",
                    # one at most, and a schema may come as JSON text
                    "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                    # not with add_generation_prompt true
                    "continue_final_message"}
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(SCHEMA_FIELDS), json_values, max_size=4))
def test_spec_and_validator_accept_the_same_bodies(fields):
    body = {**BASE, **fields}
    assert spec_accepts(body) == validator_accepts(body), body


def test_seed_document_ranges_and_defaults_are_in_the_spec(shared_reference):
    """Every `Range:` and `Default value:` line of the seed document holds in the spec."""
    doc = (shared_reference / "deepinfra-qwen2.5-7b-instruct-api.txt").read_text()
    rel = {"≤": True, "<": False}
    ranges = re.findall(r"Range: (-?[\d.]+) (≤|<) (\w+) (≤|<) (-?[\d.]+)", doc)
    assert len(ranges) >= 10
    for low, low_rel, name, high_rel, high in ranges:
        doc_low, doc_high = float(low), float(high)
        s_low, s_high, s_low_inc, s_high_inc = spec_range(name)
        if spec_is_integer(name):
            # Compare as inclusive integer bounds: 0 <= k < 1000 is 0 <= k <= 999. The document
            # prints 2**63 as 9223372036854776000 (a rounded double), hence the float round trip.
            as_int = lambda v, inc, step: int(v) if inc else int(v) + step  # noqa: E731
            doc_low = -1 if name == "top_k" else doc_low  # the extension: -1 is off, as in vLLM
            assert as_int(doc_low, rel[low_rel], 1) == as_int(s_low, s_low_inc, 1), name
            assert as_int(doc_high, rel[high_rel], -1) == as_int(s_high, s_high_inc, -1), name
        else:
            assert (doc_low, doc_high, rel[low_rel], rel[high_rel]) == (
                s_low,
                s_high,
                s_low_inc,
                s_high_inc,
            ), name
    fields = doc.split("Input fields", 1)[1].split("Input Schema", 1)[0].strip().split("\n\n\n")
    defaults = {}
    for block in fields:
        head = re.match(r"(\w+?)(number|integer|boolean|string|array|object)\n", block)
        default = re.search(r"Default value: (\S+)", block)
        assert head, block
        if default:
            defaults[head.group(1)] = default.group(1)
    assert len(defaults) >= 9
    for name, value in defaults.items():
        expected = {"false": False, "true": True}.get(value)
        expected = float(value) if expected is None else expected
        assert REQUEST[name]["default"] == expected, name


def test_bad_request_description_states_the_nesting_limit():
    text = SPEC["components"]["responses"]["BadRequest"]["description"]
    assert f"deeper than {protocol.MAX_JSON_DEPTH} levels" in text
    assert "lone UTF-16 surrogate" in text
