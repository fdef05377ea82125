"""Constrained decoding: whatever tokens a (random) model picks inside the mask, the output parses.

The "model" here is a random number generator choosing uniformly among the allowed tokens: the
worst case for termination, and what random demo weights look like to the grammar.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_jax.constrained import (
    ConstraintError,
    grammar_for,
    make_constraint,
    make_constraints,
)
from qwen_jax.engine import RequestError
from qwen_jax.protocol import StructuredOutput

MAX_STEPS = 400


@pytest.fixture(scope="module")
def ll_tok(qwen_tokenizer):
    from qwen_jax.constrained import build_ll_tokenizer

    return build_ll_tokenizer(qwen_tokenizer)


def run_random(constraint, tokenizer, seed: int, max_steps: int = MAX_STEPS):
    """Sample uniformly among allowed ids until EOS; returns (text, ended_with_eos)."""
    rng = np.random.default_rng(seed)
    eos = set(tokenizer.eos_token_ids)
    out = []
    for _ in range(max_steps):
        allowed = constraint.allowed_tokens()
        assert allowed.dtype == bool and allowed.shape == (tokenizer.vocab_size,)
        ids = np.flatnonzero(allowed)
        assert ids.size > 0, "the grammar allowed nothing"
        token = int(rng.choice(ids))
        constraint.advance(token)
        if token in eos:
            return tokenizer.decode(out), True
        out.append(token)
    return tokenizer.decode(out), False


def outside_strings(text: str) -> str:
    """The characters of a JSON text that are not inside string literals."""
    out, in_str, esc = [], False, False
    for c in text:
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        else:
            out.append(c)
    return "".join(out)


def assert_compact(text: str) -> None:
    # Only the ", " and ": " separators may carry whitespace: no free whitespace anywhere.
    rest = outside_strings(text).replace(", ", ",").replace(": ", ":")
    assert not re.search(r"\s", rest), text


# Bounded JSON schemas: every string, number and array has a limit, so generation must end.
leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 1000)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 12)),
    st.lists(st.text("abcxyz", min_size=1, max_size=5), min_size=1, max_size=4, unique=True)
    .map(lambda xs: {"enum": xs}),
    st.just({"type": "null"}),
)


def _object(children):
    return st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), children,
                           min_size=1, max_size=3).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props))).map(
            lambda req: {"type": "object", "properties": props, "required": sorted(req),
                         "additionalProperties": False}))


schemas = st.recursive(
    leaf,
    lambda children: st.one_of(
        _object(children),
        st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n},
                  children, st.integers(0, 3)),
    ),
    max_leaves=6,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=_object(schemas), seed=st.integers(0, 2**31 - 1))
def test_json_schema_output_always_validates(ll_tok, qwen_tokenizer, schema, seed):
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    text, ended = run_random(make_constraint(ll_tok, grammar), qwen_tokenizer, seed)
    assert ended, f"no EOS within {MAX_STEPS} tokens: {text!r}"
    jsonschema.validate(json.loads(text), schema)
    assert_compact(text)


def test_eos_allowed_exactly_when_the_grammar_may_end(ll_tok, qwen_tokenizer):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    c = make_constraint(ll_tok, grammar_for({"type": "json_schema",
                                             "json_schema": {"schema": schema}}))
    eos = list(qwen_tokenizer.eos_token_ids)
    for token in qwen_tokenizer.encode('{"ok": true'):
        assert not c.allowed_tokens()[eos].any()
        assert not c.is_finished()
        c.advance(token)
    closing = qwen_tokenizer.encode("}")
    c.advance(closing[0])
    mask = c.allowed_tokens()
    assert mask[eos].all() and mask.sum() == len(eos)  # complete: only EOS may follow
    assert c.is_finished()


def test_rejected_token_raises(ll_tok, qwen_tokenizer):
    c = make_constraint(ll_tok, grammar_for({"type": "json_object"}))
    bad = qwen_tokenizer.encode("hello")[0]
    assert not c.allowed_tokens()[bad]
    with pytest.raises(ConstraintError):
        c.advance(bad)


@pytest.mark.parametrize("seed", range(4))
def test_json_object_mode_is_an_object_or_cut(ll_tok, qwen_tokenizer, seed):
    # "Any object" has unbounded strings, so a random walk may not end within the budget; what
    # it wrote must still be a prefix of an object. When it ends, it parses.
    c = make_constraint(ll_tok, grammar_for({"type": "json_object"}))
    text, ended = run_random(c, qwen_tokenizer, seed, max_steps=150)
    assert text.startswith("{")
    if ended:
        assert isinstance(json.loads(text), dict)
        assert_compact(text)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                           "y": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["x", "y"],
            "additionalProperties": False,
        },
    },
}
NO_PARAMS = {"type": "function", "function": {"name": "ping"}}
TOOLS = [WEATHER, ADD, NO_PARAMS]
CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.S)


def parse_calls(text: str) -> list[dict]:
    """Independent parse of the Qwen format: nothing but `<tool_call>` blocks joined by newlines."""
    calls = [json.loads(m) for m in CALL.findall(text)]
    assert calls and set(CALL.sub("", text)) <= {"\n"}, text  # blocks joined by newlines only
    return calls


def check_call(call: dict) -> None:
    tool = {t["function"]["name"]: t for t in TOOLS}[call["name"]]
    params = tool["function"].get("parameters", {"type": "object", "properties": {},
                                                 "additionalProperties": False})
    assert set(call) == {"name", "arguments"}
    jsonschema.validate(call["arguments"], params)


@pytest.mark.parametrize("seed", range(6))
def test_required_tool_choice_always_yields_valid_calls(ll_tok, qwen_tokenizer, seed):
    grammar = grammar_for(None, TOOLS, "required", parallel_tool_calls=True)
    text, ended = run_random(make_constraint(ll_tok, grammar), qwen_tokenizer, seed)
    assert ended, text
    assert text.startswith("<tool_call>\n{")
    calls = parse_calls(text)
    assert len(calls) >= 1
    for call in calls:
        check_call(call)


@pytest.mark.parametrize("seed", range(4))
def test_named_tool_choice_calls_exactly_that_function(ll_tok, qwen_tokenizer, seed):
    choice = {"type": "function", "function": {"name": "add"}}
    grammar = grammar_for({"type": "json_object"}, TOOLS, choice, parallel_tool_calls=True)
    text, ended = run_random(make_constraint(ll_tok, grammar), qwen_tokenizer, seed)
    assert ended, text
    calls = parse_calls(text)
    assert [c["name"] for c in calls] == ["add"]
    check_call(calls[0])


def test_required_without_parallel_makes_one_call(ll_tok, qwen_tokenizer):
    grammar = grammar_for(None, [NO_PARAMS], "required", parallel_tool_calls=False)
    c = make_constraint(ll_tok, grammar)
    text, ended = run_random(c, qwen_tokenizer, seed=1)
    assert ended
    assert text == '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'


# As pydantic writes parameters: definitions under $defs, referred to from the root.
PICK = {"type": "function", "function": {"name": "pick", "parameters": {
    "$defs": {"Color": {"type": "string", "enum": ["red", "blue"]},
              "Box": {"type": "object", "properties": {"color": {"$ref": "#/$defs/Color"}},
                      "required": ["color"], "additionalProperties": False}},
    "type": "object", "properties": {"box": {"$ref": "#/$defs/Box"}},
    "required": ["box"], "additionalProperties": False}}}
# A recursive schema: "#" is the parameters themselves.
TREE = {"type": "function", "function": {"name": "tree", "parameters": {
    "type": "object", "properties": {"leaf": {"type": "boolean"}, "child": {"$ref": "#"}},
    "required": ["leaf"], "additionalProperties": False}}}


@pytest.mark.parametrize("seed", range(4))
def test_forced_calls_resolve_refs_against_the_tools_own_parameters(ll_tok, qwen_tokenizer,
                                                                    seed):
    """`$ref`s in parameters point into the parameters (not into a schema wrapped around
    them): with `tool_choice` required every call validates against the user's schema."""
    tools = [PICK, TREE]
    text, ended = run_random(make_constraint(ll_tok, grammar_for(None, tools, "required")),
                             qwen_tokenizer, seed)
    assert ended, text
    for call in parse_calls(text):
        params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        assert set(call) == {"name", "arguments"}
        jsonschema.validate(call["arguments"], params[call["name"]])
        if call["name"] == "tree":  # the recursion is the tree's, not a nested call object
            node = call["arguments"]
            while "child" in node:
                assert set(node) <= {"leaf", "child"}
                node = node["child"]


@pytest.mark.parametrize("literal", ["<tool_call>", "</tool_call>", "<|im_end|>",
                                     "<|endoftext|>", "a<|fim_prefix|>b"])
def test_schema_text_spelled_like_a_special_token_is_written_as_text(ll_tok, qwen_tokenizer,
                                                                     literal):
    """A `const` spelled like an added token: llguidance offers that token alone (and then
    rejects it, wanting the text); the constraint offers the text's plain tokens instead, in
    a response format and in a forced call's arguments alike."""
    value = {"type": "object", "properties": {"s": {"const": literal}}, "required": ["s"],
             "additionalProperties": False}
    fmt = make_constraint(ll_tok, grammar_for(_schema_format(value)))
    tool = {"type": "function", "function": {"name": "f", "parameters": value}}
    call = make_constraint(ll_tok, grammar_for(None, [tool], "required", False), "tools")
    for constraint, seed in [(fmt, 0), (call, 1)]:
        text, ended = run_random(constraint, qwen_tokenizer, seed)
        assert ended, text
        if constraint is call:
            (found,) = parse_calls(text)
            assert found == {"name": "f", "arguments": {"s": literal}}
        else:
            assert json.loads(text) == {"s": literal}


def test_vllm_structured_outputs_match_their_regex_choice_or_schema(ll_tok, qwen_tokenizer):
    """guided_regex / guided_choice / guided_json: every random walk through the grammar ends
    (EOS) with text that matches; over the seeds every choice comes up, one spelled like a
    special token too."""
    regex = StructuredOutput("regex", r"[a-c]{2,5}-(x|yz)\.[0-9]")
    choices = ("yes", "no way", 'q"uo\\te', "<tool_call>")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    picked = set()
    for seed in range(24):
        text, ended = run_random(make_constraint(ll_tok, grammar_for(structured=regex)),
                                 qwen_tokenizer, seed)
        assert ended and re.fullmatch(regex.value, text), text
        choice = StructuredOutput("choice", choices)
        text, ended = run_random(make_constraint(ll_tok, grammar_for(structured=choice)),
                                 qwen_tokenizer, seed)
        assert ended and text in choices, text
        picked.add(text)
    assert picked == set(choices)
    text, ended = run_random(
        make_constraint(ll_tok, grammar_for(structured=StructuredOutput("json", schema))),
        qwen_tokenizer, 0)
    assert ended and set(json.loads(text)) == {"n"}


def test_a_choice_forced_to_the_spelling_of_a_special_token_is_written_as_text(ll_tok,
                                                                              qwen_tokenizer):
    """One choice: its text is forced from the first token, where llguidance offers the added
    token of that spelling alone (with several choices nothing is forced at first)."""
    for literal in ("<|im_end|>", "<tool_call>"):
        choice = StructuredOutput("choice", (literal,))
        text, ended = run_random(make_constraint(ll_tok, grammar_for(structured=choice)),
                                 qwen_tokenizer, 0)
        assert ended and text == literal


def test_a_regex_past_the_lexers_limits_names_the_field(ll_tok):
    """Accepted when compiled, it fails at the first token: the request's fault (a 400), not
    the engine's (it was a 500)."""
    regex = StructuredOutput("regex", "((a{1000}){1000}){1000}", "guided_regex")
    constraint = make_constraint(ll_tok, grammar_for(structured=regex), regex.param)
    with pytest.raises(RequestError, match="limits") as e:
        for _ in range(5):
            constraint.advance(int(np.flatnonzero(constraint.allowed_tokens())[0]))
    assert e.value.param == "guided_regex"


@pytest.mark.parametrize("pattern, why", [("(?=a)b", "look-around"), ("a{5,2}", "repetition"),
                                          ("(", "unclosed")])
def test_a_regex_llguidance_cannot_take_is_a_clear_error(pattern, why):
    with pytest.raises(ConstraintError, match=why) as e:
        grammar_for(structured=StructuredOutput("regex", pattern, "guided_regex"))
    assert e.value.param == "guided_regex"


def test_tool_call_tags_are_single_tokens(ll_tok, qwen_tokenizer):
    # The grammar asks for the model's own <tool_call> token, not the text spelled out.
    c = make_constraint(ll_tok, grammar_for(None, [WEATHER], "required"))
    assert np.flatnonzero(c.allowed_tokens()).tolist() == [
        qwen_tokenizer.token_to_id("<tool_call>")]


def test_unconstrained_requests_have_no_grammar():
    assert grammar_for(None) is None
    assert grammar_for({"type": "text"}) is None
    assert grammar_for(None, TOOLS, "auto") is None
    assert grammar_for(None, TOOLS, "none") is None


def test_bad_schema_is_a_clear_error(ll_tok):
    with pytest.raises(ConstraintError) as e:
        grammar = grammar_for({"type": "json_schema", "json_schema": {"schema": {
            "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}})
        make_constraint(ll_tok, grammar)
    assert e.value.param and e.value.param.startswith("response_format")
    with pytest.raises(ConstraintError, match="schema"):
        grammar_for({"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(ConstraintError, match="unknown function"):
        grammar_for(None, TOOLS, {"type": "function", "function": {"name": "nope"}})


# Valid schemas without a finite value: the grammar runs into a point where nothing may follow.
SELF_REF = {"$ref": "#"}
REF_CYCLE = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
             "$ref": "#/$defs/a"}
LATE_DEAD_END = {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}},
                 "required": ["a"]}


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize("schema", [SELF_REF, REF_CYCLE], ids=["self", "cycle"])
def test_a_schema_with_no_first_token_is_refused_before_generating(ll_tok, schema):
    with pytest.raises(ConstraintError, match="admits no value") as e:
        make_constraints(ll_tok, grammar_for(_schema_format(schema)), 2)
    assert e.value.param == "response_format"


def test_a_schema_that_dead_ends_later_names_the_field_while_generating(ll_tok, qwen_tokenizer):
    """`{"a": ` and then nothing can follow: found only on the way (it was a 500, the
    engine's own failure), reported as the request's fault with the field to name."""
    constraint = make_constraint(ll_tok, grammar_for(_schema_format(LATE_DEAD_END)))
    text = ""
    with pytest.raises(ConstraintError, match="admits no value") as e:
        for _ in range(20):
            token = int(np.flatnonzero(constraint.allowed_tokens())[0])
            text += qwen_tokenizer.decode([token])
            constraint.advance(token)
    assert e.value.param == "response_format" and isinstance(e.value, RequestError)
    assert text.replace(" ", "") == '{"a":'


def test_a_schema_whose_forced_text_never_ends_names_the_field(ll_tok):
    """A required property that is the whole schema again: `{"a": {"a": ...` is forced
    forever, and llguidance gives up past its limit when the first token comes (it was a 500)."""
    schema = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    constraint = make_constraint(ll_tok, grammar_for(_schema_format(schema)))
    with pytest.raises(RequestError, match="admits no value") as e:
        for _ in range(20):
            constraint.advance(int(np.flatnonzero(constraint.allowed_tokens())[0]))
    assert e.value.param == "response_format"


def test_a_regexs_digit_and_word_classes_are_ascii(ll_tok, qwen_tokenizer):
    """\\d and \\w are ASCII, as in JSON Schema and JavaScript (Rust's are Unicode: "\\d{5}"
    wrote Arabic-Indic digits); a "/" in the pattern is taken as it is."""
    regex = StructuredOutput("regex", r"\d{2}/\w", "guided_regex")
    constraint = make_constraint(ll_tok, grammar_for(structured=regex), regex.param)
    first = [qwen_tokenizer.decode([int(i)]) for i in np.flatnonzero(constraint.allowed_tokens())]
    assert first and all(re.fullmatch(r"[0-9]{1,2}(/[0-9a-zA-Z_]?)?", t) for t in first), first
    for seed in range(8):
        constraint = make_constraint(ll_tok, grammar_for(structured=regex), regex.param)
        text, ended = run_random(constraint, qwen_tokenizer, seed)
        assert ended and re.fullmatch(r"[0-9]{2}/[0-9a-zA-Z_]", text), text


def _walk(constraint, tokenizer, text: str) -> None:
    """Feed `text`'s tokens, each one inside the mask (and consumed) first."""
    for token in tokenizer.encode(text):
        assert constraint.allowed_tokens()[token], (text, token)
        constraint.advance(token)


def test_thousands_of_choices_and_a_form_of_hundreds_of_fields_are_followed(ll_tok,
                                                                           qwen_tokenizer):
    """2,001 choices, and an object of 600 optional properties, passed llguidance's default
    2,000 items in a parser row: their masks allowed a key or a choice that the parser then
    refused (a 500). Now choices are one lexer terminal, and a row may hold more items: any
    choice is written and ends, and the last property is written."""
    # 45,000 choices: as parser alternatives (before) too many even for the raised row limit.
    choices = tuple(f"option number {i}" for i in range(45_000))
    constraint = make_constraint(
        ll_tok, grammar_for(structured=StructuredOutput("choice", choices, "guided_choice")),
        "guided_choice")
    _walk(constraint, qwen_tokenizer, "option number 44999")
    assert constraint.is_finished() or constraint.allowed_tokens()[qwen_tokenizer.eos_token_ids[0]]
    form = {"type": "object", "properties": {f"p{i}": {"type": "boolean"} for i in range(600)},
            "additionalProperties": False}
    constraint = make_constraint(ll_tok, grammar_for(_schema_format(form)))
    _walk(constraint, qwen_tokenizer, '{"p0": false, "p599": true}')  # in schema order


def test_a_grammar_past_the_parsers_row_limit_names_the_field(ll_tok, qwen_tokenizer,
                                                              monkeypatch):
    """Past the row limit (lowered here) the parser refuses a token its mask allowed: the
    request's grammar is too large, a 400 naming the field, not the engine's failure."""
    import llguidance

    from qwen_jax import constrained

    monkeypatch.setattr(constrained, "PARSER_LIMITS",
                        llguidance.LLParserLimits(max_items_in_row=50))
    form = {"type": "object", "properties": {f"p{i}": {"type": "boolean"} for i in range(60)},
            "additionalProperties": False}
    constraint = make_constraint(ll_tok, grammar_for(_schema_format(form)))
    with pytest.raises(RequestError, match="limits") as e:
        _walk(constraint, qwen_tokenizer, '{"p59": true}')
    assert e.value.param == "response_format"


def test_choices_get_independent_constraints(ll_tok, qwen_tokenizer):
    cs = make_constraints(ll_tok, grammar_for({"type": "json_object"}), 3)
    assert len(cs) == 3 and len({id(c) for c in cs}) == 3
    cs[0].advance(qwen_tokenizer.encode("{")[0])
    # Advancing one choice leaves the others at the start (only "{" allowed first).
    assert cs[1].allowed_tokens().sum() != cs[0].allowed_tokens().sum()
    assert make_constraints(ll_tok, None, 3) is None
