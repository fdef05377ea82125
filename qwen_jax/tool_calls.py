"""Qwen `<tool_call>` blocks in generated text -> OpenAI `tool_calls`, whole or streamed.

Qwen2.5 writes a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

possibly several, possibly after some text. The rule, shared by `parse_tool_calls` (whole text)
and `StreamingToolCallParser` (deltas), is per block:

- A block runs from `<tool_call>` to the next `</tool_call>`, or to the end of the text when the
  closing tag never comes (generation stopped early).
- A block is a *call* when its inside is one JSON object with a non-empty string `name` and an
  object `arguments` (or `parameters`; `{}` when the object has no key but `name`) and, when
  `tools` are given, `name` is one of their function names. The call's `arguments` string is
  the object's text as the model wrote it: a number too large for a float stays as written
  (re-encoding it would give `Infinity`, which is not JSON). Otherwise a closed block's raw
  text, tags included, is ordinary content (the model wrote it; the client should see it), and
  an unclosed one is dropped: generation ended half-way through a call (max_tokens), and half
  a call is neither a call nor message text.
  Nothing here raises on model output: malformed JSON or an unknown name just comes back as
  content.
- With `max_calls` (1 for `parallel_tool_calls: false`, as vLLM does it), calls after that many
  are dropped, like an unclosed block.
- Content is all text outside calls and dropped blocks, with whitespace removed where it touches
  one of them and at the start of the output (a stream cannot take back whitespace it has sent
  before a call appears, so it holds whitespace back until it knows); text on both sides of
  calls is joined by one newline, so words do not run together. When no text is left,
  `content` is None beside calls (as OpenAI sends it) and "" without them.

So for the usual "text, then calls" output, `content` is the text before the first call, stripped,
or None; an output whose only block is malformed but closed comes back whole as content, without
calls; and one cut off inside its first block has the text before the block as content ("" when
there is none).
A stream holds back only a possible prefix of `<tool_call>`, trailing whitespace, and an open
block; each call is sent as a header delta (index, id, type, name, empty arguments) followed by
one arguments delta, which is what OpenAI clients reassemble.

`MarkupSplitter` tells the message text from the markup in a stream, so that stop strings are
matched in the text only (server.py): a stop string such as "\n" must not cut a call in half,
nor end parallel calls at the newline between them.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

START, END = "<tool_call>", "</tool_call>"
_BLOCKS = re.compile(f"({re.escape(START)}.*?(?:{re.escape(END)}|\\Z))", re.DOTALL)


def new_call_id() -> str:
    """An OpenAI-style tool call id ("call_" + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)


def tool_names(tools: Sequence[Mapping[str, Any]] | None) -> frozenset[str] | None:
    """Function names of OpenAI `tools` (None: any name is accepted)."""
    if tools is None:
        return None
    names = set()
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return frozenset(names)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity: clients could not parse them back


def parse_block(inner: str, names: frozenset[str] | None) -> tuple[str, str] | None:
    """The inside of one block -> (name, arguments as a JSON string), or None if not a call."""
    try:
        obj = json.loads(inner, parse_constant=_reject_constant)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    # "parameters", the tool definition's word, is a slip models make for "arguments" (vLLM's
    # llama3_json parser takes it too); with neither, other keys may hold the arguments, so only
    # a bare {"name": ...} is a call without them.
    key = next((k for k in ("arguments", "parameters") if k in obj), None)
    if key is None and obj.keys() != {"name"}:
        return None
    name, arguments = obj.get("name"), obj[key] if key else {}
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    if names is not None and name not in names:
        return None
    return name, _member_text(inner, key) if key else "{}"


_SPACE = re.compile(r"[ \t\n\r]*")


def _member_text(obj_text: str, key: str) -> str | None:
    """The source text of member `key`'s value in `obj_text`, a JSON object that json.loads
    has accepted (the last one of that key, as json.loads keeps); None if absent."""
    decode = json.JSONDecoder().raw_decode
    i = _SPACE.match(obj_text, obj_text.index("{") + 1).end()
    found = None
    while obj_text.startswith('"', i):
        name, i = json.decoder.scanstring(obj_text, i + 1)
        i = _SPACE.match(obj_text, obj_text.index(":", i) + 1).end()
        _, end = decode(obj_text, i)
        if name == key:
            found = obj_text[i:end]
        i = _SPACE.match(obj_text, end).end()
        if not obj_text.startswith(",", i):
            break
        i = _SPACE.match(obj_text, i + 1).end()
    return found


def _call(name: str, arguments: str, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_tool_calls(
    text: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    max_calls: int | None = None,
    id_factory: Callable[[], str] = new_call_id,
) -> ParsedOutput:
    """Split a finished generation into content and OpenAI tool calls (the rule is above)."""
    names = tool_names(tools)
    # Items: ("text", str), ("call", (name, arguments)) and, last only, ("cut", None) for an
    # unclosed block that is not a call; a closed malformed block is text.
    items: list[tuple[str, Any]] = []
    for i, piece in enumerate(_BLOCKS.split(text)):
        is_block = i % 2 == 1
        inner = piece[len(START) :].removesuffix(END) if is_block else None
        call = parse_block(inner, names) if is_block else None
        if call is not None:
            items.append(("call", call))
        elif is_block and not piece.endswith(END):
            items.append(("cut", None))
        elif items and items[-1][0] == "text":
            items[-1] = ("text", items[-1][1] + piece)
        else:
            items.append(("text", piece))

    content: list[str] = []
    calls: list[dict] = []
    for i, (kind, value) in enumerate(items):
        if kind == "call":
            if max_calls is None or len(calls) < max_calls:
                calls.append(_call(*value, id_factory()))
            continue
        if kind == "cut":
            continue
        if i == 0 or items[i - 1][0] == "call":
            value = value.lstrip()
        if i + 1 < len(items):  # the next item can only be a call or a cut block
            value = value.rstrip()
        if value:
            content.append(value)
    # No text: null beside calls, as OpenAI sends it, else "" as for any empty reply.
    return ParsedOutput("\n".join(content) or (None if calls else ""), calls)


def _partial_tag_len(text: str, tag: str = START) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class StreamingToolCallParser:
    """Streamed text deltas -> OpenAI chat.completion.chunk `delta` dicts (the rule is above).

    `feed(delta_text)` returns the deltas that are certain so far; `finish()` the rest. The
    concatenated content and the calls equal `parse_tool_calls` on the whole text.
    """

    def __init__(
        self,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        max_calls: int | None = None,
        id_factory: Callable[[], str] = new_call_id,
    ) -> None:
        self._names = tool_names(tools)
        self._max_calls = max_calls
        self._new_id = id_factory
        self._buf = ""  # undecided text: a possible tag prefix, or an open block's inside
        self._in_block = False
        self._held_ws = ""  # trailing whitespace of the content so far, not yet sent
        self._drop_ws = True  # at the start or right after a call: leading whitespace goes
        self._sent = False  # some content was sent: text after a call starts on a new line
        self._index = 0  # next tool call index
        self._finished = False

    def feed(self, delta_text: str) -> list[dict]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta_text
        out: list[dict] = []
        while True:
            if self._in_block:
                end = self._buf.find(END)
                if end < 0:
                    return out  # the block is still open
                inner, self._buf = self._buf[:end], self._buf[end + len(END) :]
                self._in_block = False
                self._close_block(inner, START + inner + END, out)
            else:
                start = self._buf.find(START)
                if start < 0:
                    keep = _partial_tag_len(self._buf)
                    cut = len(self._buf) - keep
                    self._content(self._buf[:cut], out)
                    self._buf = self._buf[cut:]
                    return out
                self._content(self._buf[:start], out)
                self._buf = self._buf[start + len(START) :]
                self._in_block = True

    def finish(self) -> list[dict]:
        if self._finished:
            return []
        self._finished = True
        out: list[dict] = []
        if self._in_block:  # unclosed block: a call if its inside is one, else dropped
            self._close_block(self._buf, None, out)
        else:
            self._content(self._buf, out)
        self._buf = ""
        if self._held_ws and not self._drop_ws:
            out.append({"content": self._held_ws})
        self._held_ws = ""
        return out

    def _content(self, text: str, out: list[dict]) -> None:
        """Send content, holding back trailing whitespace (a call may follow and swallow it)."""
        text = self._held_ws + text
        if self._drop_ws:
            text = text.lstrip()
        body = text.rstrip()
        self._held_ws = text[len(body) :]
        if body:
            if self._drop_ws and self._sent:
                body = "\n" + body
            self._drop_ws, self._sent = False, True
            out.append({"content": body})

    def _close_block(self, inner: str, raw: str | None, out: list[dict]) -> None:
        """A block's end: a call's deltas, else its raw text as content (None: drop it)."""
        call = parse_block(inner, self._names)
        if call is None:
            if raw is None:
                self._held_ws = ""  # whitespace touching a dropped block goes, as at a call
            else:
                self._content(raw, out)
            return
        name, arguments = call
        self._held_ws, self._drop_ws = "", True
        if self._max_calls is not None and self._index >= self._max_calls:
            return  # dropped: whitespace around it goes as around a call
        head = {"name": name, "arguments": ""}
        out.append(
            {
                "tool_calls": [
                    {
                        "index": self._index,
                        "id": self._new_id(),
                        "type": "function",
                        "function": head,
                    }
                ]
            }
        )
        out.append({"tool_calls": [{"index": self._index, "function": {"arguments": arguments}}]})
        self._index += 1


class MarkupSplitter:
    """Streamed text -> pieces `(is_markup, text)`: message text, or tool-call markup: a whole
    `<tool_call>` ... `</tool_call>` block, tags included, with the whitespace touching it (the
    newline between parallel calls; whitespace the content drops anyway), in one or more pieces.

    Holds back only a possible prefix of the next tag and the whitespace before it, so the
    pieces concatenate to the input.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._in_block = False
        self._after_block = False  # whitespace here still touches the block that just ended

    def feed(self, text: str) -> list[tuple[bool, str]]:
        self._buf += text
        out: list[tuple[bool, str]] = []
        while self._buf:
            if self._in_block:
                at = self._buf.find(END)
                if at < 0:
                    self._emit(out, True, len(self._buf) - _partial_tag_len(self._buf, END))
                    return out
                self._emit(out, True, at + len(END))
                self._in_block, self._after_block = False, True
                continue
            if self._after_block:
                self._emit(out, True, len(self._buf) - len(self._buf.lstrip()))
                if not self._buf:
                    return out
                self._after_block = False
            at = self._buf.find(START)
            if at < 0:  # hold back a possible tag and the whitespace before it
                cut = len(self._buf) - _partial_tag_len(self._buf, START)
                self._emit(out, False, len(self._buf[:cut].rstrip()))
                return out
            text_end = len(self._buf[:at].rstrip())
            self._emit(out, False, text_end)
            self._emit(out, True, at - text_end + len(START))
            self._in_block = True
        return out

    def finish(self) -> list[tuple[bool, str]]:
        """The held-back rest: text, whitespace after a block, or the inside of an open one."""
        out = [(self._in_block or self._after_block, self._buf)] if self._buf else []
        self._buf = ""
        return out

    def _emit(self, out: list[tuple[bool, str]], is_markup: bool, n: int) -> None:
        if n:
            out.append((is_markup, self._buf[:n]))
            self._buf = self._buf[n:]
