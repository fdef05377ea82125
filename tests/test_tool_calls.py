"""Tool calls: the per-block rule, streaming = non-streaming for any split, render -> parse,
and the markup splitter that keeps stop strings out of calls."""

from __future__ import annotations

import itertools
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_jax.chat_template import render_chat
from qwen_jax.tool_calls import (
    END,
    START,
    MarkupSplitter,
    ParsedOutput,
    StreamingToolCallParser,
    parse_tool_calls,
)

WEATHER = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]


def counter_ids():
    numbers = itertools.count()
    return lambda: f"call_{next(numbers)}"


def call(name, arguments, call_id):
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def parse(text, tools=None, max_calls=None):
    return parse_tool_calls(text, tools, max_calls=max_calls, id_factory=counter_ids())


# -- the per-block rule, on examples ------------------------------------------------------------


def test_text_then_calls():
    text = (
        "Let me check.\n\n"
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "weather", "arguments": {"city": "北京", "n": [1, {"a": null}]}}'
        "\n</tool_call>"
    )
    assert parse(text, WEATHER) == ParsedOutput(
        "Let me check.",
        [
            call("weather", {"city": "Paris"}, "call_0"),
            call("weather", {"city": "北京", "n": [1, {"a": None}]}, "call_1"),
        ],
    )


def test_only_calls_gives_null_content():
    out = parse('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n')
    assert out.content is None and [c["function"]["name"] for c in out.tool_calls] == ["f"]
    assert out.tool_calls[0]["function"]["arguments"] == "{}"
    assert out.tool_calls[0]["type"] == "function"


def test_plain_text_is_content():
    assert parse("Hello, world.\n") == ParsedOutput("Hello, world.\n", [])
    assert parse("") == ParsedOutput("", [])


def test_default_ids_look_like_openai_ids():
    out = parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}</tool_call>' * 2)
    ids = [c["id"] for c in out.tool_calls]
    assert all(i.startswith("call_") and len(i) > 10 for i in ids) and ids[0] != ids[1]


def test_malformed_calls_come_back_as_content():
    """Never raises: a closed block that is not a valid call is returned verbatim as content."""
    bad_blocks = [
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}\n</tool_call>',  # JSON
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "weather", "arguments": "Paris"}\n</tool_call>',  # not an object
        '<tool_call>\n{"name": "weather", "arguments": {"x": NaN}}\n</tool_call>',  # not JSON
        '<tool_call>\n["weather"]\n</tool_call>',
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',  # unknown with tools
        '<tool_call>\n{"name": "weather", "arguments": {"ci</tool_call>',  # closed, cut JSON
    ]
    for block in bad_blocks:
        assert parse(block, WEATHER) == ParsedOutput(block, []), block
        assert parse("Sure: " + block, WEATHER) == ParsedOutput("Sure: " + block, [])


def test_a_block_cut_off_is_dropped_not_content():
    """Generation ended inside a block (max_tokens): no markup reaches content, and the
    whitespace touching the dropped block goes as it would at a call."""
    good = '<tool_call>\n{"name": "weather", "arguments": {}}\n</tool_call>'
    cuts = ['<tool_call>\n{"name": "weather", "arguments": {"ci', "<tool_call>", "<tool_call>\n{"]
    for cut in cuts:
        assert parse(cut, WEATHER) == ParsedOutput("", [])
        assert parse("Sure: \n" + cut, WEATHER) == ParsedOutput("Sure:", [])
        out = parse(f"A {good}\n{cut}", WEATHER)
        assert out == ParsedOutput("A", [call("weather", {}, "call_0")])
        streamed, deltas = run_stream(["Sure: \n" + cut[:4], cut[4:]], WEATHER)
        assert streamed == ParsedOutput("Sure:", []) and START not in json.dumps(deltas)


def test_arguments_are_the_models_text_and_stay_json():
    """A number too large for a float is kept as written: re-encoding the parsed value would
    give `Infinity`, which is not JSON; escapes, number forms and key order stay too."""
    args = '{"price": 3488857E189222, "tiny": 1e-400, "x": 1.50, "s": "\\u00e9\\n", "n": -0}'
    text = f'<tool_call>\n{{"name": "f", "arguments": {args}}}\n</tool_call>'

    def no_constants(name):
        raise ValueError(name)

    for got in (parse(text), run_stream([text[:40], text[40:]])[0]):
        (c,) = got.tool_calls
        assert c["function"]["arguments"] == args
        json.loads(c["function"]["arguments"], parse_constant=no_constants)  # strict JSON
    # Absent arguments are {}; a repeated key counts once, the last, as in json.loads.
    assert parse('<tool_call>{"name": "f"}</tool_call>').tool_calls[0]["function"][
        "arguments"] == "{}"
    # "parameters" (the tool definition's word) stands for "arguments"; "arguments" wins.
    for inner, want in [('{"name": "f", "parameters": {"city": "Paris"}}', '{"city": "Paris"}'),
                        ('{"parameters": {"a": 1}, "name": "f", "arguments": {"b": 2}}',
                         '{"b": 2}')]:
        for got in (parse(f"<tool_call>{inner}</tool_call>"),
                    run_stream([f"<tool_call>{inner[:9]}", f"{inner[9:]}</tool_call>"])[0]):
            assert [c["function"]["arguments"] for c in got.tool_calls] == [want]
    # Arguments under any other key are not a call with none: the block stays content.
    other = '<tool_call>{"name": "f", "args": {"city": "Paris"}}</tool_call>'
    assert parse(other) == run_stream([other])[0] == ParsedOutput(other, [])
    dup = '<tool_call>{"arguments": {"a": 1}, "name": "f", "arguments": {"b": [2, {}]} }' \
          "</tool_call>"
    assert parse(dup).tool_calls[0]["function"]["arguments"] == '{"b": [2, {}]}'


def test_max_calls_keeps_the_first_calls_only():
    """parallel_tool_calls false: calls after the first are dropped, with the whitespace
    around them; the text around them stays content."""
    two = ("Sure.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"c\": 1}}\n</tool_call>\n"
           "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"c\": 2}}\n</tool_call>\nBye")
    for got in (parse(two, WEATHER, max_calls=1), run_stream(list(two), WEATHER, 1)[0]):
        assert got.content == "Sure.\nBye"
        assert [c["function"]["arguments"] for c in got.tool_calls] == ['{"c": 1}']
    assert len(parse(two, WEATHER).tool_calls) == 2


def test_unknown_name_is_accepted_without_tools():
    out = parse('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>')
    assert [c["function"]["name"] for c in out.tool_calls] == ["nope"]


def test_unclosed_valid_block_is_a_call():
    out = parse('ok <tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n', WEATHER)
    assert out == ParsedOutput("ok", [call("weather", {"city": "Rome"}, "call_0")])


def test_mixed_valid_and_malformed_blocks():
    good = '<tool_call>{"name": "weather", "arguments": {}}</tool_call>'
    bad = "<tool_call>{oops}</tool_call>"
    out = parse(f"A\n{good}\n{bad}\nB", WEATHER)
    # Whitespace touching the valid call goes (one newline joins the text on either side);
    # the malformed block stays as text.
    assert out == ParsedOutput(f"A\n{bad}\nB", [call("weather", {}, "call_0")])


# -- streaming ----------------------------------------------------------------------------------


def run_stream(chunks, tools=None, max_calls=None):
    """Feed chunks; rebuild (content, calls) the way an OpenAI client does from the deltas."""
    parser = StreamingToolCallParser(tools, max_calls=max_calls, id_factory=counter_ids())
    deltas = [d for chunk in chunks for d in parser.feed(chunk)] + parser.finish()
    content, calls = "", []
    for delta in deltas:
        assert set(delta) in ({"content"}, {"tool_calls"}), delta
        if "content" in delta:
            assert delta["content"]  # no empty content deltas
            content += delta["content"]
            continue
        (tc,) = delta["tool_calls"]
        if "id" in tc:  # header: opens call number `index`
            assert tc["index"] == len(calls) and tc["type"] == "function"
            assert tc["function"]["arguments"] == ""
            calls.append({"id": tc["id"], "type": "function", "function": dict(tc["function"])})
        else:
            assert tc["index"] == len(calls) - 1
            calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    return ParsedOutput(content or (None if calls else ""), calls), deltas


_ws = st.sampled_from(["", " ", "\n", "\n\n", " \n "])
_words = st.text(alphabet=st.sampled_from("ab <>/_{}\"' \né😁"), max_size=12)
_args = st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=2)


@st.composite
def _block(draw):
    name = draw(st.sampled_from(["weather", "other"]))
    body = json.dumps({"name": name, "arguments": draw(_args)}, ensure_ascii=draw(st.booleans()))
    body = draw(
        st.sampled_from(
            [body, body[:-1], body + "}", "{oops", json.dumps({"name": name, "arguments": 3})]
        )
    )
    close = draw(st.sampled_from(["</tool_call>", "</tool_call>", "", "</tool_"]))
    return f"<tool_call>{draw(_ws)}{body}{draw(_ws)}{close}"


_piece = _words | _ws | _block() | st.sampled_from(["<", "<tool", "<tool_call", "</tool_call>"])
_texts = st.lists(_piece, max_size=8).map("".join)


def _split(text, cuts):
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=400, deadline=None)
@given(text=_texts, cuts=st.lists(st.integers(0, 400), max_size=20), with_tools=st.booleans(),
       max_calls=st.sampled_from([None, 1, 2]))
def test_stream_equals_parse_for_any_split(text, cuts, with_tools, max_calls):
    tools = WEATHER if with_tools else None
    streamed, _ = run_stream(_split(text, cuts), tools, max_calls)
    whole = parse(text, tools, max_calls)
    assert streamed == whole
    if max_calls is not None:  # the first calls of the unlimited parse, the same content
        unlimited = parse(text, tools)
        assert whole.content == unlimited.content
        assert [c["function"] for c in whole.tool_calls] == [
            c["function"] for c in unlimited.tool_calls[:max_calls]]


@settings(max_examples=100, deadline=None)
@given(text=_texts)
def test_stream_char_by_char_equals_parse(text):
    streamed, _ = run_stream(list(text), WEATHER)
    assert streamed == parse(text, WEATHER)


def test_stream_holds_back_only_a_possible_tag():
    parser = StreamingToolCallParser(WEATHER, id_factory=counter_ids())
    assert parser.feed("Hello wor") == [{"content": "Hello wor"}]
    assert parser.feed("ld <tool_") == [{"content": "ld"}]  # " <tool_" might open a call
    assert parser.feed("x> ") == [{"content": " <tool_x>"}]  # it did not
    assert parser.feed('<tool_call>\n{"name": "weather", "arguments": {"a": 1}}') == []
    assert parser.feed("\n</tool_call>") == [
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]},
    ]
    assert parser.finish() == []


def test_stream_malformed_block_at_finish_falls_back_to_content():
    text = 'Sure <tool_call>\n{"name": "weather", "argu}\n</tool_call>'
    streamed, deltas = run_stream([text[:8], text[8:20], text[20:]], WEATHER)
    assert streamed == parse(text, WEATHER) == ParsedOutput(text, [])
    assert deltas[0] == {"content": "Sure"}


# -- the markup splitter -------------------------------------------------------------------------


def split_markup(chunks):
    """Run MarkupSplitter; merge neighbouring pieces of a kind into [(is_markup, text)]."""
    splitter = MarkupSplitter()
    pieces = [p for chunk in chunks for p in splitter.feed(chunk)] + splitter.finish()
    assert all(text for _, text in pieces), pieces  # no empty pieces
    return merge(pieces)


def merge(pieces):
    merged: list[tuple[bool, str]] = []
    for is_markup, text in pieces:
        if merged and merged[-1][0] == is_markup:
            merged[-1] = (is_markup, merged[-1][1] + text)
        elif text:
            merged.append((is_markup, text))
    return merged


# Markup: a block (to its end tag, or to the end of the text) and the whitespace touching it.
_MARKUP = re.compile(f"(\\s*{re.escape(START)}.*?(?:{re.escape(END)}\\s*|\\Z))", re.DOTALL)


@settings(max_examples=300, deadline=None)
@given(text=_texts, cuts=st.lists(st.integers(0, 400), max_size=20))
def test_markup_splitter_finds_the_blocks_parse_finds(text, cuts):
    """Pieces concatenate to the input; the markup is exactly the blocks of the per-block rule
    (<tool_call> to </tool_call> or the end) and the whitespace around them, for any split."""
    expected = merge((i % 2 == 1, piece) for i, piece in enumerate(_MARKUP.split(text)))
    assert split_markup(_split(text, cuts)) == expected
    assert split_markup(list(text)) == expected


def test_markup_splitter_holds_back_only_a_possible_tag_and_whitespace_before_it():
    splitter = MarkupSplitter()
    assert splitter.feed("a\n<tool") == [(False, "a")]
    assert splitter.feed("_call>{x}</tool_") == [(True, "\n<tool_call>"), (True, "{x}")]
    assert splitter.feed("call>\n") == [(True, "</tool_call>"), (True, "\n")]
    assert splitter.feed(" b <tool_x") == [(True, " "), (False, "b <tool_x")]
    assert splitter.feed(" \n") == []
    assert splitter.finish() == [(False, " \n")]  # trailing whitespace of the text


# -- round trip through the chat template -------------------------------------------------------

_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,20}", fullmatch=True)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None)
@given(
    calls=st.lists(
        st.tuples(_name, st.dictionaries(st.text(max_size=6), _json, max_size=3)),
        min_size=1,
        max_size=3,
    ),
    content=st.none() | st.text(alphabet=st.characters(blacklist_characters="<"), max_size=20),
)
def test_render_then_parse_gives_the_calls_back(calls, content):
    message = {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": n, "arguments": json.dumps(a)},
            }
            for i, (n, a) in enumerate(calls)
        ],
    }
    prompt = render_chat([{"role": "user", "content": "q"}, message], add_generation_prompt=False)
    # What the model generated after "<|im_start|>assistant", up to its <|im_end|>.
    generated = prompt.rsplit("<|im_start|>assistant", 1)[1].removesuffix("<|im_end|>\n")
    out = parse(generated)
    assert out.content == ((content or "").strip() or None)
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls
    ] == [(n, a) for n, a in calls]
    assert [c["id"] for c in out.tool_calls] == [f"call_{i}" for i in range(len(calls))]
