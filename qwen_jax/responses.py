"""Pure builders of the OpenAI response objects: chat.completion, chat.completion.chunk, usage.

Nothing here reads a clock or a random source except `new_completion_id`; the server passes ids and
timestamps in, so every builder is a plain function of its arguments. Shapes follow OpenAI's
schemas (and `spec/openapi.yaml`, which the tests validate them against).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Iterable, Sequence
from typing import NamedTuple

# $ per million tokens for `usage.estimated_cost`, a field of the hosted Qwen2.5-7B-Instruct API
# this server imitates (DeepInfra's, described in ../shared/reference/: "$0.025/$0.05 in/out
# Mtoken"); OpenAI clients ignore it.
PRICE_IN_PER_M = 0.025
PRICE_OUT_PER_M = 0.05

FINISH_REASONS = ("stop", "length", "tool_calls")
# OpenAI's stand-in for a log-probability too small to report (JSON has no -Infinity).
MIN_LOGPROB = -9999.0


def new_completion_id() -> str:
    """A fresh `chatcmpl-...` id (shared by every chunk of one streamed completion)."""
    return "chatcmpl-" + secrets.token_hex(12)


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    *,
    cached_tokens: int | None = None,
    price_in_per_m: float = PRICE_IN_PER_M,
    price_out_per_m: float = PRICE_OUT_PER_M,
) -> dict:
    """Token counts and the estimated cost in dollars; with `cached_tokens` (a server with
    prefix caching), OpenAI's `prompt_tokens_details.cached_tokens`: prompt tokens whose keys
    and values were reused rather than computed."""
    cost = (prompt_tokens * price_in_per_m + completion_tokens * price_out_per_m) / 1e6
    out: dict = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # Rounded so that 15 tokens read 3.75e-07, not 3.7500000000000006e-07.
        "estimated_cost": round(cost, 12),
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


class TokenLogprob(NamedTuple):
    """One generated token for `logprobs_content`.

    `token_bytes` are the token's raw bytes (a token can be part of a UTF-8 character, so its
    text alone cannot give them); None means "encode `token` as UTF-8". `top` are the most likely
    alternatives at that position, each itself a TokenLogprob (their own `top` is ignored).
    """

    token: str
    logprob: float
    token_bytes: bytes | None = None
    top: Sequence[TokenLogprob] = ()


def _logprob_number(x: float) -> float:
    x = float(x)
    # Clamped into [MIN_LOGPROB, 0]: float rounding can push a near-certain token above 0.
    return MIN_LOGPROB if math.isnan(x) or x < MIN_LOGPROB else min(x, 0.0)


def _token_entry(t: TokenLogprob) -> dict:
    raw = t.token_bytes if t.token_bytes is not None else t.token.encode("utf-8")
    return {"token": t.token, "logprob": _logprob_number(t.logprob), "bytes": list(raw)}


def logprobs_content(entries: Iterable[TokenLogprob | tuple]) -> dict:
    """OpenAI's choice `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for e in entries:
        t = TokenLogprob(*e)
        entry = _token_entry(t)
        entry["top_logprobs"] = [_token_entry(TokenLogprob(*alt)) for alt in t.top]
        content.append(entry)
    return {"content": content, "refusal": None}


def _check_finish_reason(finish_reason: str | None, *, allow_none: bool) -> None:
    if finish_reason is None and allow_none:
        return
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")


def choice(
    index: int,
    content: str | None,
    tool_calls: list | None,
    finish_reason: str,
    logprobs: dict | None,
    stop_reason: int | str | None = None,
) -> dict:
    """One element of a chat.completion's `choices`; `stop_reason` is vLLM's: the stop string
    or stop_token_ids id that ended the choice (None for the model's end of turn)."""
    _check_finish_reason(finish_reason, allow_none=False)
    message: dict = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = list(tool_calls)
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


def completion_response(
    id: str, created: int, model: str, choices: list[dict], usage: dict
) -> dict:
    """A complete (non-streamed) `chat.completion` object."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": list(choices),
        "usage": usage,
    }


def chunk_choice(index: int, delta: dict, finish_reason: str | None = None, logprobs=None,
                 *, stop_reason: int | str | None = None) -> dict:
    """One element of a chunk's `choices`; `delta` holds role/content/tool_calls as they arrive.
    The chunk that ends a choice also carries vLLM's `stop_reason` (see `choice`)."""
    _check_finish_reason(finish_reason, allow_none=True)
    out = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    if finish_reason is not None:
        out["stop_reason"] = stop_reason
    return out


def chunk(
    id: str, created: int, model: str, choices: list[dict], usage: dict | None = None,
    *, include_usage: bool = False,
) -> dict:
    """A `chat.completion.chunk`; the final usage chunk has `choices=[]` and `usage` set. When the
    request asked for usage, every other chunk says `"usage": null`, as OpenAI's do."""
    obj = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": list(choices),
    }
    if usage is not None or include_usage:
        obj["usage"] = usage
    return obj


def sse_event(obj: dict | str) -> bytes:
    """One server-sent event: `data: <json>` (or `data: [DONE]`) and a blank line."""
    data = obj if obj == "[DONE]" else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def model_list(model_id: str, created: int, owned_by: str = "qwen-jax",
               max_model_len: int | None = None) -> dict:
    """The `GET /v1/models` body: the one served model, with vLLM's `max_model_len` (tokens per
    sequence, prompt and reply: what clients read to size a conversation) when given."""
    model: dict = {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
    if max_model_len is not None:
        model["max_model_len"] = max_model_len
    return {"object": "list", "data": [model]}
