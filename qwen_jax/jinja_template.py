"""A snapshot's own chat template, rendered with Jinja the way transformers renders it.

qwen-jax writes Qwen2.5-Instruct prompts in plain Python (chat_template.py), byte for byte what
the official template gives. Other `qwen2` snapshots carry other templates: Qwen2-Instruct's
default system prompt is "You are a helpful assistant.", Qwen2.5-Math-Instruct asks to reason step
by step, a fine-tune may have a format of its own. A model answers best in the format it was
trained on, so where a snapshot's template differs from the official one the server renders that
template instead, as transformers' `apply_chat_template` and vLLM do: in a sandboxed Jinja
environment with transformers' settings (`trim_blocks`, `lstrip_blocks`, the `loopcontrols`
extension, a `tojson` that keeps non-ASCII text and key order, `raise_exception`,
`strftime_now`) and the tokenizer's special tokens as variables.

Messages reach the template normalized as for the built-in renderer (content parts joined,
tool-call arguments parsed into objects, `developer` -> `system`), with their `name` and
`tool_call_id` kept, since other templates may print them. Tool calls in the reply are still read
in Qwen2.5's `<tool_call>` format (tool_calls.py).
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_jax.chat_template import (
    CONTINUE_MARKER,
    ChatTemplateError,
    check_continuable,
    normalize_messages,
    render_chat,
)
from qwen_jax.config import read_json_object, token_content

# The `chat_template` of Qwen2.5-Instruct's tokenizer_config.json (Apache-2.0, Qwen team).
OFFICIAL_TEMPLATE_PATH = Path(__file__).with_name("qwen2.5-instruct-chat-template.jinja")

# Special tokens transformers passes to a template as variables (Qwen2.5's uses none).
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")

Renderer = Callable[..., str]  # render_chat's signature


class TemplateConfigError(ValueError):
    """A chat template that cannot be used (unreadable file, not valid Jinja)."""


@functools.cache
def official_template() -> str:
    return OFFICIAL_TEMPLATE_PATH.read_text(encoding="utf-8")


def is_official(source: str) -> bool:
    """True if `source` is Qwen2.5-Instruct's template (up to whitespace at its ends)."""
    return source.strip() == official_template().strip()


def snapshot_template(model_dir: str | Path) -> str | None:
    """The chat template a snapshot carries, or None: `chat_template.jinja` (where transformers
    4.43+ saves it), else `tokenizer_config.json`'s `chat_template` (a string, or a list of named
    templates of which "default" is the chat one)."""
    folder = Path(model_dir)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise TemplateConfigError(f"cannot read {jinja_file}: {e}") from e
    tok_cfg = read_json_object(folder / "tokenizer_config.json", TemplateConfigError) or {}
    source = tok_cfg.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        source = named.get("default")
    if source is not None and not isinstance(source, str):
        raise TemplateConfigError(f"{folder / 'tokenizer_config.json'}: chat_template must be a "
                                  "string or a list of named templates")
    return source


def special_tokens(model_dir: str | Path) -> dict[str, str]:
    """bos_token, eos_token, ... from tokenizer_config.json, as strings."""
    tok_cfg = read_json_object(Path(model_dir) / "tokenizer_config.json",
                               TemplateConfigError) or {}
    tokens = {key: token_content(tok_cfg.get(key)) for key in _SPECIAL_TOKEN_KEYS}
    return {key: value for key, value in tokens.items() if value is not None}


def _environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own filter escapes HTML characters and sorts keys; transformers' does neither.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@dataclass(frozen=True)
class JinjaChatTemplate:
    """A chat template's Jinja source, compiled once; call it like `render_chat`."""

    source: str
    variables: Mapping[str, str] = field(default_factory=dict)  # the special tokens
    origin: str = "the chat template"  # where the source came from, for error messages

    def __post_init__(self) -> None:
        import jinja2

        try:
            compiled = _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            line = getattr(e, "lineno", None)
            where = f"{self.origin}, line {line}" if line else self.origin
            raise TemplateConfigError(f"{where}: not valid Jinja: {e}") from e
        object.__setattr__(self, "_compiled", compiled)

    def __call__(self, messages: Sequence[Mapping[str, Any]],
                 tools: Sequence[Mapping[str, Any]] | None = None,
                 add_generation_prompt: bool = True,
                 continue_final_message: bool = False) -> str:
        import jinja2

        msgs = normalize_messages(messages)
        for original, msg in zip(messages, msgs):
            for key in ("name", "tool_call_id"):
                if isinstance(original.get(key), str):
                    msg[key] = original[key]
        if continue_final_message:
            check_continuable(messages)
            msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + CONTINUE_MARKER}
        try:
            rendered = self._compiled.render(
                **self.variables, messages=msgs, tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt and not continue_final_message)
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, or a bug in it
            raise ChatTemplateError("messages", f"the model's chat template refused the "
                                    f"conversation: {e}") from None
        except (TypeError, ValueError, LookupError, ArithmeticError) as e:
            raise ChatTemplateError("messages", f"the model's chat template failed on this "
                                    f"conversation: {type(e).__name__}: {e}") from None
        if continue_final_message:
            if CONTINUE_MARKER not in rendered:
                raise ChatTemplateError(
                    "continue_final_message", "the model's chat template does not write the final "
                    "message's content as it is, so it cannot be continued")
            rendered = rendered[: rendered.rindex(CONTINUE_MARKER)]
        return rendered


def choose_renderer(model_dir: str | Path, choice: str = "auto") -> tuple[Renderer, str]:
    """The prompt renderer for a snapshot and a line saying which it is.

    choice "auto": the built-in Qwen2.5-Instruct renderer when the snapshot carries the official
    template or none, else the snapshot's own; "builtin": always the built-in one; anything else
    is the path of a Jinja file to use (as vLLM's --chat-template)."""
    builtin = (render_chat, "Qwen2.5-Instruct's (built in, chat_template.py)")
    if choice == "builtin":
        return builtin
    variables = special_tokens(model_dir)
    if choice != "auto":
        path = Path(choice)
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise TemplateConfigError(f"cannot read the chat template {path}: {e}") from e
        if is_official(source):
            return builtin
        return JinjaChatTemplate(source, variables, str(path)), f"{path} (Jinja)"
    source = snapshot_template(model_dir)
    if source is None or is_official(source):
        return builtin
    jinja_file = Path(model_dir) / "chat_template.jinja"
    origin = (str(jinja_file) if jinja_file.is_file()
              else f"{Path(model_dir) / 'tokenizer_config.json'}'s chat_template")
    return (JinjaChatTemplate(source, variables, origin),
            "the snapshot's own (it differs from Qwen2.5-Instruct's; rendered with Jinja)")
