"""The request side of the OpenAI Chat Completions API: validation, defaults and error objects.

`validate_chat_request` is a pure function from the decoded JSON body to a `ChatRequest`, or an
`APIError` naming the offending field. Sampling ranges come from `qwen_jax.sampler.SAMPLING_RANGES`
and the request-level ranges from `REQUEST_RANGES` below; `spec/openapi.yaml` states the same ranges
and `tests/test_spec.py` proves the two agree. Every error the server sends is built here, so
status codes and messages live in one place.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qwen_jax.sampler import (
    SAMPLING_RANGES,
    SamplingParamError,
    SamplingParams,
    validate_sampling_params,
)

# ------------------------------------------------------------------------------------ errors


class APIError(Exception):
    """An error response: HTTP status plus OpenAI's {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return (
            f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"
        )


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: a bad field value or type (name the field in `param`)."""
    return APIError(400, message, "invalid_request_error", param, code)


def missing_parameter(param: str) -> APIError:
    return invalid_request(
        f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    )


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def malformed_json(detail: str) -> APIError:
    return invalid_request(
        f"We could not parse the JSON body of your request ({detail}). The body must be a JSON "
        "object.",
        code="invalid_json",
    )


def unsupported_media_type(content_type: str | None) -> APIError:
    return APIError(
        415,
        f"Unsupported Content-Type {content_type or '(none)'!r}: send application/json.",
        "invalid_request_error",
        None,
        "unsupported_media_type",
    )


def unsupported_content_encoding(encoding: str) -> APIError:
    return APIError(
        415,
        f"Unsupported Content-Encoding {encoding!r}: send the body uncompressed.",
        "invalid_request_error",
        None,
        "unsupported_media_type",
    )


def unauthorized(provided: bool) -> APIError:
    message = (
        "Incorrect API key provided."
        if provided
        else "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
    )
    return APIError(401, message, "invalid_request_error", None, "invalid_api_key")


def origin_not_allowed(origin: str) -> APIError:
    return APIError(
        403,
        f"Web pages from {origin} may not call this server (a CORS preflight was refused). Start "
        "it with --allowed-origins to allow them.",
        "invalid_request_error",
        None,
        "origin_not_allowed",
    )


def path_not_found(method: str, path: str) -> APIError:
    return APIError(
        404, f"Invalid URL ({method} {path}).", "invalid_request_error", None, "unknown_url"
    )


def method_not_allowed(method: str, path: str, allowed: tuple[str, ...] = ()) -> APIError:
    also = f" Allowed: {', '.join(allowed)}." if allowed else ""
    return APIError(
        405,
        f"Method {method} is not allowed for {path}.{also}",
        "invalid_request_error",
        None,
        "method_not_allowed",
    )


def payload_too_large(limit_bytes: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than {limit_bytes} bytes.",
        "invalid_request_error",
        None,
        "payload_too_large",
    )


def length_required() -> APIError:
    return APIError(
        411,
        "The request has no Content-Length: send one (or a chunked body).",
        "invalid_request_error",
        None,
        "length_required",
    )


def http_error(status: int, message: str) -> APIError:
    """An error the HTTP layer finds before the application runs (a malformed request line,
    too many or too long headers)."""
    return APIError(status, message, "invalid_request_error", None, None)


def queue_full() -> APIError:
    return APIError(
        429,
        "The server is busy: too many requests are waiting. Retry later.",
        "rate_limit_error",
        None,
        "queue_full",
    )


def too_many_connections(limit: int) -> APIError:
    return APIError(
        503,
        f"The server is busy: {limit} connections are open. Retry later.",
        "server_error",
        None,
        "too_many_connections",
    )


def shutting_down() -> APIError:
    return APIError(
        503,
        "The server is shutting down: the request was not completed. Retry later.",
        "server_error",
        None,
        "server_shutting_down",
    )


def server_error(
    message: str = "The server had an error while processing your request.",
) -> APIError:
    return APIError(500, message, "server_error", None, None)


def context_length_exceeded(prompt_tokens: int, max_model_len: int) -> APIError:
    return invalid_request(
        f"This model's maximum context length is {max_model_len} tokens. However, your messages "
        f"resulted in {prompt_tokens} tokens, which leaves no room for a completion. Please "
        "reduce the length of the messages.",
        param="messages",
        code="context_length_exceeded",
    )


# ------------------------------------------------------------------------------------ ranges

# field -> (low, high, low_inclusive, high_inclusive), the same form as SAMPLING_RANGES.
# Sampling fields (temperature, ..., seed, each logit_bias value) are the sampler's; these are the
# request's own. Both tables together are what spec/openapi.yaml states.
_OWN_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "n": (1, 4, True, True),
    "max_tokens": (0, 1_000_000, True, True),
    "max_completion_tokens": (0, 1_000_000, True, True),
    "top_logprobs": (0, 20, True, True),
    "min_tokens": (0, 1_000_000, True, True),
}
REQUEST_RANGES: dict[str, tuple[float, float, bool, bool]] = {**_OWN_RANGES, **SAMPLING_RANGES}
INTEGER_FIELDS = frozenset(
    {"n", "max_tokens", "max_completion_tokens", "top_logprobs", "seed", "top_k", "min_tokens"}
)
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 1024
TOOL_CHOICE_MODES = ("none", "auto", "required")
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "seed",
)
_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# Defaults when a field is omitted or null (the seed document's); the sampling fields' defaults are
# SamplingParams' own.
DEFAULTS: dict[str, Any] = {
    "n": 1,
    "stream": False,
    "logprobs": False,
    "top_logprobs": 0,
    "parallel_tool_calls": True,
}


# ------------------------------------------------------------------------------------ request


@dataclass(frozen=True)
class StructuredOutput:
    """vLLM's structured outputs: the reply is JSON that follows a schema, text that matches a
    regular expression, or one of some strings (`structured_outputs`, or vLLM's older
    `guided_json` / `guided_regex` / `guided_choice`)."""

    kind: str  # one of STRUCTURED_KINDS
    value: Any  # a JSON schema (dict), a regular expression (str), the choices (tuple of str)
    param: str = field(default="structured_outputs", compare=False)  # named in errors


STRUCTURED_KINDS = ("json", "regex", "choice")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[dict, ...]  # as sent; chat_template.render_chat validates their details
    tools: tuple[dict, ...] | None
    tool_choice: str | dict  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool
    response_format: (
        dict | None
    )  # None (text) | {"type": "json_object"} | {"type": "json_schema", ...}
    stream: bool
    include_usage: bool
    n: int
    max_tokens: int | None  # None = the rest of the context
    stop: tuple[str, ...]
    sampling: SamplingParams
    logprobs: bool
    top_logprobs: int
    user: str | None
    # vLLM's sampling extensions: stop at these ids too; never stop at EOS; no stop (token or
    # string) before this many tokens (clamped to max_tokens); keep the stop string's or stop
    # token's text at the end of the output.
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    # vLLM's chat-template extensions: end the prompt with the assistant's turn opened (default),
    # or leave the last message open for the model to continue (a prefilled reply).
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    structured_output: StructuredOutput | None = None
    # Top-level fields of the body that validation never read (typos such as `max_token`,
    # hints such as `store`): ignored, as vLLM does, and logged by the server. Not part of the
    # request's meaning, so not of its equality.
    ignored_fields: tuple[str, ...] = field(default=(), compare=False)

    @property
    def max_tool_calls(self) -> int | None:
        """At most this many tool calls in a reply (None: any)."""
        return None if self.parallel_tool_calls else 1

    def to_body(self) -> dict:
        """A request body that validates back to this ChatRequest (for tests and logging)."""
        s = self.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "messages": list(self.messages),
            "stream": self.stream,
            "stream_options": {"include_usage": self.include_usage} if self.stream else None,
            "n": self.n,
            "max_tokens": self.max_tokens,
            "stop": list(self.stop),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": s.min_p,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "repetition_penalty": s.repetition_penalty,
            "logit_bias": {str(i): b for i, b in s.logit_bias} or None,
            "seed": s.seed,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
            "tools": list(self.tools) if self.tools else None,
            "tool_choice": self.tool_choice,
            "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": self.response_format,
            "user": self.user,
            "stop_token_ids": list(self.stop_token_ids) or None,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
        }
        so = self.structured_output
        if so is not None:
            body["structured_outputs"] = {
                so.kind: list(so.value) if so.kind == "choice" else so.value}
        return body


def _describe_range(name: str, rng: tuple[float, float, bool, bool]) -> str:
    low, high, low_inc, high_inc = rng
    return f"{low} {'<=' if low_inc else '<'} {name} {'<=' if high_inc else '<'} {high}"


def _in_range(value: float, rng: tuple[float, float, bool, bool]) -> bool:
    low, high, low_inc, high_inc = rng
    above = value >= low if low_inc else value > low
    below = value <= high if high_inc else value < high
    return above and below


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _number(value: object, param: str, range_key: str) -> float | int:
    """A finite number within its range; bool is not a number (JSON true is not 1).

    Integer fields accept 3.0 like JSON Schema does (JSON has one number type), but not 3.5.
    """
    integer = range_key in INTEGER_FIELDS
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "an integer" if integer else "a number"
        raise invalid_request(f"'{param}' must be {kind}, got {_type_name(value)}.", param)
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid_request(f"'{param}' must be a finite number, got {value}.", param)
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise invalid_request(f"'{param}' must be an integer, got {value}.", param)
        value = int(value)
    rng = REQUEST_RANGES[range_key]
    if not _in_range(value, rng):
        raise invalid_request(
            f"'{param}' must satisfy {_describe_range(param, rng)}, got {value}.", param
        )
    return value


def _optional_number(body: dict, name: str) -> Any:
    value = body.get(name)
    return None if value is None else _number(value, name, name)


def _optional_bool(value: object, param: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid_request(f"'{param}' must be a boolean, got {_type_name(value)}.", param)
    return value


def _optional_string(value: object, param: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise invalid_request(f"'{param}' must be a string, got {_type_name(value)}.", param)
    return value


def _require_dict(value: object, param: str) -> dict:
    if not isinstance(value, dict):
        raise invalid_request(f"'{param}' must be an object, got {_type_name(value)}.", param)
    return value


def _messages(value: object) -> tuple[dict, ...]:
    if value is None:
        raise missing_parameter("messages")
    if not isinstance(value, list) or not value:
        raise invalid_request(
            "'messages' must be a non-empty array of message objects.", "messages"
        )
    for i, m in enumerate(value):
        _require_dict(m, f"messages[{i}]")
        if "role" not in m:
            raise invalid_request(f"'messages[{i}]' has no 'role'.", f"messages[{i}].role")
        if not isinstance(m["role"], str):
            raise invalid_request(
                f"'messages[{i}].role' must be a string, got {_type_name(m['role'])}.",
                f"messages[{i}].role",
            )
    return tuple(value)


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list):
        raise invalid_request(
            f"'stop' must be a string or an array of strings, got {_type_name(value)}.", "stop"
        )
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid_request(
            f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}.", "stop"
        )
    for s in stops:
        if not isinstance(s, str) or not s:
            raise invalid_request("Each stop sequence must be a non-empty string.", "stop")
    return tuple(stops)


def _stop_token_ids(value: object, vocab_limit: int | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_STOP_TOKEN_IDS:
        raise invalid_request(
            f"'stop_token_ids' must be an array of at most {MAX_STOP_TOKEN_IDS} token ids.",
            "stop_token_ids",
        )
    ids = []
    for t in value:
        if isinstance(t, float) and t.is_integer():
            t = int(t)  # JSON has one number type
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (
                vocab_limit is not None and t >= vocab_limit):
            bound = "" if vocab_limit is None else f" below {vocab_limit}"
            raise invalid_request(
                f"'stop_token_ids' must hold token ids (integers >= 0{bound}), got {t!r}.",
                "stop_token_ids",
            )
        ids.append(t)
    return tuple(dict.fromkeys(ids))


def _sampling(body: dict, vocab_limit: int | None, defaults: Mapping[str, Any]) -> SamplingParams:
    """The sampling fields, checked by the sampler (its SAMPLING_RANGES are the single source);
    those omitted or null take `defaults`' values where it has them."""
    fields = {name: body.get(name) for name in _SAMPLING_FIELDS}
    fields.update({k: v for k, v in defaults.items() if k in fields and fields[k] is None})
    for name in ("top_k", "seed"):
        value = fields[name]
        # JSON has one number type: 3.0 is the integer 3 (as in JSON Schema), 3.5 is not.
        if isinstance(value, float) and value.is_integer():
            fields[name] = int(value)
    if fields["logit_bias"] is not None:
        _require_dict(fields["logit_bias"], "logit_bias")  # the sampler also takes pairs; JSON not
    try:
        return validate_sampling_params(fields, vocab_limit=vocab_limit)
    except SamplingParamError as e:
        raise invalid_request(str(e) + ".", e.param) from None


def _tools(value: object) -> tuple[dict, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise invalid_request(f"'tools' must be an array, got {_type_name(value)}.", "tools")
    seen: set[str] = set()
    for i, tool in enumerate(value):
        p = f"tools[{i}]"
        _require_dict(tool, p)
        if tool.get("type") != "function":
            raise invalid_request(
                f"'{p}.type' must be 'function' (the only supported tool type).", f"{p}.type"
            )
        fn = _require_dict(tool.get("function"), f"{p}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise invalid_request(
                f"'{p}.function.name' must be 1-64 characters of a-z, A-Z, 0-9, _ or -.",
                f"{p}.function.name",
            )
        if name in seen:
            raise invalid_request(f"Duplicate tool name {name!r}.", f"{p}.function.name")
        seen.add(name)
        _optional_string(fn.get("description"), f"{p}.function.description")
        if fn.get("parameters") is not None:
            params = _require_dict(fn["parameters"], f"{p}.function.parameters")
            # OpenAI's rule: the arguments of a call are a JSON object.
            if params.get("type", "object") != "object":
                raise invalid_request(
                    f"Invalid schema for function {name!r}: 'parameters' must be a JSON Schema of "
                    f"type 'object', got type {params['type']!r}.",
                    f"{p}.function.parameters",
                )
        _optional_bool(fn.get("strict"), f"{p}.function.strict", False)
    return tuple(value) or None  # an empty list means no tools


def _tool_choice(value: object, tools: tuple[dict, ...] | None) -> str | dict:
    if value is None:
        return "auto" if tools else "none"
    if isinstance(value, str):
        if value not in TOOL_CHOICE_MODES:
            raise invalid_request(
                f"'tool_choice' must be one of {', '.join(TOOL_CHOICE_MODES)} or a named function, "
                f"got {value!r}.",
                "tool_choice",
            )
        if value == "required" and not tools:
            raise invalid_request("'tool_choice' 'required' needs 'tools'.", "tool_choice")
        # Without tools "auto" can only mean "none"; one canonical value for the server.
        return value if tools else "none"
    _require_dict(value, "tool_choice")
    if value.get("type") != "function":
        raise invalid_request("'tool_choice.type' must be 'function'.", "tool_choice.type")
    fn = _require_dict(value.get("function"), "tool_choice.function")
    name = fn.get("name")
    if not isinstance(name, str):
        raise invalid_request(
            "'tool_choice.function.name' must be a string.", "tool_choice.function.name"
        )
    names = [t["function"]["name"] for t in tools or ()]
    if name not in names:
        raise invalid_request(
            f"'tool_choice' names function {name!r}, which is not in 'tools'"
            + (f" ({', '.join(names)})." if names else " (no tools were given)."),
            "tool_choice",
        )
    return {"type": "function", "function": {"name": name}}


def _response_format(value: object) -> dict | None:
    if value is None:
        return None
    _require_dict(value, "response_format")
    kind = value.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise invalid_request(
            f"'response_format.type' must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, "
            f"got {kind!r}.",
            "response_format.type",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    js = _require_dict(value.get("json_schema"), "response_format.json_schema")
    schema = js.get("schema")
    if not isinstance(schema, dict):
        raise invalid_request(
            "'response_format.json_schema.schema' must be a JSON Schema object.",
            "response_format.json_schema.schema",
        )
    name = js.get("name", "response")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise invalid_request(
            "'response_format.json_schema.name' must be 1-64 characters of a-z, A-Z, 0-9, _ or -.",
            "response_format.json_schema.name",
        )
    strict = _optional_bool(js.get("strict"), "response_format.json_schema.strict", False)
    out = {"name": name, "schema": schema, "strict": strict}
    if js.get("description") is not None:
        out["description"] = _optional_string(
            js["description"], "response_format.json_schema.description"
        )
    return {"type": "json_schema", "json_schema": out}


# Options of vLLM's structured_outputs that change nothing here: qwen-jax's JSON grammars
# never allow free whitespace, and there is no other grammar backend to fall back to.
_STRUCTURED_NOOPS = ("disable_any_whitespace", "disable_fallback")


def _structured_output(body: dict, response_format: dict | None) -> StructuredOutput | None:
    """vLLM's structured outputs, from `structured_outputs` or the top-level `guided_*` fields:
    at most one, and not beside a (non-text) `response_format`. What qwen-jax cannot do (a
    grammar, a whitespace pattern) is refused rather than ignored, so no client takes free text
    for constrained output."""
    found: list[StructuredOutput] = []
    options = body.get("structured_outputs")
    if options is not None:
        for key, value in _require_dict(options, "structured_outputs").items():
            param = f"structured_outputs.{key}"
            if value is None or key in _STRUCTURED_NOOPS:
                _optional_bool(value, param, False)
                continue
            if key == "json_object":
                if _optional_bool(value, param, False):
                    found.append(StructuredOutput("json", {"type": "object"}, param))
            elif key in STRUCTURED_KINDS:
                found.append(_structured(key, value, param))
            else:
                raise invalid_request(
                    f"'{param}' is not supported (only json, regex, choice and json_object).",
                    param)
    for kind in STRUCTURED_KINDS:
        if body.get(f"guided_{kind}") is not None:
            found.append(_structured(kind, body[f"guided_{kind}"], f"guided_{kind}"))
    for name in ("guided_grammar", "guided_whitespace_pattern"):
        if body.get(name) is not None:
            raise invalid_request(f"'{name}' is not supported (use guided_json, guided_regex "
                                  "or guided_choice).", name)
    given = ["response_format"] * (response_format is not None) + [f.param for f in found]
    if len(given) > 1:
        raise invalid_request(f"'{given[0]}' and '{given[1]}' both constrain the reply: give "
                              "one.", given[1])
    return found[0] if found else None


def _structured(kind: str, value: object, param: str) -> StructuredOutput:
    if kind == "json":
        if isinstance(value, str):  # vLLM takes the schema's JSON text too
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise invalid_request(f"'{param}' is not valid JSON.", param) from None
            check_json_values({param: value})
        if not isinstance(value, dict):
            raise invalid_request(f"'{param}' must be a JSON schema (an object, or its JSON "
                                  f"text), got {_type_name(value)}.", param)
    elif kind == "regex":
        if not isinstance(value, str) or not value:
            raise invalid_request(f"'{param}' must be a regular expression (a non-empty "
                                  "string).", param)
    elif (not isinstance(value, list) or not value
          or not all(isinstance(c, str) and c for c in value)):
        raise invalid_request(f"'{param}' must be a non-empty list of non-empty strings.", param)
    else:
        value = tuple(value)
    return StructuredOutput(kind, value, param)


# JSON nests no deeper than this in a request. Tool parameter schemas are the deep part and real
# ones stay far below it; deeper bodies would run Python's recursion limit out in the JSON
# encoder, the chat template or the grammar compiler (a 500 instead of an answer).
MAX_JSON_DEPTH = 128
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _path_text(path: str) -> str:
    """A field path fit for an error message: lone surrogates written as \\udXXX escapes."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def check_json_values(body: object) -> None:
    """Reject what JSON can carry but a prompt cannot: nesting deeper than MAX_JSON_DEPTH, a
    string or key holding a lone UTF-16 surrogate (`"\\ud800"` is valid JSON but not Unicode
    text, and no tokenizer takes it; a surrogate pair decodes to one character and passes), and
    NaN or Infinity inside a field (Python's JSON parser takes them, a schema compiler reads
    them as null; a top-level number's own range check names it)."""
    stack: list[tuple[object, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            field = _path_text(re.split(r"[.\[]", path, maxsplit=1)[0])  # the top-level field
            raise invalid_request(
                f"'{field}' nests JSON deeper than {MAX_JSON_DEPTH} levels.", field
            )
        if isinstance(value, str):
            found = _LONE_SURROGATE.search(value)
            if found:
                code = f"\\u{ord(found.group()):04x}"
                raise invalid_request(
                    f"'{_path_text(path)}' contains a lone UTF-16 surrogate ({code}), which is "
                    "not valid Unicode text.",
                    _path_text(path),
                )
        elif isinstance(value, float) and not math.isfinite(value) and depth > 1:
            raise invalid_request(
                f"'{_path_text(path)}' is {value}, which is not JSON.", _path_text(path))
        elif isinstance(value, dict):
            items = [(f"{path}.{k}" if path else k, v) for k, v in value.items()]
            for sub, _ in items:
                if _LONE_SURROGATE.search(sub):
                    raise invalid_request(
                        f"The key '{_path_text(sub)}' contains a lone UTF-16 surrogate, which "
                        "is not valid Unicode text.",
                        _path_text(sub),
                    )
            stack.extend((v, sub, depth + 1) for sub, v in reversed(items))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in reversed(list(
                enumerate(value))))


class _ReadFields(dict):
    """A request body that notes which of its fields were looked up."""

    def __init__(self, body: dict):
        super().__init__(body)
        self.read: set[object] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(key)
        return super().__contains__(key)


def validate_chat_request(
    body: object, *, served_model_name: str, vocab_limit: int | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> ChatRequest:
    """Check a decoded request body and fill in defaults; raise APIError on the first problem.

    `defaults`: values for the sampling fields and `max_tokens` when the request omits them (the
    model's generation_config.json, generation_config.py), instead of the API's own."""
    defaults = defaults or {}
    if not isinstance(body, dict):
        raise invalid_request(f"The request body must be a JSON object, got {_type_name(body)}.")
    body = _ReadFields(body)
    check_json_values(body)
    model = body.get("model")
    if model is None:
        raise missing_parameter("model")
    if not isinstance(model, str):
        raise invalid_request(f"'model' must be a string, got {_type_name(model)}.", "model")
    if model != served_model_name:
        raise model_not_found(model)
    messages = _messages(body.get("messages"))

    def get(name: str) -> Any:
        value = _optional_number(body, name)
        return DEFAULTS.get(name) if value is None else value

    sampling = _sampling(body, vocab_limit, defaults)
    n = get("n")
    max_tokens, max_completion_tokens = get("max_tokens"), get("max_completion_tokens")
    if max_completion_tokens is not None:  # OpenAI's newer name wins
        max_tokens = max_completion_tokens
    if max_tokens is None:
        max_tokens = defaults.get("max_tokens")
    logprobs = _optional_bool(body.get("logprobs"), "logprobs", False)
    top_logprobs = get("top_logprobs")
    if top_logprobs and not logprobs:
        raise invalid_request("'top_logprobs' needs 'logprobs' set to true.", "top_logprobs")

    stream = _optional_bool(body.get("stream"), "stream", False)
    stream_options = body.get("stream_options")
    if stream_options is not None:
        _require_dict(stream_options, "stream_options")
        if not stream:  # as OpenAI and vLLM answer: the options would silently do nothing
            raise invalid_request(
                "'stream_options' is only allowed when 'stream' is true.", "stream_options"
            )
    include_usage = _optional_bool(
        (stream_options or {}).get("include_usage"), "stream_options.include_usage", False
    )
    tools = _tools(body.get("tools"))
    # OpenAI's deprecated function calling: refused rather than ignored, or the model would
    # never see the functions and answer in text as if there were none.
    legacy = ("functions" if body.get("functions") not in (None, []) else
              "function_call" if body.get("function_call") not in (None, "none", "auto")
              else None)
    if legacy:
        raise invalid_request(
            f"'{legacy}' (OpenAI's deprecated function calling) is not supported: use 'tools' "
            "and 'tool_choice'.", legacy
        )
    _refuse_unsupported(body)
    response_format = _response_format(body.get("response_format"))
    structured_output = _structured_output(body, response_format)
    add_generation_prompt = _optional_bool(body.get("add_generation_prompt"),
                                           "add_generation_prompt", True)
    continue_final_message = _optional_bool(body.get("continue_final_message"),
                                            "continue_final_message", False)
    if continue_final_message and body.get("add_generation_prompt") is True:
        raise invalid_request(  # vLLM's words: the two ask for different prompt ends
            "Cannot set both 'continue_final_message' and 'add_generation_prompt' to true.",
            "continue_final_message",
        )
    return ChatRequest(
        model=model,
        messages=messages,
        tools=tools,
        tool_choice=_tool_choice(body.get("tool_choice"), tools),
        parallel_tool_calls=_optional_bool(
            body.get("parallel_tool_calls"), "parallel_tool_calls", True
        ),
        response_format=response_format,
        stream=stream,
        include_usage=include_usage,
        n=n,
        max_tokens=max_tokens,
        stop=_stop(body.get("stop")),
        sampling=sampling,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        user=_optional_string(body.get("user"), "user"),
        stop_token_ids=_stop_token_ids(body.get("stop_token_ids"), vocab_limit),
        ignore_eos=_optional_bool(body.get("ignore_eos"), "ignore_eos", False),
        min_tokens=get("min_tokens") or 0,
        include_stop_str_in_output=_optional_bool(
            body.get("include_stop_str_in_output"), "include_stop_str_in_output", False
        ),
        add_generation_prompt=add_generation_prompt and not continue_final_message,
        continue_final_message=continue_final_message,
        structured_output=structured_output,
        ignored_fields=tuple(sorted(k for k in body if k not in body.read)),
    )


# Options of OpenAI's or vLLM's API that this server cannot honour, with the values that ask for
# nothing: ignoring them would answer something other than what was asked, so they are a 400.
# (Unknown fields and hints such as `store`, `prediction` or `service_tier` are ignored.)
UNSUPPORTED: dict[str, tuple] = {
    "echo": (None, False),  # vLLM: prepend the last message to the reply
    "use_beam_search": (None, False),  # vLLM
    "best_of": (None, 1),  # vLLM
    "prompt_logprobs": (None,),  # vLLM
    "chat_template": (None,),  # vLLM: a template sent with the request
    "audio": (None,),  # OpenAI: spoken replies
    "modalities": (None, ["text"]),
}


def _refuse_unsupported(body: dict) -> None:
    for name, accepted in UNSUPPORTED.items():
        value = body.get(name)
        # JSON equality, as the spec's enums: 1.0 is 1, but true is not 1 nor false 0.
        if not any(value == a and isinstance(value, bool) == isinstance(a, bool)
                   for a in accepted):
            shown = json.dumps(value, ensure_ascii=False)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise invalid_request(f"'{name}' is not supported by this server (got {shown}).",
                                  name)


def resolve_max_tokens(requested: int | None, prompt_tokens: int, max_model_len: int) -> int:
    """Tokens a choice may generate: the request's limit clamped to the rest of the context."""
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise context_length_exceeded(prompt_tokens, max_model_len)
    return room if requested is None else min(requested, room)
