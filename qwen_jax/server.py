"""The OpenAI-compatible HTTP server: a plain WSGI app, served by httpd.py's threaded wsgiref
server (launch.py's `serve` builds and runs it).

Request path: body -> protocol.validate_chat_request -> chat_template.render_chat -> tokenize ->
protocol.resolve_max_tokens -> engine.submit -> token events -> per-choice text pipeline
(incremental detokenizer -> MarkupSplitter: message text vs tool-call markup -> stop strings on the
text -> tool-call parser) -> JSON or server-sent events.

Every client error is an OpenAI error object with the right status; anything unexpected is a 500
with a generic message (the traceback goes to the log, never to the client).

tool_choice "none" with tools (following vLLM's default): the tools are still rendered into the
prompt, nothing is forced, and the output is returned as plain `content` (never parsed into
tool_calls). "auto": free generation, `<tool_call>` blocks in the output become tool_calls.
"required" / a named function: constrained decoding (constrained.py) guarantees a call whose
arguments match the function's parameters schema.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from qwen_jax import protocol, responses
from qwen_jax.chat_template import ChatTemplateError, render_chat
from qwen_jax.constrained import (
    ConstraintError,
    build_ll_tokenizer,
    check_tool_schemas,
    grammar_for,
    make_constraints,
)
from qwen_jax.cors import CorsPolicy
from qwen_jax.engine import (
    SHUTDOWN_ERROR,
    EngineClosedError,
    GenerationRequest,
    QueueFullError,
    TokenEvent,
)
from qwen_jax.httpd import CLIENT_GONE, read_body
from qwen_jax.stop_strings import StopStringMatcher
from qwen_jax.tool_calls import MarkupSplitter, StreamingToolCallParser, parse_tool_calls

log = logging.getLogger("qwen_jax.server")

MAX_BODY_BYTES = 4 * 1024 * 1024

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


# ---------------------------------------------------------------------------------------------
# Errors


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Error"


# ---------------------------------------------------------------------------------------------
# Token bytes for logprobs (byte-level BPE: each vocabulary character stands for one byte)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # GPT-2's bytes_to_unicode table, inverted: printable bytes map to themselves, the others to
    # code points from 256 on, in byte order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Token id -> (text, raw bytes) for logprobs; cached (the same ids come back often)."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._added = {i: t.content for i, t in tokenizer.added_tokens.items()}
        self.get = lru_cache(maxsize=65536)(self._get)

    def _get(self, token_id: int) -> tuple[str, bytes]:
        if token_id in self._added:
            raw = self._added[token_id].encode()
        else:
            piece = self._tok.id_to_token(token_id) or ""
            table = _byte_decoder()
            raw = bytes(table[c] for c in piece if c in table)
        return raw.decode("utf-8", errors="replace"), raw

    def entry(self, token: int, logprob: float, top: Iterable[tuple[int, float]]):
        text, raw = self.get(int(token))
        alts = []
        for t, lp in top:
            ttext, traw = self.get(int(t))
            alts.append(responses.TokenLogprob(ttext, float(lp), traw))
        return responses.TokenLogprob(text, float(logprob), raw, alts)


# ---------------------------------------------------------------------------------------------
# One choice's text pipeline: ids -> text -> stop strings -> content / tool-call deltas


@dataclass
class ChoiceState:
    """Turns one choice's token events into OpenAI deltas (shared by streaming and JSON)."""

    index: int
    detok: Any
    stops: StopStringMatcher
    tool_parser: StreamingToolCallParser | None
    markup: MarkupSplitter | None  # with tool_parser: stop strings skip tool-call markup
    eos_ids: frozenset[int]
    want_logprobs: bool
    top_logprobs: int
    token_text: TokenText | None
    min_tokens: int = 0  # no stop string may end in the text of the first min_tokens
    # The request's stop_token_ids (vLLM's): the choice's last token, whose text is dropped
    # unless include_stop (as vLLM does); the EOS ids are never text.
    stop_ids: frozenset[int] = frozenset()
    include_stop: bool = False
    stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string that ended it
    text: str = ""  # everything emitted so far (after stop strings), tool-call markup included
    completion_tokens: int = 0
    finish_reason: str | None = None
    made_tool_calls: bool = False
    logprob_entries: list = field(default_factory=list)
    error: str | None = None
    error_param: str | None = None  # the request's fault: a 400 naming it

    def error_object(self) -> protocol.APIError:
        """What the client is told about this choice's error."""
        if self.error_param is not None:
            return protocol.invalid_request(self.error or "invalid request", self.error_param)
        if self.error == SHUTDOWN_ERROR:
            return protocol.shutting_down()
        return protocol.server_error()

    def _route(self, text: str, final: bool) -> list[dict]:
        """Safe text -> deltas (content, or tool calls when the request has tools)."""
        self.text += text
        if self.tool_parser is None:
            return [{"content": text}] if text else []
        deltas = list(self.tool_parser.feed(text)) if text else []
        if final:
            deltas += list(self.tool_parser.finish())
        if any("tool_calls" in d for d in deltas):
            self.made_tool_calls = True
        return deltas

    def feed(self, token: int | None, logprob: float | None, top) -> tuple[list[dict], bool]:
        """One sampled token -> (deltas, stop string hit?)."""
        if token is None:
            return [], False
        self.completion_tokens += 1
        if token in self.stop_ids:
            self.stop_reason = token
        if token in self.eos_ids or (token in self.stop_ids and not self.include_stop):
            return [], False  # counts in usage, is not text
        if self.want_logprobs and self.token_text is not None:
            alts = list(top or ())[: self.top_logprobs]
            self.logprob_entries.append(self.token_text.entry(token, logprob or 0.0, alts))
        return self._push(self.detok.feed(token), end=False)

    def _push(self, text: str, end: bool) -> tuple[list[dict], bool]:
        """Text -> stop strings -> deltas; `end` flushes what was held back.

        Stop strings are matched in the message text, not inside tool-call markup: a stop such
        as "\n" would otherwise cut a (possibly forced) call in half and leave its markup."""
        if self.markup is None:
            pieces = [(False, text)]
        else:
            pieces = self.markup.feed(text) + (self.markup.finish() if end else [])
        deltas: list[dict] = []
        for is_markup, piece in pieces:
            if is_markup:
                # Held-back text cannot grow into a stop string across a tag: release it.
                deltas += self._route(self.stops.flush() + piece, final=False)
                continue
            # Before min_tokens no stop string may end (as vLLM), but one may begin there.
            safe, hit = self.stops.push(piece, match=self.completion_tokens > self.min_tokens)
            if hit:
                return deltas + self._route(safe, final=True), True
            deltas += self._route(safe, final=False)
        if end:
            deltas += self._route(self.stops.flush(), final=True)
        return deltas, False

    def finish(self, reason: str) -> list[dict]:
        """End of this choice: flush held-back text; returns the last deltas."""
        if reason == "stop_string":
            reason = "stop"
            deltas = self._route("", final=True)
        else:
            # Text held back to the end (whitespace before a possible tool call) may hold a
            # stop string: the reply ended there, whatever else ended the generation.
            deltas, hit = self._push(self.detok.finish(), end=True)
            if hit and reason == "length":
                reason = "stop"
        if self.stops.matched is not None:
            self.stop_reason = self.stops.matched
        if reason == "cancelled":
            reason = "stop"
        if self.made_tool_calls and reason == "stop":
            reason = "tool_calls"
        self.finish_reason = reason
        return deltas

    def take_logprobs(self, null_if_none: bool = False) -> dict | None:
        """The logprobs of the tokens since the last call (a stream chunk's: None when there
        are none, as on a chunk that only ends the choice)."""
        if not self.want_logprobs or (null_if_none and not self.logprob_entries):
            return None
        entries, self.logprob_entries = self.logprob_entries, []
        return responses.logprobs_content(entries)


# ---------------------------------------------------------------------------------------------
# The WSGI application


@dataclass
class App:
    engine: Any
    tokenizer: Any
    served_model_name: str
    max_model_len: int
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    ll_tokenizer: Any = None
    cors: CorsPolicy = field(default_factory=CorsPolicy)
    # Values for the sampling fields and max_tokens a request omits (generation_config.py).
    sampling_defaults: Mapping[str, Any] = field(default_factory=dict)
    # The prompt renderer: Qwen2.5-Instruct's, or the snapshot's own template (jinja_template.py).
    render_prompt: Callable[..., str] = render_chat
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.eos_ids = frozenset(self.tokenizer.eos_token_ids)
        self.token_text = TokenText(self.tokenizer)
        self._ll_lock = threading.Lock()
        self._busy = 0  # requests whose reply is not yet written (see wait_idle)
        self._idle = threading.Condition()

    # -- plumbing --------------------------------------------------------------------------

    def _ll(self):
        # llguidance's tokenizer takes ~1-2 s to build: only when a request first needs it.
        with self._ll_lock:
            if self.ll_tokenizer is None:
                self.ll_tokenizer = build_ll_tokenizer(self.tokenizer)
            return self.ll_tokenizer

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every reply begun has been written (the server closes each one's body
        after writing it), at most `timeout` seconds; whether it was."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def _done(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        with self._idle:
            self._busy += 1
        try:
            body = self._respond(environ, start_response)
        except BaseException:
            self._done()
            raise
        return _LoggedStream(body, self._done)

    def _respond(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        t0 = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        if path.startswith(("http://", "https://")):  # absolute-form target (RFC 9112 3.2.2)
            path = urlsplit(path).path or "/"
        # OpenAI answers every request with an x-request-id (the SDK's `_request_id`); the log
        # line carries it too, to find a client's request in the log.
        meta: dict[str, Any] = {"prompt": 0, "completion": 0,
                                "request_id": f"req_{uuid.uuid4().hex}"}
        try:
            status, headers, body = self._dispatch(environ, method, path, meta)
        except protocol.APIError as e:
            status, headers, body = e.status, [], _json_bytes(e.to_dict())
            if e.status == 405:
                headers = [("Allow", meta.get("allow", "GET"))]
            if e.status in (429, 503):  # the queue drains as requests finish; another replica
                headers = [("Retry-After", "1")]  # or a restart takes over from one shutting down
        except Exception:  # a bug, not a client error: generic 500, details in the log
            log.error("internal error on %s %s\n%s", method, path, traceback.format_exc())
            status, headers, body = 500, [], _json_bytes(protocol.server_error().to_dict())
        headers = (headers + [("X-Request-Id", meta["request_id"])]
                   + self.cors.response_headers(environ.get("HTTP_ORIGIN")))
        if status == 204:  # no body, so no Content-Type or Content-Length either
            start_response(_status_line(status), headers)
            self._log(method, path, status, meta, t0)
            return []
        if isinstance(body, bytes):
            start_response(
                _status_line(status),
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
                + headers,
            )
            self._log(method, path, status, meta, t0)
            return [] if method == "HEAD" else [body]  # HEAD: a GET's headers, without its body
        start_response(
            _status_line(status),
            [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")] + headers,
        )
        return _LoggedStream(body, lambda: self._log(method, path, status, meta, t0))

    def _log(self, method: str, path: str, status: int, meta: dict, t0: float) -> None:
        log.info(
            "%s %s %d prompt_tokens=%d completion_tokens=%d %.3fs %s",
            method, path, status, meta["prompt"], meta["completion"], time.perf_counter() - t0,
            meta["request_id"],
        )

    def _check_auth(self, environ: Environ) -> None:
        if self.api_key is None:
            return
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )
        if not ok:
            raise protocol.unauthorized(provided=bool(header))

    def _dispatch(self, environ: Environ, method: str, path: str, meta: dict):
        path = path.rstrip("/") or "/"
        routes = {
            "/health": ("GET", "HEAD"),
            "/v1/models": ("GET", "HEAD"),
            "/v1/chat/completions": ("POST",),
        }
        model_path = path.startswith("/v1/models/")
        allowed = routes.get(path, ("GET", "HEAD") if model_path else None)
        if allowed is None:
            raise protocol.path_not_found(method, path)
        if method == "OPTIONS":  # before the API key: browsers send none with a preflight
            return self._options(environ, allowed)
        if method == "HEAD" and "HEAD" in allowed:
            method = "GET"  # __call__ leaves the body out
        if method not in allowed:
            meta["allow"] = ", ".join(allowed + ("OPTIONS",))
            raise protocol.method_not_allowed(method, path, allowed + ("OPTIONS",))
        if path == "/health":
            stats = self.engine.snapshot() if hasattr(self.engine, "snapshot") else {}
            return 200, [], _json_bytes({"status": "ok", **stats})
        self._check_auth(environ)
        if path == "/v1/models":
            return 200, [], _json_bytes(self._models())
        if model_path:
            name = path[len("/v1/models/"):]
            if name != self.served_model_name:
                raise protocol.model_not_found(name)
            return 200, [], _json_bytes(self._models()["data"][0])
        return self._chat(environ, self._read_json(environ), meta)

    def _models(self) -> dict:
        return responses.model_list(self.served_model_name, self.created,
                                    max_model_len=self.max_model_len)

    def _options(self, environ: Environ, allowed: tuple[str, ...]):
        """A browser's CORS preflight (cors.py), or a plain OPTIONS: the methods the path takes."""
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ:
            headers = self.cors.preflight_headers(
                origin, environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS"))
            if headers is None:
                raise protocol.origin_not_allowed(origin)
            return 204, headers, b""
        return 204, [("Allow", ", ".join(allowed + ("OPTIONS",)))], b""

    def _read_json(self, environ: Environ) -> Any:
        ctype = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise protocol.unsupported_media_type(environ.get("CONTENT_TYPE"))
        # A compressed body would otherwise fail as JSON that is not UTF-8.
        encoding = environ.get("HTTP_CONTENT_ENCODING", "").strip()
        if encoding.lower() not in ("", "identity"):
            raise protocol.unsupported_content_encoding(encoding)
        return _parse_json(read_body(environ, self.max_body_bytes))

    # -- chat completions --------------------------------------------------------------------

    def _chat(self, environ: Environ, body: Any, meta: dict):
        req = protocol.validate_chat_request(
            body, served_model_name=self.served_model_name, vocab_limit=self.tokenizer.vocab_size,
            defaults=self.sampling_defaults,
        )
        if req.ignored_fields:  # a misspelt option would otherwise go unnoticed
            log.warning("request fields ignored (unknown to this server): %s",
                        ", ".join(req.ignored_fields))
        tools = list(req.tools) if req.tools else None
        try:
            prompt = self.render_prompt(list(req.messages), tools=tools,
                                        add_generation_prompt=req.add_generation_prompt,
                                        continue_final_message=req.continue_final_message)
        except ChatTemplateError as e:
            param = getattr(e, "param", None) or "messages"
            raise protocol.invalid_request(str(e), param) from None
        max_n = getattr(self.engine, "max_slots", None)
        if max_n is not None and req.n > max_n:
            raise protocol.invalid_request(
                f"'n' must be at most {max_n} on this server (serve --max-num-seqs), got {req.n}.",
                "n",
            )
        prompt_ids = self.tokenizer.encode(prompt)
        max_tokens = protocol.resolve_max_tokens(req.max_tokens, len(prompt_ids),
                                                 self.max_model_len)
        meta["prompt"] = len(prompt_ids)
        constraints = self._constraints(req, tools)
        # A grammar's output ends where the grammar does (the model's EOS is allowed only
        # there): stop_token_ids would cut it short and still say "stop", as stop strings would.
        stop_ids = (set() if constraints else set(req.stop_token_ids)) | (
            set() if req.ignore_eos else self.eos_ids)
        gen = GenerationRequest(
            prompt_ids=tuple(prompt_ids), sampling=req.sampling, max_tokens=max_tokens, n=req.n,
            stop_token_ids=tuple(sorted(stop_ids)), constraints=constraints,
            logprobs=req.logprobs, top_logprobs=req.top_logprobs,
            min_tokens=min(req.min_tokens, max_tokens),
        )
        try:
            # max_tokens 0 (allowed by the API) asks for nothing: answer without the engine.
            handle = _EmptyHandle(req.n) if max_tokens == 0 else self.engine.submit(gen)
        except QueueFullError:
            raise protocol.queue_full() from None
        except EngineClosedError as e:  # shutting down, or the engine failed
            raise (protocol.shutting_down() if str(e) == SHUTDOWN_ERROR
                   else protocol.server_error()) from None
        except ValueError as e:  # the engine's own checks (should have been caught above)
            raise protocol.invalid_request(str(e)) from None
        states = [self._choice_state(i, req, tools, constraints is not None)
                  for i in range(req.n)]
        cid, created = responses.new_completion_id(), int(time.time())
        gone = environ.get(CLIENT_GONE)
        if req.stream:
            return 200, [], self._stream(handle, states, req, cid, created, len(prompt_ids), meta,
                                         gone)
        done = _watch_client(handle, gone)
        try:
            return 200, [], _json_bytes(
                self._complete(handle, states, req, cid, created, len(prompt_ids), meta)
            )
        finally:
            done.set()
            handle.cancel()  # no-op when everything finished; frees rows on an exception

    def _constraints(self, req, tools):
        try:
            if tools:
                check_tool_schemas(tools)
            structured = req.structured_output
            grammar = grammar_for(req.response_format, tools, req.tool_choice,
                                  req.parallel_tool_calls, structured)
            if grammar is None:
                return None
            forced_tool = tools and req.tool_choice not in ("none", "auto")
            param = ("tools" if forced_tool else structured.param if structured
                     else "response_format")
            return make_constraints(self._ll(), grammar, req.n, param)
        except ConstraintError as e:
            raise protocol.invalid_request(str(e), e.param) from None

    def _choice_state(self, index: int, req, tools, constrained: bool) -> ChoiceState:
        parse_tools = bool(tools) and req.tool_choice != "none"
        return ChoiceState(
            index=index,
            detok=self.tokenizer.detokenizer(skip_special_tokens=True),
            # Grammar-constrained output (JSON modes, forced calls) ends where its grammar does:
            # a stop string (or stop token, below) would cut it short and still say "stop", as
            # if it were complete.
            stops=StopStringMatcher(() if constrained else req.stop,
                                    include=req.include_stop_str_in_output),
            tool_parser=StreamingToolCallParser(tools, max_calls=req.max_tool_calls)
            if parse_tools else None,
            markup=MarkupSplitter() if parse_tools else None,
            # With ignore_eos an end-of-turn token is just a token: it has a logprobs entry
            # (and no text, being special) like any other.
            eos_ids=frozenset() if req.ignore_eos else self.eos_ids,
            want_logprobs=req.logprobs,
            top_logprobs=req.top_logprobs,
            token_text=self.token_text if req.logprobs else None,
            min_tokens=req.min_tokens,
            stop_ids=frozenset(() if constrained else req.stop_token_ids) - (
                frozenset() if req.ignore_eos else self.eos_ids),
            include_stop=req.include_stop_str_in_output,
        )

    @staticmethod
    def _drive(handle, states: list[ChoiceState]) -> Iterator[tuple[ChoiceState, list[dict], bool]]:
        """Engine events -> (choice, deltas, finished?) in arrival order."""
        for ev in handle.events():
            st = states[ev.choice]
            if st.finish_reason is not None:
                continue  # a choice we already ended (stop string) may still report a cancel
            deltas, hit = st.feed(ev.token, ev.logprob, ev.top_logprobs)
            if hit:
                handle.cancel(ev.choice)
                yield st, deltas + st.finish("stop_string"), True
                continue
            if ev.finish_reason is None:
                yield st, deltas, False
                continue
            if ev.finish_reason == "error":
                st.error, st.error_param = ev.error or "generation failed", ev.error_param
                if st.error_param is None and st.error != SHUTDOWN_ERROR:
                    log.error("engine error on choice %d: %s", ev.choice, st.error)
            yield st, deltas + st.finish(ev.finish_reason), True

    def _complete(self, handle, states, req, cid, created, n_prompt, meta) -> dict:
        for _ in self._drive(handle, states):
            pass
        failed = next((st for st in states if st.error), None)
        if failed is not None:
            meta["completion"] = sum(st.completion_tokens for st in states)  # for the log line
            raise failed.error_object()
        choices = []
        for st in states:
            content: str | None = st.text
            calls = None
            if st.tool_parser is not None:
                parsed = parse_tool_calls(st.text, list(req.tools), max_calls=req.max_tool_calls)
                content, calls = parsed.content, parsed.tool_calls or None
            reason = st.finish_reason
            if calls and reason == "stop":
                reason = "tool_calls"
            choices.append(responses.choice(st.index, content, calls, reason, st.take_logprobs(),
                                            st.stop_reason))
        completion = sum(st.completion_tokens for st in states)
        meta["completion"] = completion
        return responses.completion_response(
            cid, created, self.served_model_name, choices, self._usage(handle, n_prompt, completion)
        )

    def _usage(self, handle, n_prompt: int, completion: int) -> dict:
        """The usage object; with prefix caching on, how many prompt tokens were reused."""
        cached = (getattr(handle, "cached_tokens", 0)
                  if getattr(self.engine, "prefix_caching", False) else None)
        return responses.usage(n_prompt, completion, cached_tokens=cached)

    def _stream(self, handle, states, req, cid, created, n_prompt, meta,
                gone: Callable[[], bool] | None = None) -> Iterator[bytes]:
        model = self.served_model_name
        done = _watch_client(handle, gone)

        def event(choices: list[dict], usage: dict | None = None) -> bytes:
            return responses.sse_event(responses.chunk(cid, created, model, choices, usage,
                                                       include_usage=req.include_usage))

        try:
            for st in states:
                yield event([responses.chunk_choice(st.index, {"role": "assistant",
                                                                "content": ""})])
            for st, deltas, finished in self._drive(handle, states):
                for d in deltas:
                    yield event([responses.chunk_choice(st.index, d, None,
                                                        st.take_logprobs(null_if_none=True))])
                if finished:
                    if st.error:
                        yield responses.sse_event(st.error_object().to_dict())
                        break
                    yield event([responses.chunk_choice(st.index, {}, st.finish_reason,
                                                        st.take_logprobs(null_if_none=True),
                                                        stop_reason=st.stop_reason)])
            else:
                meta["completion"] = sum(st.completion_tokens for st in states)
                if req.include_usage:
                    yield event([], self._usage(handle, n_prompt, meta["completion"]))
            yield responses.sse_event("[DONE]")
        finally:
            # Also runs on GeneratorExit when the client disconnects: free the rows at once.
            done.set()
            handle.cancel()
            meta["completion"] = sum(st.completion_tokens for st in states)  # for the log line


CLIENT_POLL_S = 0.25


def _watch_client(handle, client_gone: Callable[[], bool] | None) -> threading.Event:
    """Watch the client's socket until the returned event is set (see _cancel_when_gone)."""
    done = threading.Event()
    if client_gone is not None:
        threading.Thread(target=_cancel_when_gone, args=(handle, client_gone, done),
                         daemon=True).start()
    return done


def _cancel_when_gone(handle, client_gone: Callable[[], bool], done: threading.Event) -> None:
    """A JSON reply sends nothing until it is complete, and a stream nothing while its request
    waits in the queue or is prefilled, so a client that gives up (a timeout, Ctrl-C) is
    noticed only by watching its socket: cancel its rows (or its place in the queue) at once
    rather than generating to max_tokens for nobody, or holding a place others are refused."""
    while not done.wait(CLIENT_POLL_S):
        if client_gone():
            log.info("client closed the connection: request cancelled")
            handle.cancel()
            return


class _EmptyHandle:
    """A request handle for max_tokens 0: every choice ends at once with finish_reason length."""

    def __init__(self, n: int):
        self._n = n

    def events(self) -> Iterator[TokenEvent]:
        for choice in range(self._n):
            yield TokenEvent(choice, None, None, (), "length")

    def cancel(self, choice: int | None = None) -> None:
        pass


def make_app(
    engine: Any,
    tokenizer: Any,
    served_model_name: str,
    max_model_len: int,
    api_key: str | None = None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    ll_tokenizer: Any = None,
    cors: CorsPolicy | None = None,
    sampling_defaults: Mapping[str, Any] | None = None,
    render_prompt: Callable[..., str] = render_chat,
) -> App:
    """A WSGI callable serving /v1/chat/completions, /v1/models and /health. `sampling_defaults`:
    values for the sampling fields and max_tokens a request omits (generation_config.py);
    `render_prompt`: conversation -> prompt text, as `chat_template.render_chat`."""
    return App(engine, tokenizer, served_model_name, max_model_len, api_key, max_body_bytes,
               ll_tokenizer, cors or CorsPolicy(), dict(sampling_defaults or {}), render_prompt)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise protocol.malformed_json(str(e)) from None
    except RecursionError:  # [[[[... deeper than the parser's stack
        raise protocol.malformed_json("it nests too deeply") from None


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


class _LoggedStream:
    """A body that calls `on_close` when the server closes it, after writing it (a stream's
    request line is logged then; every reply counts as done then, App.wait_idle)."""

    def __init__(self, body: Iterable[bytes], on_close: Callable[[], None]):
        self._body, self._on_close = body, on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close()
