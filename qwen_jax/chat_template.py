"""The Qwen2.5-Instruct chat template in plain Python.

`render_chat` produces, byte for byte, what the official Jinja template (the `chat_template` of
Qwen2.5-Instruct's tokenizer_config.json, rendered the way transformers renders it) produces for
the same conversation. It works in two steps:

1. `normalize_messages` turns what OpenAI clients send into the plain shape the template expects:
   content parts `[{"type": "text", "text": ...}]` joined with "\\n" (vLLM's convention),
   `developer` -> `system`, tool-call `arguments` JSON strings parsed into objects, `content: null`
   on assistant tool-call messages -> "". `name` and `tool_call_id` fields are accepted and, as in
   the official template, not rendered. Anything the template cannot render, and a `tool`
   message that answers no tool call (the template would render it as a stray tool response),
   raises `ChatTemplateError` naming the offending message (`param` like "messages[2].content").
2. `render_chat` applies the template's rules:
   - a system turn first: the first message if it is a system message, else the default prompt;
     with tools, the `# Tools` section (each tool as JSON, one per line) is appended to it;
   - system messages after the first, user messages and plain assistant messages:
     `<|im_start|>{role}\\n{content}<|im_end|>\\n`;
   - assistant tool calls: one `<tool_call>` block per call after the (optional) content;
   - consecutive `tool` messages: one `user` turn of `<tool_response>` blocks;
   - `add_generation_prompt`: `<|im_start|>assistant\\n`;
   - `continue_final_message` (a "prefill" of the reply): the text ends right after the last
     message's content, its turn left open for the model to continue (as transformers does it:
     render with a marker after that content, then cut at the marker).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """A conversation the template cannot render; `param` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def tojson(value: Any) -> str:
    """JSON as transformers' chat-template `tojson` filter writes it: no ASCII escaping, default
    separators (", " and ": "), keys in the given order."""
    return json.dumps(value, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# Normalisation of OpenAI input


def _text(content: Any, param: str, *, allow_none: bool = False,
          refusals: bool = False) -> str | None:
    """A message's content as one string: a string, or a list of text parts joined by "\\n"
    (with `refusals`, for an assistant message, OpenAI's refusal parts are read as text too)."""
    if content is None and allow_none:
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if not content:  # OpenAI's schema: minItems 1
            raise ChatTemplateError(param, "a list of content parts must not be empty")
        kinds = ("text", "refusal") if refusals else ("text",)
        texts = []
        for j, part in enumerate(content):
            where = f"{param}[{j}]"
            if not isinstance(part, Mapping):
                raise ChatTemplateError(where, "content parts must be objects")
            kind = part.get("type")
            if kind not in kinds:
                allowed = " or ".join(map(repr, kinds))
                raise ChatTemplateError(
                    where, f"content part type {kind!r} is not supported (only {allowed})"
                )
            if not isinstance(part.get(kind), str):
                raise ChatTemplateError(f"{where}.{kind}", f"a {kind} part needs a string {kind!r}")
            texts.append(part[kind])
        return "\n".join(texts)
    expected = "a string, a list of text parts or null" if allow_none else "a string or a list"
    raise ChatTemplateError(param, f"content must be {expected} of text parts")


def _tool_call(call: Any, param: str) -> dict:
    """An OpenAI tool call -> {"type": "function", "function": {"name", "arguments": object}}."""
    if not isinstance(call, Mapping):
        raise ChatTemplateError(param, "a tool call must be an object")
    if call.get("type", "function") != "function":
        raise ChatTemplateError(f"{param}.type", "only 'function' tool calls are supported")
    function = call.get("function")
    if not isinstance(function, Mapping):
        raise ChatTemplateError(f"{param}.function", "a tool call needs a 'function' object")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ChatTemplateError(f"{param}.function.name", "must be a non-empty string")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        # OpenAI sends arguments as a JSON string; the template expects an object. The string
        # escaped what the request's own checks look for, so the parsed value must also be
        # writable as the text of a prompt: no lone surrogate ("\ud800"), no nesting past the
        # recursion limit. (NaN and Infinity pass, as in the request body and in transformers.)
        where = f"{param}.function.arguments"
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
            json.dumps(arguments, ensure_ascii=False).encode()
        except ValueError as exc:
            raise ChatTemplateError(where, f"arguments are not valid JSON ({exc})") from None
        except RecursionError:
            raise ChatTemplateError(where, "arguments nest too deeply") from None
        except UnicodeEncodeError:
            raise ChatTemplateError(
                where, "arguments contain a lone UTF-16 surrogate, which is not text") from None
    if not isinstance(arguments, Mapping):
        raise ChatTemplateError(f"{param}.function.arguments", "arguments must be a JSON object")
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def normalize_messages(messages: Any) -> list[dict]:
    """OpenAI chat messages -> the plain dicts the Qwen template reads (see module docstring)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatTemplateError("messages", "must be a list of messages")
    if not messages:
        raise ChatTemplateError("messages", "must contain at least one message")
    out: list[dict] = []
    in_tool_turn = False  # the latest non-tool message was an assistant message with tool calls
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ChatTemplateError(where, "a message must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise ChatTemplateError(
                f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})"
            )
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise ChatTemplateError(f"{where}.name", "must be a string")
        role = "system" if role == "developer" else role
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls is not None and not isinstance(calls, list):
            raise ChatTemplateError(f"{where}.tool_calls", "must be a list")
        assistant = role == "assistant"
        content = message.get("content")
        if assistant and content is None and isinstance(message.get("refusal"), str):
            content = message["refusal"]  # a refusal replayed as OpenAI sent it
        if calls:
            text = _text(content, f"{where}.content", allow_none=True, refusals=True)
            tool_calls = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
            out.append({"role": role, "content": text or "", "tool_calls": tool_calls})
        else:
            if role == "tool" and not in_tool_turn:
                raise ChatTemplateError(
                    where, "a 'tool' message must follow an assistant message with tool_calls"
                )
            if content is None:
                raise ChatTemplateError(f"{where}.content", f"a {role!r} message needs content")
            text = _text(content, f"{where}.content", refusals=assistant)
            out.append({"role": role, "content": text})
        if role != "tool":
            in_tool_turn = bool(calls)
    return out


def _normalize_tools(tools: Any) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ChatTemplateError("tools", "must be a list of tools")
    for j, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"tools[{j}]", "a tool must be an object")
    return list(tools)


# ----------------------------------------------------------------------------------------------
# Rendering


def _turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def render_tool_call(name: str, arguments: Any) -> str:
    """One call as the model writes it (the parser in tool_calls.py reads this back)."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {tojson(arguments)}}}\n</tool_call>'


# Put after the content to continue. Messages may hold it too: the cut is at the last one, and
# after the final message's content comes only template text (or tools as JSON, NUL escaped).
CONTINUE_MARKER = "\x00continue here\x00"


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """The Qwen2.5-Instruct prompt for an OpenAI conversation (raises ChatTemplateError)."""
    msgs = normalize_messages(messages)
    tool_list = _normalize_tools(tools)
    if continue_final_message:
        check_continuable(messages)
        msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + CONTINUE_MARKER}
        rendered = _render(msgs, tool_list, add_generation_prompt=False)
        return rendered[: rendered.rindex(CONTINUE_MARKER)]
    return _render(msgs, tool_list, add_generation_prompt)


def check_continuable(messages: Sequence[Mapping[str, Any]]) -> None:
    """continue_final_message needs a final message with content to continue: tool calls
    without content would be cut off silently (transformers raises for it too)."""
    last = messages[-1]
    if last.get("tool_calls") and last.get("content") is None:
        raise ChatTemplateError(
            "continue_final_message", "the final message has tool_calls and no content to "
            "continue")


def _render(msgs: list[dict], tool_list: list[dict], add_generation_prompt: bool) -> str:
    first_is_system = msgs[0]["role"] == "system"
    system = msgs[0]["content"] if first_is_system else DEFAULT_SYSTEM_PROMPT

    parts: list[str] = []
    if tool_list:
        tool_lines = "".join("\n" + tojson(tool) for tool in tool_list)
        parts.append(f"<|im_start|>system\n{system}{TOOLS_HEADER}{tool_lines}{TOOLS_FOOTER}")
    else:
        parts.append(_turn("system", system))

    for i, msg in enumerate(msgs):
        role = msg["role"]
        if i == 0 and first_is_system:
            continue  # already rendered as the system turn
        if role == "assistant" and msg.get("tool_calls"):
            calls = "".join(
                "\n" + render_tool_call(c["function"]["name"], c["function"]["arguments"])
                for c in msg["tool_calls"]
            )
            content = "\n" + msg["content"] if msg["content"] else ""
            parts.append(f"<|im_start|>assistant{content}{calls}<|im_end|>\n")
        elif role == "tool":
            # Consecutive tool results share one user turn.
            opens = i == 0 or msgs[i - 1]["role"] != "tool"
            closes = i == len(msgs) - 1 or msgs[i + 1]["role"] != "tool"
            parts.append(
                ("<|im_start|>user" if opens else "")
                + f"\n<tool_response>\n{msg['content']}\n</tool_response>"
                + ("<|im_end|>\n" if closes else "")
            )
        else:
            parts.append(_turn(role, msg["content"]))

    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
