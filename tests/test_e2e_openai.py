"""End to end: the official `openai` client against a live `qwen-jax serve` subprocess.

The server (conftest `live_server`, started once per session) serves a tiny random float32
checkpoint with the real Qwen2.5 tokenizer, so text is noise but every token, template, tool-call
and grammar path is the real one. Malformed requests go through `http.client` directly.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time

import jsonschema
import openai
import pytest

from qwen_jax.chat_template import render_chat

pytestmark = pytest.mark.slow  # starts a server (compile) the first time

HELLO = [{"role": "user", "content": "Say hello in three words."}]
BAN_EOS = {"151645": -100, "151643": -100}  # keep a random model talking until max_tokens


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url, api_key=live_server.api_key,
                         max_retries=0, timeout=120)


def chat(client, live_server, **kw):
    kw.setdefault("messages", HELLO)
    return client.chat.completions.create(model=live_server.model, **kw)


def stream_text(client, live_server, **kw) -> tuple[dict[int, str], dict[int, str], list]:
    """Run a streamed request; returns (content by index, finish_reason by index, chunks)."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = list(chat(client, live_server, stream=True, **kw))
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, chunks


def test_models_and_health(client, live_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [live_server.model]
    conn = http.client.HTTPConnection(*live_server.host_port, timeout=30)
    conn.request("GET", "/health")  # no API key needed for the health check
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def test_startup_line_names_the_cpu_matmul_plan(live_server):
    """On the CPU the server says which matmul plan it serves with (its speed depends on it),
    and how many decode steps it takes per call."""
    import jax

    from qwen_jax.cpu_matmul import cpu_plan
    from qwen_jax.engine import default_steps_per_call

    line = next(ln for ln in live_server.log().splitlines() if "sequences: KV cache" in ln)
    assert ("CPU matmul plan" in line) == (jax.default_backend() == "cpu"), line
    if jax.default_backend() == "cpu":
        assert f"CPU matmul plan {cpu_plan().name} " in line, line
    # And how many decode steps each call takes.
    steps = default_steps_per_call()
    assert f", {steps} decode step{'s' if steps > 1 else ''} per call" in line, line
    # float32 weights, 4 rows: the note on batch invariance is printed where it applies (on
    # the CPU always: float32).
    from qwen_jax.launch import batch_invariance_note

    note = batch_invariance_note("float32", False, 4)
    assert (jax.default_backend() == "cpu") == bool(note)
    assert (note in live_server.log()) if note else ("note: a seeded" not in live_server.log())


def test_non_streaming_shape_and_usage(client, live_server, qwen_tokenizer):
    r = chat(client, live_server, max_tokens=8, seed=1)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == live_server.model
    (c,) = r.choices
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    # usage.prompt_tokens is exactly the rendered chat template's token count
    prompt_ids = qwen_tokenizer.encode(render_chat(HELLO))
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 8


def test_prompt_token_count_matches_official_template(client, live_server, qwen_tokenizer,
                                                      shared_reference):
    from transformers.utils import chat_template_utils as utils
    source = (shared_reference / "qwen2.5-instruct-chat-template.jinja").read_text()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 👋"}]
    rendered, _ = utils.render_jinja_template([msgs], chat_template=source,
                                              add_generation_prompt=True)
    r = chat(client, live_server, messages=msgs, max_tokens=1)
    assert r.usage.prompt_tokens == len(qwen_tokenizer.encode(rendered[0]))


def test_seed_reproducible_and_stream_equals_non_stream(client, live_server):
    kw = dict(max_tokens=12, seed=1234, temperature=1.0, n=2, logit_bias=BAN_EOS)
    a = chat(client, live_server, **kw)
    b = chat(client, live_server, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # n choices differ
    other = chat(client, live_server, **{**kw, "seed": 99})
    assert other.choices[0].message.content != a.choices[0].message.content
    texts, reasons, chunks = stream_text(client, live_server, **kw,
                                         stream_options={"include_usage": True})
    assert texts == {c.index: c.message.content for c in a.choices}
    assert reasons == {c.index: c.finish_reason for c in a.choices}
    # first chunk per choice carries the role; the last chunk is usage with no choices
    first = {}
    for ch in chunks:
        for c in ch.choices:
            first.setdefault(c.index, c.delta.role)
    assert first == {0: "assistant", 1: "assistant"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert len({ch.id for ch in chunks}) == 1


def test_stream_without_usage_ends_with_done(live_server):
    body = {"model": live_server.model, "messages": HELLO, "max_tokens": 3, "stream": True}
    status, headers, raw = http_request(live_server, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_stop_strings_cut_and_never_leak(client, live_server):
    kw = dict(max_tokens=16, seed=7, temperature=1.0, logit_bias=BAN_EOS)
    full = chat(client, live_server, **kw).choices[0].message.content
    assert len(full) >= 6
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.find(stop)]
    r = chat(client, live_server, stop=[stop, "\x00never"], **kw)
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    texts, reasons, _ = stream_text(client, live_server, stop=stop, **kw)
    assert texts[0] == cut and reasons[0] == "stop"


def test_logprobs(client, live_server):
    r = chat(client, live_server, max_tokens=6, seed=3, logprobs=True, top_logprobs=3,
             logit_bias=BAN_EOS)
    c = r.choices[0]
    entries = c.logprobs.content
    assert len(entries) == r.usage.completion_tokens == 6
    raw = b"".join(bytes(e.bytes) for e in entries)
    assert raw.decode("utf-8", errors="replace") == c.message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert e.logprob <= tops[0] + 1e-4  # sampled at temperature 1: at most the best one


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
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
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                           "b": {"type": "integer", "minimum": 0, "maximum": 999}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def check_calls(calls, names=None):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        assert call.function.name in (names or schemas)
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize("seed", [0, 1])
def test_tool_choice_required(client, live_server, seed):
    r = chat(client, live_server, messages=ASK, tools=TOOLS, tool_choice="required",
             max_tokens=200, seed=seed)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c.message
    check_calls(c.message.tool_calls)


def test_tool_choice_named_streamed_equals_non_streamed(client, live_server):
    kw = dict(messages=ASK, tools=TOOLS, max_tokens=200, seed=5,
              tool_choice={"type": "function", "function": {"name": "add"}})
    r = chat(client, live_server, **kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    check_calls(c.message.tool_calls, names=["add"])
    assert len(c.message.tool_calls) == 1
    calls: dict[int, dict] = {}
    finish = None
    for ch in chat(client, live_server, stream=True, **kw):
        for choice in ch.choices:
            for tc in choice.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function.name:
                    slot["name"] = tc.function.name
                slot["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(v["name"], json.loads(v["arguments"])) for v in calls.values()] == [
        (t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls]


def test_tool_choice_none_returns_content(client, live_server):
    r = chat(client, live_server, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length")


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates(client, live_server, seed):
    r = chat(client, live_server, max_tokens=120, seed=seed, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                               "strict": True}})
    c = r.choices[0]
    # Every string, number and array is bounded, so the grammar must end within 120 tokens.
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.message.content), PERSON)


def test_json_object_output(client, live_server):
    r = chat(client, live_server, max_tokens=150, seed=4, response_format={"type": "json_object"})
    c = r.choices[0]
    assert c.message.content.startswith("{")
    # "length" is allowed here only: any-object JSON has unbounded strings and keys, and a
    # random model may keep writing one until max_tokens. A finished answer must parse.
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    else:
        assert c.finish_reason == "length"


def test_concurrent_requests_do_not_mix(client, live_server):
    seeds = [11, 12, 13, 14, 15]
    kw = dict(max_tokens=10, temperature=1.0, logit_bias=BAN_EOS)
    alone = {s: chat(client, live_server, seed=s, **kw).choices[0].message.content for s in seeds}
    results: dict[int, str] = {}
    errors = []

    def run(s):
        try:
            results[s] = chat(client, live_server, seed=s, **kw).choices[0].message.content
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results == alone


LONG_HISTORY = [
    {"role": "user", "content": "Name three rivers in Europe and say where each one starts."},
    {"role": "assistant", "content": "The Danube starts in the Black Forest in Germany, the "
     "Rhine in the Swiss Alps, and the Loire in the Massif Central in France."},
    {"role": "user", "content": "Which of them is the longest, and which seas do they reach? "
     "Answer in one sentence for each river, then count to five."},
]


@pytest.mark.parametrize("msgs", [[{"role": "user", "content": "Count to five."}], LONG_HISTORY],
                         ids=["short", "chunked"])
def test_greedy_matches_transformers(client, live_server, served_checkpoint, qwen_tokenizer,
                                     msgs):
    import torch
    from transformers import Qwen2ForCausalLM

    # Prompt rendered by our render_chat (its byte-equality with the official template is
    # tested in test_chat_template.py).
    ids = qwen_tokenizer.encode(render_chat(msgs))
    # The live server prefills 64 tokens per call: the long history takes two.
    assert (len(ids) > 64) == (msgs is LONG_HISTORY)
    model = Qwen2ForCausalLM.from_pretrained(served_checkpoint, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             eos_token_id=list(qwen_tokenizer.eos_token_ids), pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    seq = out.sequences[0, len(ids):].tolist()
    new = [t for t in seq if t not in qwen_tokenizer.eos_token_ids]
    expected = qwen_tokenizer.decode(new, skip_special_tokens=True)
    r = chat(client, live_server, messages=msgs, max_tokens=12, temperature=0, logprobs=True)
    assert r.choices[0].message.content == expected
    # The tokens of a random model barely depend on the context; their logprobs do. The server
    # normalises over the tokenizer's ids (the embedding has padding rows beyond them).
    ref = [float(torch.log_softmax(step[0, : qwen_tokenizer.vocab_size], -1)[t])
           for step, t in zip(out.logits, seq)]
    got = [c.logprob for c in r.choices[0].logprobs.content]
    assert got == pytest.approx(ref[: len(got)], abs=1e-4)


# --------------------------------------------------------------------------- errors (http.client)


def http_request(live, method, path, body=None, *, headers=None, key=True, raw=None):
    conn = http.client.HTTPConnection(*live.host_port, timeout=60)
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {live.api_key}"
    h.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


def assert_error(status, headers, raw, expected, param=None):
    assert status == expected, raw
    assert headers["content-type"].startswith("application/json")
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_vllm_structured_outputs(client, live_server):
    """vLLM's guided_choice / structured_outputs as its clients send them (extra_body): each
    choice, streamed or not, is one of the strings or matches the regex, and ends there; a
    regex llguidance cannot take is a 400 naming the field."""
    colours = ["red", "green", "<|im_end|>"]  # the last spelled like the end-of-turn token
    r = chat(client, live_server, max_tokens=16, n=2, seed=1,
             extra_body={"guided_choice": colours})
    assert [(c.message.content in colours, c.finish_reason) for c in r.choices] == \
        [(True, "stop")] * 2
    regex = r"[0-9]{3}-[a-z]{2}"
    texts, reasons, _ = stream_text(client, live_server, max_tokens=16, seed=2, stop=["-"],
                                    extra_body={"structured_outputs": {"regex": regex}})
    assert re.fullmatch(regex, texts[0]) and reasons[0] == "stop", texts
    bad = {"model": live_server.model, "messages": HELLO, "guided_regex": "(?<=a)b"}
    err = assert_error(*http_request(live_server, "POST", "/v1/chat/completions", bad), 400,
                       "guided_regex")
    assert "look-around" in err["message"]


def test_vllm_ignore_eos_and_min_tokens(client, live_server, qwen_tokenizer):
    """With the end-of-turn token forced (logit_bias +100), a reply is that one token; with
    ignore_eos it runs to max_tokens (the token is not text); with min_tokens 3 the token is
    banned for three tokens and ends the fourth."""
    force = {str(i): 100 for i in qwen_tokenizer.eos_token_ids}

    def reply(**extra):
        r = chat(client, live_server, max_tokens=6, logit_bias=force, extra_body=extra)
        return r.usage.completion_tokens, r.choices[0].finish_reason

    assert reply() == (1, "stop")
    assert reply(ignore_eos=True) == (6, "length")
    assert reply(min_tokens=3) == (4, "stop")
    # A complete grammar still ends the choice under ignore_eos: `{"a": true}` or false, then
    # its end token, well before max_tokens.
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}
    r = chat(client, live_server, max_tokens=40, extra_body={"ignore_eos": True},
             response_format={"type": "json_schema",
                              "json_schema": {"name": "a", "schema": schema}})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 40
    assert json.loads(r.choices[0].message.content)["a"] in (True, False)


def test_error_statuses(live_server):
    ok = {"model": live_server.model, "messages": HELLO, "max_tokens": 1}
    post = "/v1/chat/completions"
    L = live_server
    assert_error(*http_request(L, "POST", post, ok, key=False), 401)
    assert_error(*http_request(L, "POST", post, ok, key=False,
                               headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(*http_request(L, "GET", "/v1/nothing"), 404)
    status, headers, raw = http_request(L, "GET", post)
    assert_error(status, headers, raw, 405)
    assert "POST" in headers["allow"]
    assert_error(*http_request(L, "POST", post, {**ok, "model": "gpt-4"}), 404, "model")
    assert_error(*http_request(L, "POST", post, {**ok, "temperature": 5}), 400, "temperature")
    assert_error(*http_request(L, "POST", post, {**ok, "n": 0}), 400, "n")
    assert_error(*http_request(L, "POST", post, raw=b'{"model": '), 400)
    assert_error(*http_request(L, "POST", post, ok, headers={"Content-Type": "text/plain"}), 415)
    bad_msgs = {**ok, "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                  "image_url": {"url": "x"}}]}]}
    err = assert_error(*http_request(L, "POST", post, bad_msgs), 400)
    assert err["param"].startswith("messages[0]")
    long = {**ok, "messages": [{"role": "user", "content": "hi " * 1100}]}
    err = assert_error(*http_request(L, "POST", post, long), 400)
    assert err["code"] == "context_length_exceeded"
    bad_schema = {**ok, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}}
    err = assert_error(*http_request(L, "POST", post, bad_schema), 400)
    assert err["param"].startswith("response_format")

    # A schema with no finite value is found only while generating (`{"a": ` and then nothing
    # can follow): a 400 naming the field, not a 500; streamed, an error event of that type.
    endless = {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}},
               "required": ["a"]}
    dead_end = {**ok, "max_tokens": 64, "seed": 3, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": endless}}}
    err = assert_error(*http_request(L, "POST", post, dead_end), 400, "response_format")
    assert "admits no value" in err["message"]
    status, _, raw = http_request(L, "POST", post, {**dead_end, "stream": True})
    events = [e[6:] for e in raw.decode().split("\n\n") if e]
    assert status == 200 and events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", "response_format")
    guided = {**ok, "max_tokens": 64, "seed": 3, "guided_json": endless}
    assert_error(*http_request(L, "POST", post, guided), 400, "guided_json")
    forced = {**ok, "max_tokens": 64, "seed": 3, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": endless}}]}
    assert_error(*http_request(L, "POST", post, forced), 400, "tools")


def test_body_over_limit_is_413_before_reading(live_server):
    conn = http.client.HTTPConnection(*live_server.host_port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Authorization", f"Bearer {live_server.api_key}")
    conn.putheader("Content-Length", str(10**9))  # and no body: the server must not wait for it
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["message"]
    conn.close()


def engine_active(live) -> int:
    return json.loads(http_request(live, "GET", "/health")[2])["active"]


def test_queue_full_429_and_disconnect_cancels(live_server):
    """4 slots, queue of 2: n=4 streams fill the slots, two more wait, the next gets 429.
    Closing the connections cancels everything (the slots free up at once)."""
    body = {"model": live_server.model, "messages": HELLO, "max_tokens": 900, "n": 4,
            "stream": True, "logit_bias": BAN_EOS}
    conns, statuses = [], []
    try:
        for _ in range(6):
            conn = http.client.HTTPConnection(*live_server.host_port, timeout=60)
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {live_server.api_key}"})
            r = conn.getresponse()
            statuses.append(r.status)
            conns.append((conn, r))
            if r.status == 429:
                err = json.loads(r.read())["error"]
                assert err["type"] == "rate_limit_error"
                break
        assert statuses[-1] == 429 and set(statuses[:-1]) == {200}, statuses
        assert engine_active(live_server) == 4
    finally:
        for conn, r in conns:  # hang up mid-stream (the response holds the socket open too)
            r.close()
            conn.close()
    deadline = time.monotonic() + 20  # 900 tokens x 3 requests would take much longer
    while engine_active(live_server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine_active(live_server) == 0


def test_the_server_compiled_nothing_after_warm_up(client, live_server):
    """What warm-up does not run as such (here three grammar-constrained choices decoded
    together; and, run before this test, this module's and the conformance tests' requests)
    runs programs that warm-up made: the engine logs any compile after warm-up as a warning."""
    out = chat(client, live_server, n=3, max_tokens=6, response_format={"type": "json_object"})
    assert len(out.choices) == 3
    chat(client, live_server, max_tokens=1)  # the engine iteration before has ended
    log = live_server.log()
    assert "compiled in" in log  # warm-up ran and printed its time
    assert "after warm-up" not in log, [ln for ln in log.splitlines() if "after warm-up" in ln]


def test_prefix_caching_reuses_the_previous_turn_through_the_api(served_checkpoint, tmp_path):
    """`serve --prefix-caching`: the second turn of a chat reuses the row that served the first
    (usage.prompt_tokens_details.cached_tokens); the live server without the flag reports no
    such field (next test)."""
    from conftest import start_server

    proc, url = start_server(
        ["--model", str(served_checkpoint), "--dtype", "float32", "--max-model-len", "256",
         "--max-num-seqs", "2", "--prefill-chunk", "16", "--prefix-caching"],
        tmp_path / "server.log")
    try:
        # The start-up line says it is on (and the live server's, without the flag, does not).
        started = (tmp_path / "server.log").read_text()
        assert ", prefix caching" in next(ln for ln in started.splitlines() if "KV cache" in ln)
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        turn = [{"role": "user", "content": "Tell me about the sea. " * 6}]
        first = client.chat.completions.create(model=model, messages=turn, max_tokens=6,
                                               temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        # The client's own text for the assistant turn (as a client may edit a reply): the
        # first turn's prompt is still held.
        turn += [{"role": "assistant", "content": "The sea is big."},
                 {"role": "user", "content": "And the mountains?"}]
        chunks = list(client.chat.completions.create(
            model=model, messages=turn, max_tokens=4, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        cached = usage.prompt_tokens_details.cached_tokens
        assert first.usage.prompt_tokens <= cached < usage.prompt_tokens
    finally:
        proc.terminate()
        proc.wait(15)


def test_sigterm_ends_running_requests_with_a_503_and_exits_cleanly(served_checkpoint,
                                                                    tmp_path):
    """docker stop / systemd / Kubernetes send SIGTERM: the server stops as on Ctrl-C, and the
    requests still running end with an error a client can retry (a 503; in a stream an error
    event), not with finish_reason "stop" as if complete (before: killed outright, streams cut
    without an end)."""
    import signal
    import urllib.request
    from urllib.parse import urlsplit

    from conftest import start_server

    proc, url = start_server(
        ["--model", str(served_checkpoint), "--dtype", "float32", "--max-model-len", "2048",
         "--max-num-seqs", "2"], tmp_path / "server.log")
    try:
        host = urlsplit(url)
        body = {"model": served_checkpoint.name, "max_tokens": 2000, "ignore_eos": True,
                "messages": [{"role": "user", "content": "hi"}]}
        whole: dict = {}

        def post_json():
            conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
            conn.request("POST", "/v1/chat/completions", json.dumps(body),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            whole["status"], whole["body"] = resp.status, json.loads(resp.read())

        waiter = threading.Thread(target=post_json)
        waiter.start()
        stream = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
        stream.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                       {"Content-Type": "application/json"})
        resp = stream.getresponse()
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data: ")
        health = f"http://{host.hostname}:{host.port}/health"
        deadline = time.monotonic() + 30
        while json.loads(urllib.request.urlopen(health).read())["active"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        events = [json.loads(line[6:]) if line != b"data: [DONE]" else "[DONE]"
                  for line in (first + resp.read()).splitlines() if line.startswith(b"data: ")]
        waiter.join(30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutting_down"
    assert not any(c.get("finish_reason") for ev in events[:-2] for c in ev["choices"])
    assert whole["status"] == 503 and whole["body"]["error"]["code"] == "server_shutting_down"
    assert "shutting down" in (tmp_path / "server.log").read_text()


def test_a_restart_loads_its_programs_from_the_compilation_cache(served_checkpoint, tmp_path):
    """The start-up line says how many programs came from the cache (a second start: all);
    unreadable entries (truncated files) are one warning line, not one per program."""
    from conftest import start_server

    cache = tmp_path / "xla"
    args = ["--model", str(served_checkpoint), "--dtype", "float32", "--max-model-len", "64",
            "--max-num-seqs", "1", "--prefill-chunk", "16", "--compilation-cache", str(cache)]

    def start(n: int) -> str:
        log_path = tmp_path / f"server{n}.log"
        proc, _ = start_server(args, log_path)
        proc.terminate()
        assert proc.wait(30) == 0
        return log_path.read_text()

    def counts(log: str) -> tuple[int, int]:
        m = re.search(r"compiled in [0-9.]+ s \((\d+) programs, (\d+) of them loaded", log)
        assert m, log
        return int(m.group(1)), int(m.group(2))

    programs, loaded = counts(start(1))
    assert programs > 0 and loaded == 0
    assert counts(start(2)) == (programs, programs)
    entries = [p for p in cache.iterdir() if p.is_file() and p.stat().st_size > 100]
    for entry in entries:
        with open(entry, "r+b") as f:
            f.truncate(100)
    log = start(3)
    assert counts(log)[1] < programs
    assert "could not be read" in log and "Error reading persistent compilation cache" not in log


def test_no_prompt_tokens_details_without_prefix_caching(client, live_server):
    reply = chat(client, live_server, max_tokens=2)
    assert reply.usage.prompt_tokens_details is None
    line = next(ln for ln in live_server.log().splitlines() if "KV cache" in ln)
    assert "prefix caching" not in line
