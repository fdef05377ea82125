"""Chat template: byte-for-byte equality with the official Jinja template, OpenAI input, errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_jax.chat_template import (
    CONTINUE_MARKER,
    ChatTemplateError,
    normalize_messages,
    render_chat,
)

DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


# -- hand-written expectations (no reference files needed) --------------------------------------


def test_default_system_prompt_and_generation_prompt():
    assert render_chat([{"role": "user", "content": "hi"}]) == (
        f"<|im_start|>system\n{DEFAULT}<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert no_prompt.endswith("<|im_start|>user\nhi<|im_end|>\n")


def test_openai_input_shapes():
    """developer = system, text parts joined, names ignored, null content on tool-call turns."""
    rendered = render_chat(
        [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "name": "ann",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"x": "é", "y": [1, 2]}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            {"role": "tool", "tool_call_id": "call_2", "content": "43"},
        ],
        add_generation_prompt=False,
    )
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\na\nb<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"x": "é", "y": [1, 2]}}'
        "\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n42\n</tool_response>"
        "\n<tool_response>\n43\n</tool_response><|im_end|>\n"
    )


def test_an_assistant_refusal_replays_as_its_text():
    """OpenAI replies to a refused request with content null and `refusal` set; a client that
    sends the conversation back, or sends refusal parts, gets the refusal's text rendered."""
    def turn(assistant: dict) -> str:
        return render_chat([{"role": "user", "content": "q"}, {"role": "assistant", **assistant},
                            {"role": "user", "content": "r"}])

    want = turn({"content": "I can't.\nSorry."})
    assert turn({"content": [{"type": "refusal", "refusal": "I can't."},
                             {"type": "text", "text": "Sorry."}]}) == want
    assert turn({"content": None, "refusal": "I can't.\nSorry."}) == want
    assert turn({"content": "I can't.\nSorry.", "refusal": "other"}) == want  # content wins


def test_tools_section():
    tool = {"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}
    rendered = render_chat([{"role": "user", "content": "q"}], tools=[tool])
    assert rendered.startswith(
        f"<|im_start|>system\n{DEFAULT}\n\n# Tools\n\nYou may call one or more functions"
    )
    assert '\n<tools>\n{"type": "function", "function": {"name": "get", "parameters": ' in rendered
    assert rendered.endswith(
        "</tool_call><|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("arguments", ["", "  \n"])
def test_empty_arguments_string_renders_as_an_empty_object(arguments):
    """Clients send "" for a call without arguments: not JSON, yet it means no arguments, {}."""
    def render(args: str) -> str:
        return render_chat([{"role": "user", "content": "q"}, {
            "role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": args}}]}])

    assert render(arguments) == render("{}")
    assert '{"name": "now", "arguments": {}}' in render(arguments)


def test_continue_final_message_cuts_at_the_final_messages_marker():
    """The prompt is cut at the last marker: an earlier message holding the marker's own text,
    or the final message's text, stays whole, and the final turn is left open."""
    early = f"see {CONTINUE_MARKER} here"
    messages = [{"role": "user", "content": early}, {"role": "assistant", "content": "Sure, 4"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "Sure, 4"}]
    full = render_chat(messages, add_generation_prompt=False)
    assert render_chat(messages, continue_final_message=True) == full.removesuffix("<|im_end|>\n")
    assert f"<|im_start|>user\n{early}<|im_end|>\n" in full


@pytest.mark.parametrize(
    ("messages", "param", "fragment"),
    [
        ([], "messages", "at least one"),
        ("hello", "messages", "list"),
        ([{"role": "user", "content": "a"}, "x"], "messages[1]", "object"),
        ([{"role": "robot", "content": "a"}], "messages[0].role", "unknown role"),
        ([{"role": "function", "content": "a"}], "messages[0].role", "unknown role"),
        ([{"content": "a"}], "messages[0].role", "unknown role"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            ],
            "messages[1].content[0]",
            "image_url",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "text"),
        # Refusal parts are an assistant's only, as in OpenAI's schema.
        ([{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}],
         "messages[0].content[0]", "refusal"),
        ([{"role": "assistant", "content": [{"type": "refusal"}]}],
         "messages[0].content[0].refusal", "refusal"),
        ([{"role": "user", "content": 3}], "messages[0].content", "string"),
        ([{"role": "user", "content": None}], "messages[0].content", "needs content"),
        ([{"role": "assistant", "content": None}], "messages[0].content", "needs content"),
        (
            [{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}],
            "messages[1]",
            "must follow",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
                {"role": "user", "content": "b"},
                {"role": "tool", "content": "r"},
            ],
            "messages[3]",
            "must follow",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                }
            ],
            "messages[0].tool_calls[0].function.arguments",
            "not valid JSON",
        ),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                }
            ],
            "messages[0].tool_calls[0].function.arguments",
            "JSON object",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
            "messages[0].tool_calls[0].function.name",
            "non-empty",
        ),
        ([{"role": "assistant", "tool_calls": "f"}], "messages[0].tool_calls", "list"),
        ([{"role": "user", "content": []}], "messages[0].content", "must not be empty"),
        # What the arguments string hid from the request's own checks (each was a 500):
        *[
            (
                [{"role": "assistant", "tool_calls": [{"function": {
                    "name": "f", "arguments": arguments}}]}],
                "messages[0].tool_calls[0].function.arguments",
                fragment,
            )
            for arguments, fragment in [
                ('{"a": "\\ud800"}', "surrogate"),  # the JSON escape of a lone surrogate
                ('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", "too deeply"),
                ('{"a":' + "[" * 990 + "]" * 990 + "}", "too deeply"),
            ]
        ],
    ],
)
def test_rejects_what_cannot_be_rendered(messages, param, fragment):
    with pytest.raises(ChatTemplateError) as info:
        render_chat(messages)
    assert info.value.param == param
    assert str(info.value).startswith(param + ": ")
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_name_must_be_a_string():
    with pytest.raises(ChatTemplateError) as info:
        render_chat([{"role": "user", "content": "a", "name": 5}])
    assert info.value.param == "messages[0].name"
    assert "<|im_start|>user\na<|im_end|>" in render_chat(
        [{"role": "user", "content": "a", "name": None}])


def test_continuing_a_final_message_of_tool_calls_alone_is_refused():
    """Its calls would be cut off and the model continue an empty turn; transformers raises
    for it too (content None). With content, the content is continued, as in transformers."""
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": [call]}]
    with pytest.raises(ChatTemplateError) as info:
        render_chat(messages, add_generation_prompt=False, continue_final_message=True)
    assert info.value.param == "continue_final_message"
    messages[-1]["content"] = "Let me"
    assert render_chat(messages, add_generation_prompt=False,
                       continue_final_message=True).endswith("<|im_start|>assistant\nLet me")


def test_rejects_bad_tools():
    with pytest.raises(ChatTemplateError) as info:
        render_chat([{"role": "user", "content": "a"}], tools=["f"])
    assert info.value.param == "tools[0]"


def test_does_not_modify_the_callers_messages():
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "s"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
    ]
    before = json.dumps(messages)
    render_chat(messages)
    assert json.dumps(messages) == before


# -- byte-for-byte equality with the official template ------------------------------------------

_text = st.text(max_size=20) | st.sampled_from(["", " ", "\n", '{"a": 1}', "<tool_call>", "é😁我"])
_json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text
_json = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)


@st.composite
def _content(draw):
    if draw(st.booleans()):
        return draw(_text)
    return [{"type": "text", "text": t} for t in draw(st.lists(_text, min_size=1, max_size=3))]


@st.composite
def _tool_exchange(draw):
    calls = []
    for _ in range(draw(st.integers(1, 3))):
        arguments = draw(st.dictionaries(_text, _json, max_size=3))
        if draw(st.booleans()):  # OpenAI clients send a JSON string; others send the object
            arguments = json.dumps(arguments)
        calls.append(
            {
                "id": "call_x",
                "type": "function",
                "function": {"name": draw(_name), "arguments": arguments},
            }
        )
    content = draw(st.none() | _text)
    turn = [{"role": "assistant", "content": content, "tool_calls": calls}]
    results = [
        {"role": "tool", "tool_call_id": "call_x", "content": draw(_content())}
        for _ in range(draw(st.integers(1, 3)))
    ]
    return turn + results


@st.composite
def _conversation(draw):
    groups = draw(
        st.lists(
            st.one_of(
                st.builds(lambda c: [{"role": "user", "content": c}], _content()),
                st.builds(lambda c: [{"role": "assistant", "content": c}], _content()),
                st.builds(lambda c: [{"role": "system", "content": c}], _content()),
                st.builds(lambda c: [{"role": "developer", "content": c}], _content()),
                _tool_exchange(),
            ),
            min_size=1,
            max_size=5,
        )
    )
    return [m for g in groups for m in g]


@st.composite
def _tools(draw):
    tools = []
    for _ in range(draw(st.integers(0, 3))):
        properties = draw(
            st.dictionaries(
                _name,
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["string", "object", "array"])},
                    optional={"description": _text, "enum": st.lists(_json, max_size=2)},
                ),
                max_size=3,
            )
        )
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": draw(_name),
                    "description": draw(_text),
                    "parameters": {
                        "type": "object",
                        "properties": properties,
                        "extra": draw(_json),
                    },
                },
            }
        )
    return draw(st.sampled_from([None, tools])) if not tools else tools


@pytest.fixture(scope="module")
def official(shared_reference):
    """The official template rendered by transformers' own Jinja renderer."""
    from transformers.utils import chat_template_utils as utils
    source = (shared_reference / "qwen2.5-instruct-chat-template.jinja").read_text(encoding="utf-8")

    def render(messages, tools, add_generation_prompt, continue_final_message=False):
        rendered, _ = utils.render_jinja_template(
            [messages],
            tools=tools,
            chat_template=source,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        return rendered[0]

    return render


@pytest.mark.needs_shared
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=_conversation(), tools=_tools(), add_generation_prompt=st.booleans(),
       continue_final_message=st.booleans())
def test_matches_official_template(official, messages, tools, add_generation_prompt,
                                   continue_final_message):
    # The oracle gets the normalised messages (text parts joined, developer->system, arguments
    # parsed): the official template cannot read OpenAI's shapes itself. Continuing the final
    # message leaves no generation prompt (transformers cuts the text after that message).
    expected = official(normalize_messages(messages), tools, add_generation_prompt,
                        continue_final_message)
    assert render_chat(messages, tools, add_generation_prompt,
                       continue_final_message) == expected


@pytest.mark.needs_shared
def test_official_template_on_a_fixed_conversation(official):
    """System not first, unicode, two calls, grouped results, tools with nested schemas."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Météo — 天气",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "opts": {"type": "object"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Paris et 北京?"},
        {"role": "system", "content": "late system"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"city": "北京"}},
                },
            ],
        },
        {"role": "tool", "content": "18°C"},
        {"role": "tool", "content": "25°C"},
        {"role": "assistant", "content": "Done 😁"},
    ]
    assert render_chat(messages, tools) == official(normalize_messages(messages), tools, True)
