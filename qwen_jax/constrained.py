"""Constrained decoding with llguidance: JSON mode, JSON schema, forced tool calls, and vLLM's
structured outputs (a JSON schema, a regular expression or a choice of strings).

The server turns a request's `response_format` / `tool_choice` / structured output into an
llguidance grammar (`grammar_for`), then gives the engine one `GrammarConstraint` per choice. The
engine asks each constraint for the allowed token ids before a step (`allowed_tokens()`, a bool
mask over the tokenizer's ids; it includes EOS exactly when the grammar may end) and feeds the
sampled token back (`advance(token)`).

Why no free whitespace: with random (or weak) weights a JSON grammar that allows whitespace
between tokens can emit whitespace until max_tokens. We compile JSON with fixed separators
(", " and ": ", the way `json.dumps` and the Qwen chat template write JSON) and no optional
whitespace, so every step must make progress. A schema's own `"x-guidance"` options still win.

Forced tool calls (tool_choice "required" or a named function) follow Qwen2.5's own format:
    <tool_call>\n{"name": "<fn>", "arguments": {...}}\n</tool_call>
with `<tool_call>` / `</tool_call>` as their single added tokens; several calls separated by "\n"
when parallel_tool_calls and tool_choice is "required"; then EOS.

Schemas are compiled leniently (llguidance's `lenient`: keywords it cannot enforce, such as
`uniqueItems` or `not`, are ignored, the rest enforced) unless the request says `strict: true`
(on `response_format.json_schema` or on the function), where such a keyword is a 400 instead:
strict asks for output that follows the whole schema. Tool schemas are checked whatever the
tool_choice (`check_tool_schemas`): an invalid schema (an unknown type, a `$ref` to nothing) is a
400 even where no call is forced, as OpenAI answers it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import llguidance
import numpy as np

from qwen_jax.engine import RequestError
from qwen_jax.protocol import StructuredOutput

# JSON layout options (llguidance JsonCompileOptions): compact, deterministic separators.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class ConstraintError(ValueError):
    """A grammar that cannot be built (a bad schema: a 400 naming `param`) or a token the
    grammar rejects (param None: the engine sampled outside the mask, a bug)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class GrammarDeadEnd(RequestError, ConstraintError):
    """The grammar cannot go on before it is complete: the request's schema has no value that
    can be generated (a 400 naming `param`, even when found mid-generation)."""


def _backend_json(tokenizer: Any) -> str:
    """The tokenizer.json text of a `tokenizers.Tokenizer` or of a wrapper holding one."""
    if hasattr(tokenizer, "to_str"):
        return tokenizer.to_str()
    for name in ("backend", "tokenizer", "_tokenizer", "_tok", "hf_tokenizer"):
        inner = getattr(tokenizer, name, None)
        if inner is not None and hasattr(inner, "to_str"):
            return inner.to_str()
    raise TypeError(f"cannot find a tokenizers.Tokenizer inside {type(tokenizer).__name__}")


def build_ll_tokenizer(
    tokenizer: Any, eos_token_ids: list[int] | None = None
) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer (about 1-2 s to build: do it once per server)."""
    if eos_token_ids is None:
        eos_token_ids = list(getattr(tokenizer, "eos_token_ids", []) or [])
    return llguidance.LLTokenizer(_backend_json(tokenizer), eos_token=eos_token_ids or None)


def _options(strict: bool) -> dict[str, Any]:
    return JSON_OPTIONS if strict else {**JSON_OPTIONS, "lenient": True}


def _json_grammar(schema: dict, param: str = "response_format.json_schema.schema", *,
                  strict: bool = False) -> str:
    """The grammar of a JSON schema, checked: a schema llguidance cannot compile is an error
    naming `param` (its own message, without the grammar it was wrapped in)."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema,
                                                                defaults=_options(strict))
    except ValueError as e:
        raise ConstraintError(f"invalid JSON schema: {e}", param) from e
    error = llguidance.LLMatcher.validate_grammar(grammar)  # no tokenizer needed: ~0.2 ms
    if error:
        raise ConstraintError(f"invalid JSON schema: {error}", param)
    return grammar


def check_tool_schemas(tools: list[dict] | tuple[dict, ...]) -> None:
    """Each tool's parameters must be a JSON schema the grammar compiler takes (leniently,
    unless the function is strict), whatever the tool_choice: a bad one is named before
    anything is generated."""
    for i, tool in enumerate(tools):
        _json_grammar(_function_parameters(tool), f"tools[{i}].function.parameters",
                      strict=_is_strict(tool))


def _is_strict(tool: dict) -> bool:
    return tool["function"].get("strict") is True


def _function_parameters(tool: dict) -> dict:
    params = tool["function"].get("parameters")
    # OpenAI: omitting `parameters` defines a function with an empty parameter list.
    if params is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return params


def tool_call_lark(tools: list[dict], *, several: bool) -> str:
    """Lark grammar (llguidance dialect) for one or more Qwen `<tool_call>` blocks.

    The JSON around the arguments (`{"name": "<fn>", "arguments": ` ... `}`) is literal text, and
    each function's parameters are a JSON schema of their own, so their `$ref`s ("#/$defs/...",
    "#") resolve against the parameters as the user wrote them (as pydantic writes them)."""
    lines = ['start: call ("\\n" call)*' if several else "start: call",
             'call: <tool_call> "\\n" body "\\n" </tool_call>',
             "body: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        head = json.dumps(f'{{"name": {json.dumps(tool["function"]["name"])}, "arguments": ')
        schema = {"x-guidance": _options(_is_strict(tool)),
                  **_function_parameters(tool)}  # their own "x-guidance" wins
        lines += [f'call_{i}: {head} args_{i} "}}"', f"args_{i}: %json {json.dumps(schema)}"]
    return "\n".join(lines)


def grammar_for(
    response_format: dict | None = None,
    tools: list[dict] | tuple[dict, ...] | None = None,
    tool_choice: str | dict = "none",
    parallel_tool_calls: bool = True,
    structured: StructuredOutput | None = None,
) -> str | None:
    """The llguidance grammar a request needs, or None for free text.

    A forced tool call (tool_choice "required" or {"type": "function", ...}) wins over
    response_format and vLLM's structured outputs (`structured`; the request has one of those
    two at most), since the answer is then a call and not a message. tool_choice "auto" and
    "none" never constrain (the model may still write a call under "auto"; see server.py for
    how "none" is handled).
    """
    tools = list(tools or [])
    if tools and tool_choice == "required":
        return llguidance.LLMatcher.grammar_from_lark(
            tool_call_lark(tools, several=parallel_tool_calls)
        )
    if tools and isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise ConstraintError(f"tool_choice names unknown function {name!r}", "tool_choice")
        return llguidance.LLMatcher.grammar_from_lark(tool_call_lark(chosen, several=False))
    if structured is not None:
        return _structured_grammar(structured)
    if response_format is None or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return _json_grammar({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise ConstraintError(
                "response_format.json_schema.schema must be an object",
                "response_format.json_schema.schema",
            )
        return _json_grammar(schema, strict=spec.get("strict") is True)
    raise ConstraintError(f"unsupported response_format type {kind!r}", "response_format.type")


def _structured_grammar(structured: StructuredOutput) -> str:
    """The grammar of vLLM's structured output: a JSON schema (compiled like response_format's),
    a regular expression (llguidance's syntax: Rust's regex crate, no lookaround or
    backreferences; `\\d` and `\\w` ASCII, as in a JSON schema's `pattern` and in JavaScript,
    whose regexes vLLM's default backend follows: Rust's match any Unicode digit, so `\\d{5}`
    wrote Arabic-Indic digits), or a choice among literal strings."""
    kind, value, param = structured.kind, structured.value, structured.param
    if kind == "json":
        return _json_grammar(value, param)
    if kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(llguidance.regex_to_lark(value, "dw"))
    else:
        # One terminal matching any of the literals (written as JSON strings, escapes included):
        # the lexer's automaton, rather than a parser rule of alternatives, whose items in one
        # row the parser caps (2,001 choices were refused).
        grammar = llguidance.LLMatcher.grammar_from_lark(
            "start: CHOICE\nCHOICE: " + " | ".join(json.dumps(choice) for choice in value))
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        # The regex parser's own words are on the line starting "error:", after a drawing.
        why = next((line[len("error:"):].strip() for line in error.splitlines()
                    if line.startswith("error:")), _first_line(error))
        raise ConstraintError(f"invalid {kind} {value!r}: {why}", param)
    return grammar


def _first_line(error: str) -> str:
    return (error.strip().splitlines() or ["unknown error"])[0].strip()


def _first_error_line(matcher: llguidance.LLMatcher) -> str:
    """The matcher's error without what follows its first line (the grammar's listing or a
    dump of the parser's state)."""
    return _first_line(matcher.get_error())


@functools.lru_cache(maxsize=8)
def _special_ids(ll_tokenizer: llguidance.LLTokenizer) -> np.ndarray:
    """Ids of the tokens llguidance treats as special: the added tokens (and the byte 0xFF,
    its marker of special tokens, which no UTF-8 text holds)."""
    return np.array([i for i in range(ll_tokenizer.vocab_size)
                     if ll_tokenizer.is_special_token(i)], dtype=np.int64)


class GrammarConstraint:
    """One choice's grammar state: the engine's view of an `llguidance.LLMatcher`."""

    def __init__(self, matcher: llguidance.LLMatcher, ll_tokenizer: llguidance.LLTokenizer,
                 param: str | None = None):
        self._matcher = matcher
        self._tokenizer = ll_tokenizer
        self._vocab_size = ll_tokenizer.vocab_size
        self._specials = _special_ids(ll_tokenizer)
        self._eos = frozenset(ll_tokenizer.eos_tokens)
        self._param = param  # the request field the grammar came from

    def allowed_tokens(self) -> np.ndarray:
        """bool[vocab_size] over the tokenizer's ids; EOS is set when the grammar may end.

        A schema with no finite value raises GrammarDeadEnd naming the request field: the
        request's fault, found only while generating (`_matcher_error`)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self._vocab_size].astype(bool)
        if self._matcher.is_error():
            raise self._matcher_error("grammar error")
        return self._without_stray_specials(mask)

    def _matcher_error(self, what: str) -> ConstraintError:
        """The matcher's error: GrammarDeadEnd, naming the request field, when the request's
        grammar cannot be followed to its end: llguidance finds nothing that can follow before
        it is complete (a property that is itself), or its parser or lexer passes a limit (the
        text a required property that is the whole schema again forces never ends; a regex
        such as ((a{1000}){1000}){1000}; a parser row of more items than PARSER_LIMITS
        allows); else a plain ConstraintError, a server error (the
        engine sampling outside the mask, a bug in llguidance)."""
        first = _first_error_line(self._matcher)
        if self._param is not None:
            if first == "NoExtensionBias":
                return GrammarDeadEnd(
                    f"{self._param} admits no value that can be generated: after the output so "
                    "far no token can follow", self._param)
            if "too many" in first.lower() or "; max is" in first:
                return GrammarDeadEnd(
                    f"{self._param} admits no value that can be generated within the grammar "
                    f"engine's limits ({first})", self._param)
        return ConstraintError(f"{what}: {first}")

    def _without_stray_specials(self, mask: np.ndarray) -> np.ndarray:
        """Where the grammar forces text such as "<tool_call>" or "<|im_end|>" (a schema's
        `const`), llguidance tokenizes that text into the added token of the same spelling and
        offers only that token, which its own parser then rejects: it expects the text's
        bytes, not the special token (a `<tool_call>` a tool grammar names is accepted, and
        EOS where the grammar may end). Such a token is dropped, and when nothing is left, the
        first token of the forced text's plain (greedy) tokenization is offered instead."""
        specials = self._specials[mask[self._specials]].tolist()
        # EOS is fine where the grammar may end (validate_tokens does not take EOS).
        stray = [i for i in specials if not (self._matcher.is_accepting() if i in self._eos
                                             else self._matcher.validate_tokens([i]))]
        if not stray:
            return mask
        mask[stray] = False
        if not mask.any():
            forced = self._matcher.compute_ff_bytes().decode("utf-8", "ignore")
            plain = self._tokenizer.greedy_tokenize(forced)[:1]
            if not plain or not self._matcher.validate_tokens(plain):
                raise ConstraintError(f"no token can write the forced text {forced!r}")
            mask[plain[0]] = True
        return mask

    def advance(self, token: int) -> None:
        # The engine samples inside allowed_tokens(): a rejected token is its bug, unless the
        # matcher passed a limit (_matcher_error).
        if not self._matcher.consume_token(int(token)):
            raise self._matcher_error(f"token {token} rejected by the grammar")

    def is_finished(self) -> bool:
        """True once only EOS can follow (the grammar is complete and cannot be extended)."""
        return self._matcher.is_stopped()

    def fork(self) -> GrammarConstraint:
        """An independent copy (for the other choices of an n > 1 request)."""
        return GrammarConstraint(self._matcher.deep_copy(), self._tokenizer, self._param)


# llguidance's parser limits, with more items in one row of the parser than its default 2,000: an
# object of a few hundred optional properties (a form) needs ~4 each, and the row limit is not in
# the token masks, so a token they allowed was then rejected. A step still processes at most
# step_max_items (50,000) items, which bounds the time per token.
PARSER_LIMITS = llguidance.LLParserLimits(max_items_in_row=50_000)


def make_constraint(
    ll_tokenizer: llguidance.LLTokenizer, grammar: str, param: str | None = "response_format"
) -> GrammarConstraint:
    """Compile `grammar` for this tokenizer; a bad grammar, or one that allows no first token,
    raises ConstraintError (-> HTTP 400)."""
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0, limits=PARSER_LIMITS)
    if matcher.is_error():
        raise ConstraintError(f"cannot build the grammar: {_first_error_line(matcher)}", param)
    constraint = GrammarConstraint(matcher, ll_tokenizer, param)
    constraint.allowed_tokens()  # a dead end at the start is a 400 before anything streams
    return constraint


def make_constraints(
    ll_tokenizer: llguidance.LLTokenizer,
    grammar: str | None,
    n: int,
    param: str | None = "response_format",
) -> list[GrammarConstraint] | None:
    """One fresh constraint per choice, or None when the request is unconstrained."""
    if grammar is None:
        return None
    first = make_constraint(ll_tokenizer, grammar, param)
    return [first] + [first.fork() for _ in range(n - 1)]
