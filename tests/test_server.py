"""The WSGI app in-process with a scripted fake engine, hub resolution and the serve CLI's errors.

The fake engine replays fixed token ids (real tokenizer), so these tests pin down the server's own
logic: stop-string hold-back, tool-call deltas, cancellation, error mapping. The real engine is
exercised end to end in test_e2e_openai.py.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_jax import hub
from qwen_jax.engine import SHUTDOWN_ERROR, EngineClosedError, QueueFullError, TokenEvent
from qwen_jax.httpd import make_server
from qwen_jax.launch import kv_cache_bytes
from qwen_jax.sampler import SamplingParams
from qwen_jax.server import make_app

MODEL = "fake-model"


class FakeHandle:
    def __init__(self, script: list[list[int]], finish: str, error_at: int | None = None,
                 error: str = "boom"):
        self.script, self.finish, self.error_at, self.error = script, finish, error_at, error
        self.cancelled: list[int | None] = []

    def events(self):
        # Round-robin over choices, like a batch would interleave them.
        longest = max(len(s) for s in self.script)
        for step in range(longest):
            for choice, ids in enumerate(self.script):
                if step >= len(ids) or choice in self.cancelled or None in self.cancelled:
                    continue
                if self.error_at == step:
                    yield TokenEvent(choice, None, None, (), "error", self.error)
                    return
                last = step == len(ids) - 1
                yield TokenEvent(choice, ids[step], -0.5, ((ids[step], -0.5),),
                                 self.finish if last else None)

    def cancel(self, choice=None):
        self.cancelled.append(choice)


class FakeEngine:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.texts = ["Hello world"]
        self.finish = "stop"
        self.error_at = None
        self.error = "boom"
        self.raise_on_submit: Exception | None = None
        self.end_with: list[int] | None = None  # the last tokens (default: EOS for a stop)
        self.requests, self.handles = [], []

    def submit(self, req):
        if self.raise_on_submit is not None:
            raise self.raise_on_submit
        self.requests.append(req)
        eos = [self.tok.eos_token_ids[0]] if self.finish == "stop" else []
        eos = eos if self.end_with is None else self.end_with
        script = [self.tok.encode(self.texts[i % len(self.texts)]) + eos for i in range(req.n)]
        handle = FakeHandle(script, self.finish, self.error_at, self.error)
        self.handles.append(handle)
        return handle


@pytest.fixture
def engine(qwen_tokenizer):
    return FakeEngine(qwen_tokenizer)


@pytest.fixture
def app(engine, qwen_tokenizer):
    return make_app(engine, qwen_tokenizer, MODEL, 512, api_key="sekrit")


def call(app, method="POST", path="/v1/chat/completions", body=None, *, raw=None,
         headers=None, auth=True, consume=True):
    environ: dict = {}
    setup_testing_defaults(environ)
    data = raw if raw is not None else json.dumps(body or {}).encode()
    environ.update({"REQUEST_METHOD": method, "PATH_INFO": path,
                    "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(data)),
                    "wsgi.input": io.BytesIO(data)})
    if auth:
        environ["HTTP_AUTHORIZATION"] = "Bearer sekrit"
    environ.update(headers or {})
    got = {}

    def start_response(status, hdrs):
        got["status"], got["headers"] = int(status.split()[0]), dict(hdrs)

    result = app(environ, start_response)
    if not consume:
        return got, result
    return got["status"], got["headers"], b"".join(result)


def req(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}


def sse(raw: bytes) -> list:
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


def streamed_content(events) -> dict[int, str]:
    out: dict[int, str] = {}
    for ev in events:
        if ev == "[DONE]":
            continue
        for c in ev["choices"]:
            out[c["index"]] = out.get(c["index"], "") + (c["delta"].get("content") or "")
    return out


def test_json_reply_and_request_plumbing(app, engine, qwen_tokenizer):
    status, headers, raw = call(app, body=req(max_tokens=20, seed=3))
    assert status == 200 and headers["Content-Type"] == "application/json"
    body = json.loads(raw)
    assert body["choices"][0]["message"]["content"] == "Hello world"
    assert body["choices"][0]["finish_reason"] == "stop"
    n_text = len(qwen_tokenizer.encode("Hello world"))
    assert body["usage"]["completion_tokens"] == n_text + 1  # EOS counts, is not text
    (r,) = engine.requests
    assert r.max_tokens == 20 and r.sampling.seed == 3
    assert set(r.stop_token_ids) == set(qwen_tokenizer.eos_token_ids)
    assert body["usage"]["prompt_tokens"] == len(r.prompt_ids)


def test_every_reply_carries_its_own_request_id_which_the_log_names(app, engine, caplog):
    """As OpenAI's x-request-id (the SDK's `_request_id`): JSON, stream and error replies."""
    caplog.set_level("INFO", "qwen_jax.server")
    ids = []
    for body, path in ((req(), "/v1/chat/completions"), (req(stream=True), "/v1/chat/completions"),
                       (req(n=0), "/v1/chat/completions"), (None, "/v1/nope")):
        got, result = call(app, path=path, body=body, consume=False)
        b"".join(result)
        getattr(result, "close", lambda: None)()  # as a WSGI server does: a stream logs then
        ids.append(got["headers"]["X-Request-Id"])
    assert all(i.startswith("req_") and len(i) == 36 for i in ids) and len(set(ids)) == 4
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(i in logged for i in ids)


def test_the_app_writes_prompts_with_the_renderer_it_is_given(engine, qwen_tokenizer):
    """A snapshot's own template (jinja_template.py) reaches the engine's prompt; its refusal of
    a conversation is a 400 naming the messages."""
    from qwen_jax.jinja_template import JinjaChatTemplate

    template = JinjaChatTemplate(
        "{% if messages[0].role == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{{ '<|im_start|>assistant\n' }}")
    app = make_app(engine, qwen_tokenizer, MODEL, 512, render_prompt=template)
    status, _, _ = call(app, body=req(), auth=False)
    assert status == 200
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert list(engine.requests[0].prompt_ids) == qwen_tokenizer.encode(expected)
    status, _, raw = call(app, body=req(messages=[{"role": "system", "content": "s"},
                                                  {"role": "user", "content": "q"}]), auth=False)
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == "messages" and "no system turns" in error["message"]


@settings(max_examples=30, deadline=None)
@given(text=st.text("ab <>|xyz", min_size=1, max_size=30), stop=st.text("ab<>|z", min_size=1,
                                                                        max_size=4))
def test_stop_strings_streamed_and_not(qwen_tokenizer, text, stop):
    engine = FakeEngine(qwen_tokenizer)
    engine.texts = [text]
    app = make_app(engine, qwen_tokenizer, MODEL, 512)
    decoded = qwen_tokenizer.decode(qwen_tokenizer.encode(text))
    cut = decoded.find(stop)
    expected = decoded if cut < 0 else decoded[:cut]
    body = json.loads(call(app, body=req(stop=stop))[2])
    assert body["choices"][0]["message"]["content"] == expected
    events = sse(call(app, body=req(stop=stop, stream=True))[2])
    assert streamed_content(events) == {0: expected}
    # The stop string never shows up, not even split over chunks.
    assert stop not in "".join(
        c["delta"].get("content") or "" for ev in events[:-1] for c in ev["choices"])
    if cut >= 0:
        # The choice was cancelled at the stop string (the final cancel() adds None).
        assert 0 in engine.handles[-1].cancelled


def test_stream_shape_n2_and_usage(app, engine):
    engine.texts = ["one two", "three"]
    events = sse(call(app, body=req(n=2, stream=True, stream_options={"include_usage": True}))[2])
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == []
    n_text = sum(len(engine.tok.encode(t)) + 1 for t in engine.texts)  # + EOS each
    u = usage["usage"]
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (
        len(engine.requests[-1].prompt_ids), n_text, len(engine.requests[-1].prompt_ids) + n_text)
    assert streamed_content(events) == {0: "one two", 1: "three"}
    firsts = {}
    finals = {}
    for ev in events[:-2]:
        (c,) = ev["choices"]
        firsts.setdefault(c["index"], c["delta"])
        if c["finish_reason"]:
            finals[c["index"]] = c["finish_reason"]
    assert all(d.get("role") == "assistant" for d in firsts.values())
    assert finals == {0: "stop", 1: "stop"}


def test_a_choice_the_engine_cancels_ends_with_stop(app, engine):
    """The engine cancels what it still holds when it closes (server shutdown): the client gets
    the text so far and finish_reason "stop", not an error or an unknown reason."""
    engine.finish = "cancelled"
    body = json.loads(call(app, body=req())[2])
    assert body["choices"][0]["message"]["content"] == "Hello world"
    assert body["choices"][0]["finish_reason"] == "stop"
    events = sse(call(app, body=req(stream=True))[2])
    assert [c["finish_reason"] for ev in events[:-1] for c in ev["choices"]
            if c["finish_reason"]] == ["stop"]


def test_disconnect_cancels_the_request(app, engine, caplog):
    engine.texts = ["one two three four five six"]
    caplog.set_level("INFO", "qwen_jax.server")
    got, body = call(app, body=req(stream=True), consume=False)
    it = iter(body)
    next(it), next(it), next(it)  # the role chunk and two tokens; the client hangs up now
    body.close()
    assert engine.handles[0].cancelled == [None]
    # The log line counts the tokens generated before the hang-up.
    (line,) = [r.getMessage() for r in caplog.records if "/v1/chat/completions" in r.getMessage()]
    assert "completion_tokens=2 " in line, line


def test_ignored_request_fields_are_logged(app, engine, caplog):
    """A misspelt option is ignored as vLLM ignores it, but the log names it (here the reply
    would run to the context's end instead of 3 tokens)."""
    caplog.set_level("INFO", "qwen_jax.server")
    assert call(app, body=req(max_token=3, store=True))[0] == 200
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["request fields ignored (unknown to this server): max_token, store"]
    caplog.clear()
    assert call(app, body=req(max_tokens=3))[0] == 200
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("f", "g")]
CALL_TEXT = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


def test_auto_tool_calls_streamed_and_not(app, engine):
    engine.texts = [CALL_TEXT]
    body = json.loads(call(app, body=req(tools=TOOLS))[2])
    c = body["choices"][0]
    assert c["finish_reason"] == "tool_calls" and c["message"]["content"] == "Sure."
    (tc,) = c["message"]["tool_calls"]
    assert tc["function"]["name"] == "f" and json.loads(tc["function"]["arguments"]) == {"x": 1}
    events = sse(call(app, body=req(tools=TOOLS, stream=True))[2])
    args, names, reasons = "", [], []
    for ev in events[:-1]:
        for ch in ev["choices"]:
            for t in ch["delta"].get("tool_calls") or []:
                names += [t["function"]["name"]] if t["function"].get("name") else []
                args += t["function"].get("arguments") or ""
            reasons += [ch["finish_reason"]] if ch["finish_reason"] else []
    assert names == ["f"] and json.loads(args) == {"x": 1} and reasons == ["tool_calls"]
    assert streamed_content(events)[0].strip() == "Sure."


def test_tool_choice_none_leaves_text_alone(app, engine):
    engine.texts = [CALL_TEXT]
    c = json.loads(call(app, body=req(tools=TOOLS, tool_choice="none"))[2])["choices"][0]
    assert c["message"]["content"] == CALL_TEXT and "tool_calls" not in c["message"]
    assert c["finish_reason"] == "stop"


def tool_reply(app, **kw):
    """The same request as JSON and streamed -> [(content, [(name, args)], finish_reason)] for
    each, rebuilt from the stream the way an OpenAI client does."""
    c = json.loads(call(app, body=req(tools=TOOLS, **kw))[2])["choices"][0]
    whole = (c["message"]["content"],
             [(t["function"]["name"], json.loads(t["function"]["arguments"]))
              for t in c["message"].get("tool_calls") or []], c["finish_reason"])
    events = sse(call(app, body=req(tools=TOOLS, stream=True, **kw))[2])
    content, calls, reason = "", [], None
    for ev in events[:-1]:
        for ch in ev["choices"]:
            content += ch["delta"].get("content") or ""
            for t in ch["delta"].get("tool_calls") or []:
                if t.get("id"):
                    calls.append([t["function"]["name"], ""])
                calls[-1][1] += t["function"].get("arguments") or ""
            reason = ch["finish_reason"] or reason
    streamed = (content or None, [(n, json.loads(a)) for n, a in calls], reason)
    return whole, streamed


CALL = '<tool_call>\n{"name": "f", "arguments": {"x": "a\\nb}"}}\n</tool_call>'


@pytest.mark.parametrize("text, stop, expected", [
    # Stop strings inside a call's markup do not cut it ...
    (CALL, ["\n", "}", "<", "tool"], (None, [("f", {"x": "a\nb}"})], "tool_calls")),
    # ... nor in the whitespace around it (the newline between parallel calls) ...
    ("Hi\n" + CALL + "\n" + CALL.replace('"f"', '"g"') + "\n", ["\n"],
     ("Hi", [("f", {"x": "a\nb}"}), ("g", {"x": "a\nb}"})], "tool_calls")),
    # ... they end the message text around it.
    ("Hi\nthere " + CALL, ["\n"], ("Hi", [], "stop")),
    (CALL + "\nDone\nMore", ["\n"], ("Done", [("f", {"x": "a\nb}"})], "tool_calls")),
    (CALL + " Done. More", [". "], ("Done", [("f", {"x": "a\nb}"})], "tool_calls")),
    # A stop string's start held back before a tag is released, not lost.
    ("ok <" + CALL[1:], ["<tool_x", "ok <a"], ("ok", [("f", {"x": "a\nb}"})], "tool_calls")),
])
def test_stop_strings_are_not_matched_inside_tool_call_markup(app, engine, text, stop,
                                                             expected):
    engine.texts = [text]
    whole, streamed = tool_reply(app, stop=stop)
    assert whole == streamed == expected


def test_a_stop_string_in_whitespace_held_to_the_end_is_a_stop(app, engine):
    """With tools, whitespace is held back (a call may follow); when max_tokens ends the
    generation in it, a stop string there still ends the reply with finish_reason "stop"."""
    engine.finish = "length"
    engine.texts = ["Hi\n\n"]
    assert tool_reply(app, stop=["\n"]) == (("Hi", [], "stop"),) * 2
    assert tool_reply(app, stop=["x"]) == (("Hi\n\n", [], "length"),) * 2


@pytest.mark.parametrize("fmt", [
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}}}},
    {"tools": TOOLS, "tool_choice": "required"},
])
def test_stop_strings_do_not_cut_grammar_constrained_output(app, engine, fmt):
    """JSON modes and forced calls end where their grammar does: "stop" means complete."""
    engine.texts = ['{"a": 1, "b": "x, y"}' if "response_format" in fmt else CALL]
    stop = [",", " ", "}", "\n", "<"]
    for stream in (False, True):
        raw = call(app, body=req(stop=stop, stream=stream, **fmt))[2]
        if stream:
            events = sse(raw)
            content = streamed_content(events)[0]
            calls = [t for ev in events[:-1] for c in ev["choices"]
                     for t in c["delta"].get("tool_calls") or []]
        else:
            message = json.loads(raw)["choices"][0]["message"]
            content, calls = message["content"] or "", message.get("tool_calls") or []
        if "response_format" in fmt:
            assert json.loads(content) == {"a": 1, "b": "x, y"}
        else:
            assert content == "" and calls
    engine.texts = ['{"a": 1, "b": "x, y"}']  # without a grammar the same stop cuts the text
    assert json.loads(call(app, body=req(stop=stop))[2])["choices"][0]["message"]["content"] \
        == '{"a":'


def test_a_tool_call_cut_off_by_max_tokens_leaves_no_markup(app, engine):
    """Forced or not, half a call is neither a call nor content (finish_reason tells why)."""
    engine.finish = "length"
    engine.texts = ['Let me check. <tool_call>\n{"name": "f", "argu']
    for choice in ("auto", "required"):
        whole, streamed = tool_reply(app, tool_choice=choice)
        assert whole == streamed == ("Let me check.", [], "length")
    engine.texts = [CALL + "\n<tool_call>\n{"]  # the second of parallel calls cut off
    whole, streamed = tool_reply(app)
    assert whole == streamed == (None, [("f", {"x": "a\nb}"})], "length")


def test_forced_tool_choice_passes_constraints_to_the_engine(app, engine):
    call(app, body=req(tools=TOOLS, tool_choice="required", n=2))
    cons = engine.requests[0].constraints
    assert len(cons) == 2 and cons[0] is not cons[1]
    assert hasattr(cons[0], "allowed_tokens")
    call(app, body=req(tools=TOOLS, tool_choice="auto"))
    assert engine.requests[1].constraints is None


def test_logprobs_entries(app, engine, qwen_tokenizer):
    engine.texts = ["héllo"]
    body = json.loads(call(app, body=req(logprobs=True, top_logprobs=1))[2])
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == len(qwen_tokenizer.encode("héllo"))  # EOS has no entry
    assert bytes(b for e in content for b in e["bytes"]).decode() == "héllo"
    assert all(len(e["top_logprobs"]) == 1 and e["logprob"] == -0.5 for e in content)
    # Streamed: the same entries over the chunks; a chunk without tokens says null.
    events = sse(call(app, body=req(logprobs=True, top_logprobs=1, stream=True))[2])
    chunks = [c for ev in events[:-1] for c in ev["choices"]]
    assert [e for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]] == content
    assert chunks[-1]["finish_reason"] == "stop" and chunks[-1]["logprobs"] is None
    assert all(c["logprobs"] is None or c["logprobs"]["content"] for c in chunks)


def test_errors_map_to_openai_objects(app, engine):
    def err(_app, **kw):
        status, headers, raw = call(_app, **kw)
        e = json.loads(raw)["error"]
        assert set(e) == {"message", "type", "param", "code"}
        return status, e

    assert err(app, body=req(), auth=False)[0] == 401
    assert err(app, body=req(), headers={"HTTP_AUTHORIZATION": "Bearer nope"})[0] == 401
    assert call(app, body=req(), headers={"HTTP_AUTHORIZATION": "bearer sekrit"})[0] == 200
    assert err(app, path="/v2/x")[0] == 404
    assert err(app, method="DELETE", path="/v1/models")[0] == 405
    assert err(app, raw=b"{nope")[0] == 400
    assert err(app, body=req(), headers={"CONTENT_TYPE": "text/plain"})[0] == 415
    status, e = err(app, raw=gzip.compress(json.dumps(req()).encode()),
                    headers={"HTTP_CONTENT_ENCODING": "gzip"})
    assert status == 415 and "Content-Encoding 'gzip'" in e["message"]
    assert call(app, body=req(), headers={"HTTP_CONTENT_ENCODING": "Identity"})[0] == 200
    assert err(app, body=req(), headers={"CONTENT_LENGTH": str(10**8)})[0] == 413
    status, e = err(app, body=req(top_p=7))
    assert status == 400 and e["param"] == "top_p"
    # A JSON integer past float range (json.loads keeps it exact) was an OverflowError: a 500.
    status, e = err(app, raw=json.dumps(req(temperature=0)).encode().replace(
        b'"temperature": 0', b'"temperature": 1' + b"0" * 400))
    assert status == 400 and e["param"] == "temperature"
    engine.raise_on_submit = QueueFullError("full")
    assert err(app, body=req())[0] == 429
    engine.raise_on_submit = RuntimeError("secret internals")
    status, e = err(app, body=req())
    assert status == 500 and "secret" not in e["message"]


def test_text_json_can_carry_but_a_prompt_cannot_is_a_400(app, engine):
    """Lone surrogates (valid JSON escapes, not Unicode) and very deep nesting once reached the
    tokenizer or the JSON parser's recursion limit and came back as 500s."""
    def err(raw: bytes):
        status, _, body = call(app, raw=raw)
        return status, json.loads(body)["error"]

    # json.dumps writes a lone surrogate as the escape \ud800, as a client's encoder would.
    for body, param in [
        (req(messages=[{"role": "user", "content": "hi \ud800"}]), "messages[0].content"),
        (req(stop=["\udfff"]), "stop[0]"),
        (req(tools=[{"type": "function", "function": {"name": "f", "description": "\udc00"}}]),
         "tools[0].function.description"),
    ]:
        status, e = err(json.dumps(body).encode())
        assert (status, e["param"]) == (400, param) and "surrogate" in e["message"]
    depth = 100_000
    status, e = err(b'{"model": "fake-model", "x": ' + b"[" * depth + b"]" * depth + b"}")
    assert status == 400 and e["code"] == "invalid_json"
    status, e = err(json.dumps(req(response_format=json.loads("[" * 200 + "]" * 200))).encode())
    assert (status, e["param"]) == (400, "response_format")
    assert not engine.requests  # none of them reached the engine


def test_tool_call_arguments_that_cannot_be_a_prompt_are_a_400(app, engine):
    """Escaped in an arguments string, a lone surrogate or deep nesting passes the body's
    checks; rendering the prompt finds them: a 400 naming the field, not a 500."""
    for arguments in ('{"a": "\\ud800"}', '{"a":' + "[" * 990 + "]" * 990 + "}"):
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                     "tool_calls": [{"id": "c", "type": "function",
                                     "function": {"name": "f", "arguments": arguments}}]},
                    {"role": "tool", "tool_call_id": "c", "content": "r"}]
        status, _, raw = call(app, body=req(messages=messages, tools=TOOLS))
        e = json.loads(raw)["error"]
        assert status == 400 and e["param"] == "messages[1].tool_calls[0].function.arguments"
    assert not engine.requests


def test_engine_error_is_a_generic_500(app, engine):
    engine.error_at = 1
    status, _, raw = call(app, body=req())
    assert status == 500 and "boom" not in raw.decode() and "Traceback" not in raw.decode()
    events = sse(call(app, body=req(stream=True))[2])
    assert events[-1] == "[DONE]" and "error" in events[-2]


def test_health_and_models_auth(app):
    assert call(app, method="GET", path="/health", auth=False)[0] == 200
    status, _, raw = call(app, method="GET", path="/v1/models")
    assert status == 200 and json.loads(raw)["data"][0]["id"] == MODEL
    # vLLM's max_model_len: the app's (512 here), as clients read it to size a conversation.
    assert json.loads(raw)["data"][0]["max_model_len"] == 512
    assert call(app, method="GET", path="/v1/models", auth=False)[0] == 401
    status, _, raw = call(app, method="GET", path=f"/v1/models/{MODEL}")
    assert status == 200 and json.loads(raw) == {**json.loads(call(
        app, method="GET", path="/v1/models")[2])["data"][0]}
    assert call(app, method="GET", path="/v1/models/other")[0] == 404


@contextlib.contextmanager
def http_server(app, *, start: bool = True, host: str = "127.0.0.1", **kw):
    """The real threaded HTTP server on a free local port; yields it (start it yourself with
    `start=False`)."""
    server = make_server(app, host, 0, **kw)
    if start:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def raw_post(body: bytes, *, auth: bool = True) -> bytes:
    """An HTTP/1.0 POST of `body` to /v1/chat/completions, as bytes for a raw socket."""
    return (b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            + (b"Authorization: Bearer sekrit\r\n" if auth else b"")
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def read_reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    return reply


@pytest.mark.parametrize("how", ["timeout", "reset"])
def test_a_client_that_leaves_mid_headers_is_a_log_line_not_a_traceback(app, engine, how,
                                                                        caplog, capfd):
    """The request line and headers are read before the app runs; a client that stalls or
    resets there is logged in one line (socketserver printed a traceback to stderr)."""
    caplog.set_level("INFO", "qwen_jax.server")
    with http_server(app, socket_timeout=0.3) as server:
        s = socket.create_connection(server.server_address[:2], timeout=10)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: appl")
        if how == "reset":
            time.sleep(0.05)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        expected = "sent no complete request" if how == "timeout" else "dropped the connection"
        deadline = time.monotonic() + 10
        while not any(expected in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.02)
        if how == "timeout":
            assert s.recv(1024) == b""  # closed by the server, without an answer
            s.close()
    assert "Traceback" not in capfd.readouterr().err
    assert not engine.requests


@pytest.mark.parametrize("stage", ["headers", "body"])
def test_a_request_trickled_in_past_the_deadline_is_dropped(app, engine, stage, caplog):
    """A byte every 0.1 s never trips the per-read timeout, but the whole request must arrive
    within the request deadline: then the connection is closed, and its thread freed."""
    caplog.set_level("INFO", "qwen_jax.server")
    body = json.dumps(req()).encode()
    head = raw_post(body).removesuffix(body)
    sent, trickle = (b"", head) if stage == "headers" else (head, body)
    with http_server(app, socket_timeout=5, request_deadline=0.6) as server:
        with socket.create_connection(server.server_address[:2], timeout=10) as s:
            s.sendall(sent)
            t0 = time.monotonic()
            with pytest.raises(OSError):  # a broken pipe or a reset, once the server closed
                for byte in trickle:
                    s.sendall(bytes([byte]))
                    time.sleep(0.1)
                    assert time.monotonic() - t0 < 5, "the trickled request was never dropped"
        assert any("did not send its request within 0.6 s" in r.getMessage()
                   for r in caplog.records)
        # Once the body is read the deadline is off: a reply may take longer (here 1 s).
        token = engine.tok.encode("a")[0]
        engine.submit = lambda request: SlowHandle(token, count=100)
        with socket.create_connection(server.server_address[:2], timeout=10) as s:
            s.sendall(head + body)
            reply = read_reply(s)
        assert reply.startswith(b"HTTP/1.0 200")
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["usage"]["completion_tokens"] == 100


def test_connections_past_the_limit_get_a_503_at_once(app, engine):
    """Each connection holds a thread: past max_connections a new one is answered 503 (an
    OpenAI error object) without a thread, and served again once one closes."""
    body = json.dumps(req()).encode()
    post = raw_post(body)
    with http_server(app, max_connections=2) as server:
        addr = server.server_address[:2]
        idle = [socket.create_connection(addr, timeout=10) for _ in range(2)]
        time.sleep(0.2)  # both accepted (and waiting for a request line)
        with socket.create_connection(addr, timeout=10) as s:
            s.sendall(post)
            head, _, raw = read_reply(s).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 503") and b"Retry-After: 1" in head
        err = json.loads(raw)["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == "too_many_connections" and err["type"] == "server_error"
        assert not engine.requests
        idle[0].close()
        deadline = time.monotonic() + 5
        while True:  # the closed connection's thread ends and frees its place
            with socket.create_connection(addr, timeout=10) as s:
                s.sendall(post)
                head = read_reply(s).partition(b"\r\n\r\n")[0]
            if head.startswith(b"HTTP/1.0 200"):
                break
            assert time.monotonic() < deadline, head
            time.sleep(0.05)
        idle[1].close()


def test_serves_on_an_ipv6_address(app):
    """--host ::1 (the CORS default allows [::1] pages): an IPv6 socket, not an IPv4 error."""
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("this machine has no IPv6 sockets")
    with http_server(app, host="::1") as server:
        with socket.create_connection(("::1", server.server_address[1]), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.0\r\nHost: test\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.0 200")


def test_a_burst_of_connections_waits_for_the_accept_loop(app):
    """64 clients connect and send before the server accepts any: each is answered once it does.
    (With socketserver's default backlog of 5, 58 of them timed out connecting.)"""
    socks, errors = [], []

    def connect(address):
        try:
            s = socket.create_connection(address, timeout=5)
            s.sendall(b"GET /health HTTP/1.0\r\nHost: test\r\n\r\n")
            socks.append(s)
        except OSError as e:
            errors.append(e)

    with http_server(app, start=False) as server:
        clients = [threading.Thread(target=connect, args=(server.server_address[:2],))
                   for _ in range(64)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            replies = [s.recv(64) for s in socks]
        finally:
            for s in socks:
                s.close()
    assert not errors and len(replies) == 64
    assert all(r.startswith(b"HTTP/1.0 200") for r in replies)


@pytest.mark.parametrize("half_close", [False, True])
def test_a_body_that_never_arrives_is_a_400_not_a_stuck_thread(app, engine, half_close):
    """A client announces 100 bytes and sends 9, then waits (the socket timeout ends the read)
    or closes its side (the read comes back short). Either way: a 400, and the thread is free."""
    with http_server(app, socket_timeout=0.5) as server, socket.create_connection(
            server.server_address[:2], timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json"
                  b"\r\nAuthorization: Bearer sekrit\r\nContent-Length: 100\r\n\r\n"
                  b'{"model":')
        if half_close:
            s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        reply = read_reply(s)
        waited = time.monotonic() - t0
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400")
    assert "Content-Length" in json.loads(body)["error"]["message"]
    assert waited < 5 and not engine.requests


def test_a_client_that_stops_reading_a_stream_has_its_choice_cancelled(engine, qwen_tokenizer,
                                                                       caplog):
    """The stream's writes fill the socket buffers, the next write times out, and the server
    cancels the choice instead of blocking on that client for ever."""
    engine.texts = ["hello " * 60_000]  # far more than the socket buffers hold
    app = make_app(engine, qwen_tokenizer, MODEL, 10**6)
    body = json.dumps(req(stream=True)).encode()
    with http_server(app, socket_timeout=0.5) as server, socket.create_connection(
            server.server_address[:2], timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert s.recv(64).startswith(b"HTTP/1.0 200")
        deadline = time.monotonic() + 20
        while not (engine.handles and engine.handles[0].cancelled):
            assert time.monotonic() < deadline, "the stalled stream was never cancelled"
            time.sleep(0.05)
    assert engine.handles[0].cancelled == [None]
    # One warning line in the log (written just after the cancel), not wsgiref's traceback.
    def logged():
        return [r.getMessage() for r in caplog.records if r.name == "qwen_jax.server"]

    deadline = time.monotonic() + 5
    while not any("stopped reading or sending" in m for m in logged()):
        assert time.monotonic() < deadline, logged()
        time.sleep(0.05)
    assert not any("Traceback" in m for m in logged())


class SlowHandle(FakeHandle):
    """One token every 10 ms for 100 s unless cancelled; counts what it yielded."""

    def __init__(self, token: int, count: int = 10_000):
        super().__init__([[token] * count], "length")
        self.yielded = 0

    def events(self):
        for ev in super().events():
            time.sleep(0.01)
            self.yielded += 1
            yield ev


class QueuedHandle(FakeHandle):
    """A request that waits in the engine's queue until it is cancelled."""

    def __init__(self):
        super().__init__([[]], "cancelled")
        self.released = threading.Event()

    def events(self):
        self.released.wait(30)
        yield TokenEvent(0, None, None, (), "cancelled")

    def cancel(self, choice=None):
        super().cancel(choice)
        self.released.set()


def test_a_client_that_hangs_up_on_a_queued_stream_gives_up_its_place(engine, qwen_tokenizer):
    """A stream sends its role chunk, then nothing while its request waits for a slot: the
    server watches the socket, so a client that leaves frees its place in the queue (which
    would otherwise turn others away with 429s) instead of holding it until admitted."""
    handles = []

    def submit(request):
        handles.append(QueuedHandle())
        return handles[-1]

    engine.submit = submit
    app = make_app(engine, qwen_tokenizer, MODEL, 10**6)
    body = json.dumps(req(stream=True)).encode()
    with http_server(app) as server:
        s = socket.create_connection(server.server_address[:2], timeout=10)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert s.recv(64).startswith(b"HTTP/1.0 200")
        time.sleep(0.5)
        assert handles and not handles[0].cancelled  # connected and waiting: kept
        s.close()
        t0 = time.monotonic()
        while not handles[0].cancelled:
            assert time.monotonic() - t0 < 3, "the abandoned stream kept its queue place"
            time.sleep(0.01)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_that_hangs_up_on_a_json_reply_has_its_request_cancelled(engine, qwen_tokenizer,
                                                                          how):
    """A non-streamed reply writes nothing until it is done, so the server watches the socket:
    a client that closes it (timeout, Ctrl-C) frees its rows within a poll, not at max_tokens."""
    handles = []

    def submit(request):
        handles.append(SlowHandle(qwen_tokenizer.encode("a")[0]))
        return handles[-1]

    engine.submit = submit
    app = make_app(engine, qwen_tokenizer, MODEL, 10**6)
    body = json.dumps(req()).encode()
    with http_server(app) as server:
        s = socket.create_connection(server.server_address[:2], timeout=10)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 10
        while not (handles and handles[0].yielded > 5):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if how == "reset":  # RST instead of FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        t0 = time.monotonic()
        while not handles[0].cancelled:
            assert time.monotonic() - t0 < 3, "the abandoned request kept generating"
            time.sleep(0.01)
        assert handles[0].yielded < 1000
        # A client that stays connected is not cancelled: it gets the whole reply.
        handles.clear()
        engine.submit = FakeEngine.submit.__get__(engine)
        engine.texts = ["still here"]
        with socket.create_connection(server.server_address[:2], timeout=10) as s2:
            s2.sendall(raw_post(body, auth=False))
            reply = read_reply(s2)
        answer = json.loads(reply.partition(b"\r\n\r\n")[2])
        assert answer["choices"][0]["message"]["content"] == "still here"


# ------------------------------------------------------------------------------------- CORS

LOCAL_PAGE, OTHER_SITE = "http://localhost:3000", "https://evil.example"


def preflight(app, origin, method="POST", headers="authorization, content-type"):
    status, hdrs, raw = call(app, method="OPTIONS", auth=False, headers={
        "HTTP_ORIGIN": origin, "HTTP_ACCESS_CONTROL_REQUEST_METHOD": method,
        "HTTP_ACCESS_CONTROL_REQUEST_HEADERS": headers})
    return status, hdrs, raw


def test_cors_preflight_from_a_local_page_needs_no_key_and_allows_the_post(app, engine):
    status, hdrs, raw = preflight(app, LOCAL_PAGE)
    assert status == 204 and raw == b""
    assert hdrs["Access-Control-Allow-Origin"] == LOCAL_PAGE and hdrs["Vary"] == "Origin"
    assert "POST" in hdrs["Access-Control-Allow-Methods"]
    assert hdrs["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "Content-Length" not in hdrs and not engine.requests
    # The request itself: JSON and streamed replies both name the origin.
    status, hdrs, raw = call(app, body=req(), headers={"HTTP_ORIGIN": LOCAL_PAGE})
    assert status == 200 and hdrs["Access-Control-Allow-Origin"] == LOCAL_PAGE
    status, hdrs, raw = call(app, body=req(stream=True), headers={"HTTP_ORIGIN": LOCAL_PAGE})
    assert status == 200 and hdrs["Access-Control-Allow-Origin"] == LOCAL_PAGE
    assert sse(raw)[-1] == "[DONE]"
    # Errors too, so the page can read what went wrong.
    status, hdrs, _ = call(app, body=req(top_p=7), headers={"HTTP_ORIGIN": LOCAL_PAGE})
    assert status == 400 and hdrs["Access-Control-Allow-Origin"] == LOCAL_PAGE


def test_cors_other_sites_are_refused_by_default(app, engine):
    status, hdrs, raw = preflight(app, OTHER_SITE)
    assert status == 403 and json.loads(raw)["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in hdrs
    status, hdrs, _ = call(app, method="GET", path="/v1/models",
                           headers={"HTTP_ORIGIN": OTHER_SITE})
    assert status == 200 and "Access-Control-Allow-Origin" not in hdrs  # the browser hides it


def test_cors_any_origin_when_asked(engine, qwen_tokenizer):
    from qwen_jax.cors import parse_origins

    app = make_app(engine, qwen_tokenizer, MODEL, 512, cors=parse_origins("*"))
    status, hdrs, _ = preflight(app, OTHER_SITE)
    assert status == 204 and hdrs["Access-Control-Allow-Origin"] == "*" and "Vary" not in hdrs
    app = make_app(engine, qwen_tokenizer, MODEL, 512,
                   cors=parse_origins("https://chat.example.org"))
    assert preflight(app, "https://chat.example.org")[0] == 204
    assert preflight(app, LOCAL_PAGE)[0] == 403  # a list without 'local' is only that list


def test_plain_options_lists_the_methods(app):
    status, hdrs, _ = call(app, method="OPTIONS", auth=False)
    assert status == 204 and hdrs["Allow"] == "POST, OPTIONS"
    status, hdrs, _ = call(app, method="DELETE", path="/v1/models")
    assert status == 405 and hdrs["Allow"] == "GET, HEAD, OPTIONS"
    assert call(app, method="OPTIONS", path="/v2/nothing", auth=False)[0] == 404


def test_head_is_a_get_without_the_body(app):
    for path in ("/v1/models", f"/v1/models/{MODEL}", "/health"):
        status, hdrs, body = call(app, method="HEAD", path=path)
        get = call(app, method="GET", path=path)
        assert (status, body) == (200, b"") and get[0] == 200
        same = {k: v for k, v in hdrs.items() if k != "X-Request-Id"}  # each request its own
        assert same == {k: v for k, v in get[1].items() if k != "X-Request-Id"}
        assert hdrs["Content-Length"] == str(len(get[2]))
    status, hdrs, body = call(app, method="HEAD", path="/v1/chat/completions")
    assert (status, body) == (405, b"") and hdrs["Allow"] == "POST, OPTIONS"
    assert call(app, method="HEAD", path="/v1/models", auth=False)[:3:2] == (401, b"")


def chunked(data: bytes, sizes=(5, 1, 300)) -> bytes:
    out, i = b"", 0
    for n in sizes:
        if i >= len(data):
            break
        out += b"%x;ext=1\r\n%s\r\n" % (len(data[i:i + n]), data[i:i + n])
        i += n
    if i < len(data):
        out += b"%X\r\n%s\r\n" % (len(data) - i, data[i:])
    return out + b"0\r\nX-Trailer: 1\r\n\r\n"


def test_chunked_bodies_and_a_missing_length(app, engine):
    body = json.dumps(req(max_tokens=5)).encode()
    te = {"HTTP_TRANSFER_ENCODING": "chunked", "CONTENT_LENGTH": ""}
    status, _, raw = call(app, raw=chunked(body), headers=te)
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == "Hello world"
    assert engine.requests[-1].max_tokens == 5

    def error(raw_body, headers):
        status, _, raw = call(app, raw=raw_body, headers=headers)
        return status, json.loads(raw)["error"]

    for bad in (b"zz\r\n" + body, chunked(body)[:30], b"5\r\nabcdefgh\r\n0\r\n\r\n",
                b"+5\r\nabcde\r\n0\r\n\r\n"):
        assert error(bad, te)[0] == 400, bad
    small = make_app(engine, engine.tok, MODEL, 512, max_body_bytes=len(body) - 1)
    status, _, raw = call(small, raw=chunked(body), headers=te, auth=False)
    assert status == 413 and json.loads(raw)["error"]["code"] == "payload_too_large"
    status, e = error(body, {"HTTP_TRANSFER_ENCODING": "gzip", "CONTENT_LENGTH": ""})
    assert status == 400 and "Transfer-Encoding" in e["message"]
    status, e = error(body, {"CONTENT_LENGTH": ""})  # neither: 411, not an empty-JSON 400
    assert status == 411 and e["code"] == "length_required"


def test_stream_chunks_say_usage_null_only_when_usage_was_asked_for(app, engine):
    with_usage = sse(call(app, body=req(stream=True, stream_options={"include_usage": True}))[2])
    chunks = [e for e in with_usage if e != "[DONE]"]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["total_tokens"]
    plain = [e for e in sse(call(app, body=req(stream=True))[2]) if e != "[DONE]"]
    assert plain and all("usage" not in c for c in plain)


def test_queue_full_says_when_to_retry(app, engine):
    engine.raise_on_submit = QueueFullError("full")
    status, hdrs, raw = call(app, body=req())
    assert status == 429 and hdrs["Retry-After"] == "1"


def test_n_above_the_servers_rows_names_n(app, engine):
    engine.max_slots = 2
    status, _, raw = call(app, body=req(n=3))
    e = json.loads(raw)["error"]
    assert status == 400 and e["param"] == "n" and "--max-num-seqs" in e["message"]
    assert call(app, body=req(n=2))[0] == 200


@pytest.mark.parametrize("tool_choice", ["auto", "none", "required"])
def test_a_tool_schema_the_grammar_cannot_take_is_a_400_whatever_the_choice(app, engine,
                                                                           tool_choice):
    bad = {"type": "function", "function": {"name": "h", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}
    status, _, raw = call(app, body=req(tools=[*TOOLS, bad], tool_choice=tool_choice))
    e = json.loads(raw)["error"]
    assert status == 400 and e["param"] == "tools[2].function.parameters", e
    assert "nonsense" in e["message"] and "%json" not in e["message"]  # not the grammar
    assert not engine.requests


UNIQUE = {"type": "object", "properties": {
    "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}


@pytest.mark.parametrize("tool_choice", ["auto", "none", "required", "named"])
def test_keywords_the_grammar_cannot_enforce_need_strict_to_be_refused(app, engine, tool_choice):
    """uniqueItems (pydantic's Set) is valid JSON Schema that llguidance cannot enforce: a
    function's schema with it is taken (the rest enforced) unless the function is strict."""
    choice = {"type": "function", "function": {"name": "h"}} if tool_choice == "named" \
        else tool_choice
    for strict in (False, True):
        tool = {"type": "function", "function": {"name": "h", "parameters": UNIQUE,
                                                 **({"strict": True} if strict else {})}}
        status, _, raw = call(app, body=req(tools=[*TOOLS, tool], tool_choice=choice))
        if strict:
            e = json.loads(raw)["error"]
            assert status == 400 and e["param"] == "tools[2].function.parameters", e
            assert "uniqueItems" in e["message"]
        else:
            assert status == 200, raw


def test_a_json_schema_keyword_the_grammar_cannot_enforce_needs_strict_to_be_refused(app,
                                                                                     engine):
    for strict in (False, True):
        rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": UNIQUE,
                                                     "strict": strict}}
        status, _, raw = call(app, body=req(response_format=rf))
        assert status == (400 if strict else 200), raw
        if strict:
            assert "uniqueItems" in json.loads(raw)["error"]["message"]


def test_parallel_tool_calls_false_keeps_the_first_call_of_auto_output(app, engine):
    engine.texts = [CALL_TEXT + "\n" + CALL_TEXT.replace('"x": 1', '"x": 2')]
    for parallel, expected in ((True, [("f", {"x": 1}), ("f", {"x": 2})]),
                               (False, [("f", {"x": 1})])):
        whole, streamed = tool_reply(app, parallel_tool_calls=parallel)
        assert whole[1] == streamed[1] == expected
        assert whole[2] == streamed[2] == "tool_calls"


def test_requests_a_shutdown_ends_are_503s_a_client_can_retry(app, engine):
    """Ended by the engine closing (serve stopping), a request did not complete: a 503
    (`server_shutting_down`), in a stream an error event; not "stop", and not a 500."""
    engine.error_at, engine.error = 1, SHUTDOWN_ERROR
    status, headers, raw = call(app, body=req())
    assert status == 503 and json.loads(raw)["error"]["code"] == "server_shutting_down"
    assert headers["Retry-After"] == "1"
    events = sse(call(app, body=req(stream=True))[2])
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutting_down"
    assert not any(c["finish_reason"] for ev in events[:-2] for c in ev["choices"])
    engine.error_at = None
    for message, code in ((SHUTDOWN_ERROR, 503), ("engine failed: RuntimeError: x", 500)):
        engine.raise_on_submit = EngineClosedError(message)
        assert call(app, body=req())[0] == code


def test_wait_idle_waits_for_replies_to_be_written(app):
    """A reply counts until the server closes its body after writing it (serve waits so at
    shutdown, for the 503s it just caused to reach their clients)."""
    assert app.wait_idle(0)
    for body in (req(), req(stream=True)):
        _, result = call(app, body=body, consume=False)
        b"".join(result)
        assert not app.wait_idle(0.05)
        result.close()
        assert app.wait_idle(0)


def test_vllm_stop_extensions_reach_the_engine(app, engine, qwen_tokenizer):
    eos = set(qwen_tokenizer.eos_token_ids)
    for fields, stops, min_tokens in (({}, eos, 0),
                                      ({"stop_token_ids": [5, 9]}, eos | {5, 9}, 0),
                                      ({"ignore_eos": True, "stop_token_ids": [5]}, {5}, 0),
                                      # under a grammar, as stop strings, they would cut it short
                                      ({"stop_token_ids": [5, 9],
                                        "response_format": {"type": "json_object"}}, eos, 0),
                                      ({"stop_token_ids": [5], "tools": TOOLS,
                                        "tool_choice": "required"}, eos, 0),
                                      ({"min_tokens": 3, "max_tokens": 8}, eos, 3),
                                      ({"min_tokens": 30, "max_tokens": 8}, eos, 8)):
        assert call(app, body=req(**fields))[0] == 200
        sent = engine.requests[-1]
        assert set(sent.stop_token_ids) == stops and sent.min_tokens == min_tokens


def test_a_stop_token_inside_grammar_constrained_output_is_text(app, engine, qwen_tokenizer):
    """stop_token_ids do not apply under a grammar: a listed token in the JSON keeps its text
    (without a grammar it would be dropped as the stop token)."""
    text = '{"a": "x, y"}'
    comma = qwen_tokenizer.encode(",")[0]
    assert comma in qwen_tokenizer.encode(text)
    engine.texts = [text]
    whole, last, streamed = reply_and_stream(app, stop_token_ids=[comma],
                                             response_format={"type": "json_object"})
    assert whole["message"]["content"] == streamed[0] == text
    assert whole["stop_reason"] is last["stop_reason"] is None


def reply_and_stream(app, **fields) -> tuple[dict, dict, list]:
    """The JSON reply's first choice, the stream's final chunk choice, the streamed text."""
    whole = json.loads(call(app, body=req(**fields))[2])["choices"][0]
    events = sse(call(app, body=req(stream=True, **fields))[2])
    last = [c for ev in events[:-1] for c in ev["choices"] if c["finish_reason"]]
    assert len(last) == 1
    return whole, last[0], [streamed_content(events)[0]]


def test_a_stop_token_ids_token_ends_the_reply_without_its_text(app, engine, qwen_tokenizer):
    """As vLLM: the stop token counts in usage but its text is not in the reply unless
    include_stop_str_in_output; stop_reason names it (and is null for the model's EOS)."""
    hello, world = qwen_tokenizer.encode("Hello world")
    engine.texts, engine.end_with = ["Hello"], [world]
    for include, text in ((False, "Hello"), (True, "Hello world")):
        fields = {"stop_token_ids": [world], "include_stop_str_in_output": include}
        whole, last, streamed = reply_and_stream(app, **fields)
        assert whole["message"]["content"] == text and streamed == [text]
        assert whole["finish_reason"] == last["finish_reason"] == "stop"
        assert whole["stop_reason"] == last["stop_reason"] == world
        body = json.loads(call(app, body=req(logprobs=True, **fields))[2])
        assert body["usage"]["completion_tokens"] == 2
        tokens = [e["token"] for e in body["choices"][0]["logprobs"]["content"]]
        assert "".join(tokens) == text
    engine.end_with = None  # the model's end of turn, listed or not (vLLM checks EOS first)
    eos = qwen_tokenizer.eos_token_ids[0]
    for ids in ([world], [world, eos]):
        whole, last, _ = reply_and_stream(app, stop_token_ids=ids)
        assert whole["stop_reason"] is last["stop_reason"] is None
        assert whole["message"]["content"] == "Hello"
    whole, last, _ = reply_and_stream(app, stop_token_ids=[eos], ignore_eos=True)
    assert whole["stop_reason"] == last["stop_reason"] == eos


def test_with_ignore_eos_an_end_of_turn_mid_reply_has_a_logprobs_entry(app, engine,
                                                                        qwen_tokenizer):
    """ignore_eos: the model's end-of-turn token is generated past; like every generated token it
    counts in usage and gets a logprobs entry, and, being special, adds no text."""
    eos = qwen_tokenizer.eos_token_ids[0]
    again = qwen_tokenizer.encode(" again")
    engine.finish, engine.end_with = "length", [eos, *again]
    n = len(qwen_tokenizer.encode("Hello world")) + 1 + len(again)
    body = json.loads(call(app, body=req(ignore_eos=True, logprobs=True))[2])
    (choice,) = body["choices"]
    assert choice["message"]["content"] == "Hello world again"
    entries = choice["logprobs"]["content"]
    assert body["usage"]["completion_tokens"] == len(entries) == n
    assert entries[n - 1 - len(again)]["token"] == qwen_tokenizer.decode([eos])


def test_stop_reason_names_the_stop_string_and_include_keeps_it(app, engine):
    engine.texts = ["Hello world, again"]
    for include, text in ((False, "Hello "), (True, "Hello wor")):
        whole, last, streamed = reply_and_stream(app, stop=["xyz", "wor", "again"],
                                                 include_stop_str_in_output=include)
        assert whole["message"]["content"] == text and streamed == [text]
        assert whole["stop_reason"] == last["stop_reason"] == "wor"
    engine.finish = "length"
    whole, last, _ = reply_and_stream(app, stop=["xyz"])
    assert (whole["finish_reason"], whole["stop_reason"]) == ("length", None)
    assert (last["finish_reason"], last["stop_reason"]) == ("length", None)


def test_the_prompt_ends_as_add_generation_prompt_and_continue_final_message_ask(
        app, engine, qwen_tokenizer):
    """vLLM's chat-template switches reach the prompt: a prefilled reply is continued."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, 4"}]
    for fields, end in (({}, "Sure, 4<|im_end|>\n<|im_start|>assistant\n"),
                        ({"add_generation_prompt": False}, "Sure, 4<|im_end|>\n"),
                        ({"continue_final_message": True}, "<|im_start|>assistant\nSure, 4"),
                        ({"continue_final_message": True, "add_generation_prompt": False},
                         "<|im_start|>assistant\nSure, 4")):
        body = json.loads(call(app, body=req(messages=messages, **fields))[2])
        prompt = qwen_tokenizer.decode(list(engine.requests[-1].prompt_ids),
                                       skip_special_tokens=False)
        assert prompt.endswith(end), (fields, prompt[-40:])
        assert body["choices"][0]["message"]["content"] == "Hello world"
    status, _, raw = call(app, body=req(messages=messages, continue_final_message=True,
                                        add_generation_prompt=True))
    assert status == 400 and json.loads(raw)["error"]["param"] == "continue_final_message"


@pytest.mark.parametrize("field, value", [("echo", True), ("use_beam_search", True),
                                          ("best_of", 2), ("prompt_logprobs", 1),
                                          ("chat_template", "{{ messages }}"),
                                          ("audio", {"voice": "alloy", "format": "wav"}),
                                          ("modalities", ["text", "audio"])])
def test_options_the_server_cannot_honour_are_refused_not_ignored(app, engine, field, value):
    status, _, raw = call(app, body=req(**{field: value}))
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == field and "not supported" in error["message"]
    assert engine.requests == []
    # The values that ask for nothing are fine.
    accepted = {"echo": False, "use_beam_search": False, "best_of": 1,
                "modalities": ["text"]}.get(field)
    assert call(app, body=req(**{field: accepted}))[0] == 200
    assert len(engine.requests) == 1


@pytest.mark.parametrize("stop, min_tokens, content, reason", [
    ("o", 0, "Hell", "o"), ("o", 1, "Hello w", "o"), ("o", 2, "Hello world", None),
    # vLLM: a stop string may begin in the first min_tokens tokens' text and end after it.
    ("lo w", 1, "Hel", "lo w"), ("lo w", 2, "Hello world", None), ("Hello", 1, "Hello world",
                                                                   None)])
def test_stop_strings_wait_for_min_tokens(app, engine, stop, min_tokens, content, reason):
    """"Hello world" is two tokens; no stop string may end in the first min_tokens."""
    engine.texts = ["Hello world"]
    for stream in (False, True):
        body = req(stop=[stop], min_tokens=min_tokens, stream=stream)
        raw = call(app, body=body)[2]
        if stream:
            got = streamed_content(sse(raw))[0]
            last = [e for e in sse(raw) if isinstance(e, dict) and e["choices"]][-1]
            stop_reason = last["choices"][0].get("stop_reason")
        else:
            choice = json.loads(raw)["choices"][0]
            got, stop_reason = choice["message"]["content"], choice.get("stop_reason")
        assert (got, stop_reason) == (content, reason), stream


def test_a_bad_json_schema_names_the_schema(app, engine):
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    status, _, raw = call(app, body=req(response_format=rf))
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "response_format.json_schema.schema"


def http_exchange(server, request: bytes, body: bytes = b"") -> tuple[bytes, dict]:
    """Send raw request bytes (then `body`), read until the server closes: (head, JSON body)."""
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        s.sendall(request)
        reply = b""
        if body:
            reply = s.recv(4096)  # an interim 100 Continue, or a final answer
            s.sendall(body)
        while chunk := s.recv(65536):
            reply += chunk
    interim, _, rest = reply.partition(b"\r\n\r\n") if reply.startswith(b"HTTP/1.1 100") \
        else (b"", b"", reply)
    head, _, data = rest.partition(b"\r\n\r\n") if rest.startswith(b"HTTP/") else (b"", b"", rest)
    return interim + b"|" + head, json.loads(data) if data else {}


def test_http_level_refusals_are_openai_errors_not_html(app):
    with http_server(app) as server:
        head, e = http_exchange(server, b"GET /health x HTTP/1.1\r\n\r\n")
        assert b" 400 " in head and b"application/json" in head and e["error"]["message"]
        # One word is HTTP/0.9 to http.server, which would send a bare body: a status line too.
        head, e = http_exchange(server, b"GARBAGE\r\n\r\n")
        assert head.startswith(b"|HTTP/1.0 400 ") and "GARBAGE" in e["error"]["message"]
        head, e = http_exchange(server, b"GET /health HTTP/2.0\r\n\r\n")
        assert head.startswith(b"|HTTP/1.0 505 ") and e["error"]["message"]
        many = b"".join(b"X-H%d: 1\r\n" % i for i in range(120))
        head, e = http_exchange(server, b"GET /health HTTP/1.1\r\n" + many + b"\r\n")
        assert b" 431 " in head and e["error"]["message"]
        head, e = http_exchange(server, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
        assert b" 414 " in head and e["error"]["message"]


def test_framing_and_content_type_problems_are_named(app, engine):
    body = json.dumps(req()).encode()
    post = b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer sekrit\r\n"
    with http_server(app) as server:
        head, e = http_exchange(server, post + b"Content-Type: application/json\r\n"
                                b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(body)
                                + body)
        assert b" 400 " in head and "Content-Length" in e["error"]["message"]
        head, e = http_exchange(server, post + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert b" 415 " in head and "(none)" in e["error"]["message"]
    assert not engine.requests


@pytest.mark.parametrize("chunked", [False, True])
def test_a_client_that_sends_an_oversized_body_first_still_reads_the_413(app, chunked):
    """http.client (and requests) send the whole body before reading the answer: the server
    reads and drops it, so they get the 413 and not a broken pipe."""
    import http.client

    body = b'{"model": "x", "pad": "' + b"a" * (24 << 20) + b'"}'  # more than socket buffers
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sekrit"}
    with http_server(app) as server:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=20)
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
            pieces = iter([body[i:i + 65536] for i in range(0, len(body), 65536)])
            conn.request("POST", "/v1/chat/completions", pieces, headers, encode_chunked=True)
        else:
            conn.request("POST", "/v1/chat/completions", body, headers)
        reply = conn.getresponse()
        assert reply.status == 413
        assert json.loads(reply.read())["error"]["code"] == "payload_too_large"
        conn.close()


def test_odd_but_valid_request_targets_and_lengths(app, engine):
    with http_server(app) as server:
        host = "http://{}:{}".format(*server.server_address[:2])
        head, reply = http_exchange(server, b"GET %s/v1/models HTTP/1.1\r\nAuthorization: "
                                    b"Bearer sekrit\r\n\r\n" % host.encode())
        assert b" 200 " in head and reply["data"][0]["id"] == MODEL  # absolute-form target
        head, e = http_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: "
                                b"Bearer sekrit\r\nContent-Type: application/json\r\n"
                                b"Content-Length: -1\r\n\r\n")
        assert b" 400 " in head and "Content-Length" in e["error"]["message"]


def test_expect_100_continue_is_answered_before_the_body(app, engine):
    """100 Continue once the body is wanted; a request refused without it (no key, too large)
    gets its final answer at once, and the client need not send the body at all."""
    body = json.dumps(req(max_tokens=3)).encode()

    def ask(auth=b"Authorization: Bearer sekrit\r\n", length=None):
        length = len(body) if length is None else length
        return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                + auth + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)

    with http_server(app) as server:
        head, reply = http_exchange(server, ask(), body)
        assert head.startswith(b"HTTP/1.1 100 Continue|") and b" 200 " in head
        assert reply["choices"][0]["message"]["content"] == "Hello world"
        t0 = time.monotonic()
        for request, status in [(ask(auth=b""), b" 401 "), (ask(length=10**7), b" 413 ")]:
            head, reply = http_exchange(server, request)  # sends no body: waits for the answer
            assert head.startswith(b"|HTTP/1.0" + status) and reply["error"], head
        assert time.monotonic() - t0 < 5  # answered, not left waiting for a body


def test_kv_cache_bytes_matches_init_cache():
    import jax.numpy as jnp

    from qwen_jax.config import PRESETS
    from qwen_jax.model import init_cache

    cfg = PRESETS["demo"]
    cache = init_cache(cfg, 3, 64, jnp.bfloat16)
    assert kv_cache_bytes(cfg, 64, 3, 2) == sum(a.nbytes for a in cache.k + cache.v)


# ------------------------------------------------------------------------------------------ hub


def make_cache(root: Path, repo: str, revs: list[str], main: str | None) -> Path:
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    for r in revs:
        (repo_dir / "snapshots" / r).mkdir(parents=True)
        (repo_dir / "snapshots" / r / "config.json").write_text("{}")
    if main:
        (repo_dir / "refs").mkdir(parents=True)
        (repo_dir / "refs" / "main").write_text(main + "\n")
    return repo_dir


def test_hub_resolution_via_refs_main(tmp_path):
    repo = make_cache(tmp_path, "Qwen/Qwen2.5-7B-Instruct", ["aaa", "bbb"], main="aaa")
    found = hub.find_in_cache("Qwen/Qwen2.5-7B-Instruct", tmp_path)
    assert found == repo / "snapshots" / "aaa"
    assert hub.served_name_for(found) == "Qwen/Qwen2.5-7B-Instruct"
    assert hub.resolve_model_dir("Qwen/Qwen2.5-7B-Instruct", tmp_path) == found
    assert hub.find_in_cache("Qwen/Other", tmp_path) is None


def test_hub_cache_location_from_env(tmp_path):
    assert hub.hf_hub_cache({"HF_HUB_CACHE": "/a"}) == Path("/a")
    assert hub.hf_hub_cache({"HF_HOME": "/b"}) == Path("/b/hub")
    assert hub.hf_hub_cache({"XDG_CACHE_HOME": "/c"}) == Path("/c/huggingface/hub")
    assert hub.hf_hub_cache({}) == Path.home() / ".cache/huggingface/hub"
    # huggingface_hub's legacy name, below the new one; $VAR and ~ expanded as it does.
    assert hub.hf_hub_cache({"HUGGINGFACE_HUB_CACHE": "/d", "HF_HOME": "/b"}) == Path("/d")
    assert hub.hf_hub_cache({"HUGGINGFACE_HUB_CACHE": "/d", "HF_HUB_CACHE": "/a"}) == Path("/a")
    assert hub.hf_hub_cache({"HF_HOME": "$W/x", "W": "/w"}) == Path("/w/x/hub")
    assert hub.hf_hub_cache({"HF_HUB_CACHE": "${W}/y/$NOPE"}) == Path("${W}/y/$NOPE")
    assert hub.hf_hub_cache({"HF_HOME": "~/h"}) == Path.home() / "h/hub"


def test_hub_cache_location_agrees_with_huggingface_hub(tmp_path):
    """The same directory huggingface_hub itself computes, in a fresh process per setting."""
    env_cases = [{"HUGGINGFACE_HUB_CACHE": str(tmp_path / "legacy")},
                 {"HF_HOME": "$QJ_BASE/home", "QJ_BASE": str(tmp_path)},
                 {"XDG_CACHE_HOME": str(tmp_path / "xdg")}]
    for extra in env_cases:
        env = {k: v for k, v in os.environ.items()
               if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")}
        env.update(extra)
        out = subprocess.run(
            [sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"],
            env=env, capture_output=True, text=True, check=True).stdout.strip()
        assert hub.hf_hub_cache(env) == Path(out), extra


def test_missing_model_names_the_download_command(tmp_path, monkeypatch):
    with pytest.raises(hub.ModelNotFoundError) as e:
        hub.resolve_model_dir("Qwen/Qwen2.5-7B-Instruct", tmp_path)
    assert "huggingface-cli download Qwen/Qwen2.5-7B-Instruct" in str(e.value)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert hub.served_name_for(plain) == "plain"
    with pytest.raises(hub.ModelNotFoundError, match="config.json"):
        hub.resolve_model_dir(str(plain))
    # A file, even one whose relative path looks like a hub id: not sent to the cache lookup.
    (plain / "model.bin").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hub.ModelNotFoundError, match="is a file"):
        hub.resolve_model_dir("plain/model.bin", tmp_path)
    # An empty --model (an unset shell variable) is not the working directory.
    (tmp_path / "config.json").write_text("{}")
    for empty in ("", " "):
        with pytest.raises(hub.ModelNotFoundError, match="--model is empty"):
            hub.resolve_model_dir(empty, tmp_path)


def test_a_models_folder_of_the_hub_cache_is_its_snapshot(tmp_path):
    """`--model ~/.cache/huggingface/hub/models--Org--Name` (the folder, not its snapshot):
    the snapshot refs/main names, served under the hub id; with none complete, the command
    that downloads it."""
    folder = tmp_path / "models--Qwen--Qwen2.5-Tiny"
    snap = folder / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    with pytest.raises(hub.ModelNotFoundError,
                       match="no complete snapshot: .*huggingface-cli download Qwen/Qwen2.5-Tiny"):
        hub.resolve_model_dir(str(folder))
    (snap / "config.json").write_text("{}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc123")
    assert hub.resolve_model_dir(str(folder)) == snap
    assert hub.hub_id_from_path(hub.resolve_model_dir(str(folder))) == "Qwen/Qwen2.5-Tiny"


def test_version_flag(capsys):
    from qwen_jax import __version__, cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"qwen-jax {__version__}"


def test_serve_missing_model_exits_cleanly(tmp_path):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [sys.executable, "-m", "qwen_jax.cli", "serve", "--model", "Qwen/Qwen2.5-7B-Instruct"],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent, timeout=120,
    )
    assert p.returncode == 2
    assert "huggingface-cli download Qwen/Qwen2.5-7B-Instruct" in p.stderr
    assert "neither a local directory nor in the local Hugging Face cache" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--prefill-chunk", "100", "--prefill-chunk must be a power of two >= 16, got 100"),
    ("--prefill-chunk", "8", "--prefill-chunk must be a power of two >= 16, got 8"),
    ("--steps-per-call", "0", "--steps-per-call must be at least 1"),
    ("--allowed-origins", "example.com", "'example.com' is not an origin"),
    ("--allowed-origins", " , ", "--allowed-origins needs at least one origin"),
    # README.md is a file: no directory can be made inside it.
    ("--compilation-cache", "README.md/xla", "--compilation-cache: cannot use README.md/xla"),
    # A directory that exists but cannot be written, even by root.
    ("--compilation-cache", "/proc/self", "--compilation-cache: cannot use /proc/self"),
    # Empty values: an unset shell variable must not turn auth off or listen everywhere.
    ("--api-key", "", "--api-key: must not be empty"),
    ("--host", "", "--host: must not be empty"),
    ("--served-model-name", "", "--served-model-name: must not be empty"),
    ("--port", "abc", "--port: invalid port value: 'abc'"),
    ("--port", "99999", "--port: must be in 0..65535, got 99999"),
    ("--max-num-seqs", "0", "--max-num-seqs: must be at least 1, got 0"),
    ("--max-model-len", "0", "--max-model-len: must be at least 2, got 0"),
    ("--max-queue", "-1", "--max-queue: must be at least 0, got -1"),
    ("--host", "no.such.host.invalid", "cannot listen on no.such.host.invalid:"),
])
def test_serve_rejects_bad_engine_flags_before_loading(tmp_path, flag, value, message):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [sys.executable, "-m", "qwen_jax.cli", "serve", "--model", "Qwen/Qwen2.5-7B-Instruct",
         flag, value],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent, timeout=120,
    )
    assert p.returncode == 2
    assert message in p.stderr
    assert "huggingface-cli download" not in p.stderr  # failed before looking for the model
    assert "Traceback" not in p.stderr


def test_serve_reports_a_port_in_use_before_loading(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
        p = subprocess.run(
            [sys.executable, "-m", "qwen_jax.cli", "serve", "--model",
             "Qwen/Qwen2.5-7B-Instruct", "--port", str(port)],
            capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent,
            timeout=120)
    assert p.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in p.stderr
    assert "huggingface-cli download" not in p.stderr and "Traceback" not in p.stderr


def test_serve_holds_its_port_while_it_loads(tmp_path):
    """The listening socket is bound before loading and kept: a second server started on the
    same port meanwhile fails at once (it used to load and warm up, then fail)."""
    import signal
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_jax.cli", "serve", "--model", "demo", "--port", str(port),
         "--compilation-cache", "off"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        cwd=Path(__file__).parent.parent)
    try:
        for line in proc.stdout:  # printed after loading, before the warm-up compiles
            if line.startswith("max_model_len"):
                break
        with socket.socket() as second, pytest.raises(OSError):
            second.bind(("127.0.0.1", port))
        assert proc.poll() is None  # still warming up
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.mark.parametrize("value", [None, "DIR", "off"])
def test_serve_compilation_cache_flag(monkeypatch, tmp_path, capsys, value):
    """`--compilation-cache`: the default directory (None: $QWEN_JAX_XLA_CACHE or
    ~/.cache/qwen-jax/xla), one given, or none at all with 'off'."""
    import qwen_jax.engine as engine_module
    from qwen_jax import launch
    from qwen_jax.cli import build_parser

    class Stop(Exception):
        pass

    def no_engine(*args, **kwargs):
        raise Stop  # the flag is read before the engine is built

    used = []
    monkeypatch.setattr(engine_module, "enable_compilation_cache",
                        lambda path=None: used.append(path) or path)
    monkeypatch.setattr(engine_module, "Engine", no_engine)
    flag = {None: [], "DIR": ["--compilation-cache", str(tmp_path)],
            "off": ["--compilation-cache", "off"]}[value]
    with pytest.raises(Stop):
        launch.serve(build_parser().parse_args(["serve", "--model", "demo", *flag]))
    assert used == {None: [None], "DIR": [str(tmp_path)], "off": []}[value]
    said = {None: "None", "DIR": str(tmp_path), "off": "off"}[value]
    assert f"compilation cache: {said}\n" in capsys.readouterr().out
    if value == "off":
        import jax

        assert jax.config.jax_compilation_cache_dir is None


def test_serve_refuses_a_max_model_len_over_the_models_context(monkeypatch, capsys):
    """As vLLM: positions past the model's context were never trained (it was a warning, and
    the server then served prompts past it)."""
    import qwen_jax.engine as engine_module
    from qwen_jax import launch
    from qwen_jax.cli import build_parser
    from qwen_jax.config import PRESETS

    built = []
    monkeypatch.setattr(engine_module, "Engine", lambda *a, **k: built.append(1))
    context = PRESETS["demo"].context_length
    args = build_parser().parse_args(["serve", "--model", "demo", "--compilation-cache", "off",
                                      "--max-model-len", str(context + 1)])
    assert launch.serve(args) == 2 and not built
    assert f"--max-model-len {context + 1} is over the model's context of {context} tokens" \
        in capsys.readouterr().err


def test_choose_dtype_auto_is_bfloat16_whose_cpu_decode_is_batch_invariant():
    """auto is bfloat16, batch-invariant with the default --max-num-seqs under the plan this
    machine picks (float32 is not: test_batch_invariance_note_names_what_breaks_invariance);
    an explicit dtype is kept."""
    from qwen_jax.cli import build_parser
    from qwen_jax.launch import batch_invariance_note, choose_dtype

    default_seqs = build_parser().parse_args(["serve"]).max_num_seqs
    assert choose_dtype("auto") == "bfloat16"
    assert batch_invariance_note(choose_dtype("auto"), False, default_seqs, backend="cpu") == ""
    assert [choose_dtype(d) for d in ("bfloat16", "float32")] == ["bfloat16", "float32"]


def test_max_tokens_zero_is_an_empty_length_reply(app, engine):
    body = json.loads(call(app, body=req(max_tokens=0, n=2))[2])
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert all(c["message"]["content"] in ("", None) for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 0 and not engine.requests
    events = sse(call(app, body=req(max_tokens=0, stream=True))[2])
    assert events[-1] == "[DONE]"
    finals = [c["finish_reason"] for ev in events[:-1] for c in ev["choices"] if c["finish_reason"]]
    assert finals == ["length"]


def test_default_steps_per_call_by_backend():
    from qwen_jax.engine import default_steps_per_call

    assert default_steps_per_call("cpu") == 1
    assert default_steps_per_call("gpu") == 8
    assert default_steps_per_call("tpu") == 8


def test_batch_invariance_note_names_what_breaks_invariance():
    """The start-up note appears exactly where a seeded request may decode differently in a
    batch: float32 weights on the CPU, more rows than the plan multiplies alike, int8 weights
    on an accelerator; not for bf16 or int8 within the plan's rows, nor bf16 on a GPU."""
    from qwen_jax.cpu_matmul import AVX2, AVX2_BATCHED, AVX512_BF16, use_plan
    from qwen_jax.launch import batch_invariance_note

    with use_plan(AVX2):
        assert batch_invariance_note("bfloat16", False, 8, backend="cpu") == ""
        assert batch_invariance_note("float32", True, 8, backend="cpu") == ""  # int8 weights
        assert "float32 weights" in batch_invariance_note("float32", False, 1, backend="cpu")
        note = batch_invariance_note("bfloat16", False, 9, backend="cpu")
        assert "--max-num-seqs 9 is over the 8 rows" in note and "avx2 " in note
        assert "over the 8 rows" in batch_invariance_note("bfloat16", True, 16, backend="cpu")
    with use_plan(AVX2_BATCHED):
        assert "over the 4 rows" in batch_invariance_note("bfloat16", False, 8, backend="cpu")
        assert batch_invariance_note("bfloat16", False, 4, backend="cpu") == ""
    with use_plan(AVX512_BF16):
        assert batch_invariance_note("bfloat16", False, 256, backend="cpu") == ""
        assert "over the 64 rows" in batch_invariance_note("bfloat16", True, 65, backend="cpu")
    assert batch_invariance_note("bfloat16", False, 8, backend="gpu") == ""
    assert batch_invariance_note("float32", False, 8, backend="gpu") == ""
    note = batch_invariance_note("bfloat16", True, 8, backend="gpu")
    assert note.startswith("note: a seeded request's tokens can depend on") and "int8" in note
    assert batch_invariance_note("bfloat16", True, 1, backend="gpu") == ""  # one row is all


MSGS = [{"role": "user", "content": "hi"}]


def test_the_server_gives_the_engine_the_defaults_for_omitted_fields(qwen_tokenizer):
    engine = FakeEngine(qwen_tokenizer)
    defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    app = make_app(engine, qwen_tokenizer, MODEL, 512, sampling_defaults=defaults)
    status, _, _ = call(app, body={"model": MODEL, "messages": MSGS}, auth=False)
    status2, _, _ = call(app, body={"model": MODEL, "messages": MSGS, "temperature": 0,
                                    "top_k": None}, auth=False)
    assert status == status2 == 200
    first, second = (r.sampling for r in engine.requests)
    assert (first.temperature, first.top_p, first.top_k, first.repetition_penalty) == (
        0.7, 0.8, 20, 1.05)
    assert (second.temperature, second.top_p, second.top_k) == (0.0, 0.8, 20)
    plain = FakeEngine(qwen_tokenizer)
    call(make_app(plain, qwen_tokenizer, MODEL, 512), auth=False,
         body={"model": MODEL, "messages": MSGS})
    assert plain.requests[0].sampling == SamplingParams(seed=plain.requests[0].sampling.seed)


def test_usage_reports_cached_prompt_tokens_only_with_prefix_caching(qwen_tokenizer):
    """With prefix caching, usage carries OpenAI's prompt_tokens_details.cached_tokens (the
    handle's count), in a JSON reply and in a stream's usage chunk; without, no such field."""
    for caching in (True, False):
        engine = FakeEngine(qwen_tokenizer)
        engine.prefix_caching = caching
        real_submit = engine.submit

        def submit(req, real_submit=real_submit):
            handle = real_submit(req)
            handle.cached_tokens = 7
            return handle

        engine.submit = submit
        app = make_app(engine, qwen_tokenizer, MODEL, 512)
        status, _, raw = call(app, body={"model": MODEL, "messages": MSGS}, auth=False)
        streamed = sse(call(app, body={"model": MODEL, "messages": MSGS, "stream": True,
                                       "stream_options": {"include_usage": True}},
                            auth=False)[2])
        for u in (json.loads(raw)["usage"], streamed[-2]["usage"]):
            assert ("prompt_tokens_details" in u) == caching
            if caching:
                assert u["prompt_tokens_details"] == {"cached_tokens": 7}
        assert status == 200


# -- the HTTP layer's own limits --------------------------------------------------------------


def test_a_socket_numbered_past_1023_is_watched_like_any_other():
    """select() cannot watch a descriptor >= 1024 (its ValueError read as "client gone", and
    cancelled the replies of a server holding ~1,000 connections); poll can."""
    import fcntl
    import resource

    from qwen_jax.httpd import socket_closed

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 1100:
        if hard != resource.RLIM_INFINITY and hard <= 1100:
            pytest.skip(f"the open-file limit ({hard}) allows no descriptor past 1100")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    a, b = socket.socketpair()
    high = socket.socket(fileno=fcntl.fcntl(b.fileno(), fcntl.F_DUPFD, 1100))
    b.close()
    try:
        assert high.fileno() >= 1100
        assert not socket_closed(high)
        a.sendall(b"x")
        assert not socket_closed(high) and high.recv(1) == b"x"  # data waiting is no hang-up
        a.close()
        assert socket_closed(high)
    finally:
        high.close()


def test_out_of_file_descriptors_waits_instead_of_spinning(app, caplog):
    """accept() failing with EMFILE leaves the connection queued and the listening socket
    readable: socketserver retried at once, at 100% CPU. Now it waits and says why, once."""
    import errno

    class NoDescriptors:
        def accept(self):
            raise OSError(errno.EMFILE, "Too many open files")

    caplog.set_level("WARNING", "qwen_jax.server")
    server = make_server(app, "127.0.0.1", 0)  # not serving: get_request is called here
    real, server.socket = server.socket, NoDescriptors()
    try:
        t0 = time.monotonic()
        for _ in range(3):
            with pytest.raises(OSError):
                server.get_request()
        assert time.monotonic() - t0 >= 0.15
    finally:
        server.socket = real
        server.server_close()
    warnings = [r.getMessage() for r in caplog.records if "file descriptors" in r.getMessage()]
    assert len(warnings) == 1 and "ulimit -n" in warnings[0]


@pytest.mark.parametrize(("soft", "hard", "raised", "limit"), [
    (1024, 4096, 4096, 1024),  # raised to the hard limit: all MAX_CONNECTIONS fit
    (256, 256, None, 128),  # cannot be raised: fewer connections, the rest kept for files
    (1024, -1, 1024 + 256, 1024),  # no hard limit (RLIM_INFINITY)
])
def test_serve_sizes_its_connections_to_the_open_file_limit(monkeypatch, soft, hard, raised,
                                                            limit):
    import resource

    from qwen_jax import httpd

    hard = resource.RLIM_INFINITY if hard == -1 else hard
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    assert httpd.connection_limit() == limit
    assert calls == ([] if raised is None else [(raised, hard)])


def test_an_early_refusal_reads_the_body_so_the_client_gets_it(qwen_tokenizer, engine):
    """A 401 (or 404, 405, 415) decided before the body is read: http.client sends the whole
    body before reading, and a closed socket with unread data resets the connection, which
    lost the answer (a broken pipe) for bodies of a few MB."""
    import http.client

    app = make_app(engine, qwen_tokenizer, MODEL, 512, api_key="sekrit")
    body = json.dumps(req(messages=[{"role": "user", "content": "x" * 12_000_000}])).encode()
    with http_server(app) as server:
        for path, key, status in [("/v1/chat/completions", "wrong", 401),
                                  ("/v1/nowhere", "sekrit", 404)]:
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
            conn.request("POST", path, body=body, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
            reply = conn.getresponse()
            assert reply.status == status and "error" in json.loads(reply.read())
            conn.close()
    assert not engine.requests


@pytest.mark.parametrize("form", ["+{}", "{}_", "{}x", "-{}", "arabic"])
def test_a_content_length_of_anything_but_digits_is_a_400(app, form):
    """Python's int() reads "+72", "7_2" and Arabic-Indic digits as 72: the body's true length
    written so is still refused."""
    body = json.dumps(req()).encode()
    n = str(len(body))
    length = {"{}_": n[:-1] + "_" + n[-1],
              "arabic": n.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))}.get(
                  form, form.format(n))
    status, _, raw = call(app, raw=body, headers={"CONTENT_LENGTH": length})
    assert status == 400 and json.loads(raw)["error"]["message"] == (
        "Invalid Content-Length header.")
