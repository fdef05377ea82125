"""Continuous batching: one thread owns the params and a static KV cache of `max_slots` rows.

Requests wait in a bounded queue; between decode steps the engine thread admits them into free
rows ("slots"), prefills their prompt, and from then on every decode step advances all busy rows
at once, each with its own position, sampling parameters, penalty counts, grammar mask and PRNG
stream. A row that finishes (EOS, max_tokens, cancel, error) frees its slot immediately.

How a request enters the batch: the prompt is prefilled into the request's first slot and copied
to its other slots (one per choice, so n choices share one prefill); the prefill's last call also
returns the logits at the prompt's last token, and the first new token of every choice is
sampled from them at once by the ordinary sampling program (no model pass) and streamed. Prefill
and decode therefore share one sampling path, and a request's first token waits neither for the
other prompts being prefilled nor for a decode call. Prompts are prefilled in calls of at most
`prefill_chunk` tokens, the requests taking turns, with a decode call for the rows already
generating after each chunk's worth: a long prompt's attention scores never exist all at once,
a short prompt does not wait behind a long one, and the other streams keep going. With prefix
caching (off by default) a free row remembers which tokens' keys and values it holds, and a
request that starts with them (the next turn of a chat) takes that row and prefills the rest.
A decode step runs only the busy rows (padded with free slots to a row bucket; on an
accelerator the one bucket is every slot: `default_row_buckets`), gathered from
and scattered back to their slots inside the compiled program (a call over every slot takes
them in slot order and needs no gather but for a prefix of the cache). With lookahead (by
default on an accelerator with several steps per call) the next decode call is dispatched, from
the last tokens still on the device, before the host streams the previous call's tokens.

Everything on device has static shapes: prefill is compiled once per power-of-two length bucket
up to the chunk, and the chunks after the first once more (on the CPU, where attention reads the
cache in chunks of KV_CHUNK keys, as many as the positions need) or once per power-of-two
`kv_len` bucket (elsewhere); a one-step decode runs the model (compiled per row bucket, and
elsewhere than on the CPU per `kv_len` bucket >= DECODE_MIN_KV too), then the sampler (per row
bucket); several steps per call run as one program per (`kv_len`, steps, row bucket). Nothing
recompiles in steady state.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import sampler as S
from qwen_jax.config import QwenConfig
from qwen_jax.model import KVCache, forward, init_cache
from qwen_jax.quantize import is_quantized

log = logging.getLogger(__name__)

MIN_BUCKET = 16
# On the CPU attention reads the cache in chunks of this many keys, in a loop as long as the
# longest row needs (model._attend_in_chunks): one compiled program for every cache length, in
# decode and in the prefill calls after a prompt's first. At the 0.5B shape a one-row decode step
# took as long as with a cache bucket of the row's length (chunks of 512: no faster), and an
# 8-row step at positions 700 and 3000 took 117 and 235 ms instead of 136 and 288 (a bucket reads
# up to twice the keys needed); a 512-token prefill call at offsets 512, 1536 and 3584 took 0.70,
# 0.97 and 1.43 s instead of 0.69, 1.10 and 1.90.
KV_CHUNK = 256
# Elsewhere decode attends to a power-of-two prefix of the cache of at least this length: a GPU
# runtime reads a data-dependent loop's predicate back on the host at every iteration (as it does
# for the sampler's lax.cond, engine.lookahead), which the chunk loop would do per layer and
# chunk; so one program per bucket there (not measured on a GPU: none was lent).
DECODE_MIN_KV = 256


class QueueFullError(RuntimeError):
    """The waiting queue is full; the server answers HTTP 429."""


# The error of the requests a closing engine ends (the server answers them 503): not "cancelled",
# which a client would read as a complete reply.
SHUTDOWN_ERROR = "the server is shutting down"


class EngineClosedError(RuntimeError):
    """The engine was closed or its thread died."""


class RequestError(ValueError):
    """An error a request's own input causes while it generates (a constraint whose grammar
    allows nothing more): the server answers 400 naming `param`, with this message."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class Constraint(Protocol):
    """A choice's grammar state. `allowed_tokens` may raise RequestError (the request's fault,
    a 400); any other exception from either method is a server error (500)."""

    def allowed_tokens(self) -> np.ndarray: ...
    def advance(self, token: int) -> None: ...
    def is_finished(self) -> bool: ...


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    sampling: S.SamplingParams
    max_tokens: int
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    constraints: Sequence[Constraint] | None = None  # one per choice
    logprobs: bool = False
    top_logprobs: int = 0
    min_tokens: int = 0  # stop_token_ids cannot be sampled before this many tokens (vLLM's)


@dataclass(frozen=True)
class TokenEvent:
    """One step of one choice. `token` is None on events that carry no token (a cancel, an
    error, or a grammar that finished without sampling a stop token)."""

    choice: int
    token: int | None
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...]
    finish_reason: str | None  # None | "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    # Set when the request itself caused the error (its grammar admits nothing more): the
    # request field to name in a 400; `error` is then the message for the client.
    error_param: str | None = None


class RequestHandle:
    """What `Engine.submit` returns: a stream of `TokenEvent`s and a way to cancel."""

    def __init__(self, engine: Engine, request: GenerationRequest) -> None:
        self.request = request
        self._engine = engine
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._cond = threading.Condition()
        self._open = set(range(request.n))  # choices without a final event yet
        self.cancel_requested: set[int] = set()  # read by the engine thread
        # Prompt tokens whose keys and values were already in the cache (prefix caching): set
        # when the request is admitted; usage reports them as cached_tokens.
        self.cached_tokens = 0

    # -- called by the engine thread --
    def _emit(self, ev: TokenEvent) -> None:
        with self._cond:
            if ev.choice not in self._open:
                return
            if ev.finish_reason is not None:
                self._open.discard(ev.choice)
            self._events.append(ev)
            self._cond.notify_all()

    # -- called by the consumer --
    @property
    def done(self) -> bool:
        with self._cond:
            return not self._open and not self._events

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Yield events until every choice has finished. `timeout` (seconds without an event)
        raises TimeoutError, for tests and watchdogs."""
        while True:
            with self._cond:
                if not self._events and not self._open:
                    return
                if not self._cond.wait_for(lambda: self._events, timeout):
                    raise TimeoutError("no event from the engine")
                ev = self._events.popleft()
            yield ev

    def cancel(self, choice: int | None = None) -> None:
        """Cancel one choice (or all): its slot is freed before the next decode step."""
        choices = range(self.request.n) if choice is None else [choice]
        with self._cond:
            self.cancel_requested.update(c for c in choices if c in self._open)
        self._engine._wake()


@dataclass
class _Row:
    handle: RequestHandle
    choice: int
    next_token: int  # fed to the next decode step
    position: int  # where next_token's key/value goes
    generated: int = 0  # tokens sampled so far (the sampler's step counter)
    constraint: Constraint | None = None
    ready: bool = True  # False while its prompt is being prefilled (not yet in decode calls)
    tokens: list[int] = field(default_factory=list)  # sampled so far (for prefix caching)


@dataclass
class _Prefill:
    """A request whose prompt is being prefilled, one call per turn (_advance_prefills)."""
    handle: RequestHandle
    rows: list[tuple[int, _Row]]  # (slot, row) per choice; the prompt goes into the first slot
    ids: np.ndarray  # the prompt
    plan: list[tuple[int, int, int | None]]  # its prefill calls (_prefill_plan or _reuse_plan)
    done: int = 0  # prefill calls run so far


@dataclass
class _Stats:
    compiles: int = 0
    compiles_after_warmup: int = 0
    decode_calls: int = 0
    decode_steps: int = 0
    lookahead_calls: int = 0  # decode calls dispatched before the previous call's tokens streamed
    prefills: int = 0  # prompts prefilled
    prefill_calls: int = 0  # prefill chunks run
    cached_tokens: int = 0  # prompt tokens not prefilled: their keys/values were in the cache
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Call:
    """A dispatched decode call: its outputs (device arrays, maybe not ready) and inputs."""

    outs: Any  # SampleOutput of [k, R] arrays
    last_tokens: Any  # [R] device array, the last step's tokens: a lookahead call's input
    rows: list[tuple[int, _Row]]  # (slot, row) of the busy rows (outputs: their `_columns`)
    slots: np.ndarray
    positions: np.ndarray
    steps: np.ndarray
    k: int


def _columns(slots: np.ndarray, busy: Sequence[int]) -> list[int]:
    """Where each of the slots `busy` is among a call's `slots` (its row of inputs and outputs)."""
    where = {int(s): j for j, s in enumerate(slots)}
    return [where[i] for i in busy]


def _banning_stops(row: _Row, ahead: int = 0) -> bool:
    """Whether the row's stop tokens are banned at its next token (`ahead` tokens on)."""
    r = row.handle.request
    return bool(r.stop_token_ids) and row.generated + ahead < r.min_tokens


_SHARED_PROGRAMS: dict[tuple, Any] = {}
_BACKEND_COMPILES = [0]
_THREAD_COMPILES = threading.local()  # the listener runs on the compiling thread


def _count_backend_compile(event: str, duration: float, **_: Any) -> None:
    # Recorded around the persistent cache's lookup too: a load from it counts.
    if event == "/jax/core/compile/backend_compile_duration":
        _BACKEND_COMPILES[0] += 1
        _THREAD_COMPILES.count = getattr(_THREAD_COMPILES, "count", 0) + 1


jax.monitoring.register_event_duration_secs_listener(_count_backend_compile)


def _count_cache_hit(event: str, **_: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_HITS[0] += 1


_CACHE_HITS = [0]
jax.monitoring.register_event_listener(_count_cache_hit)


def cache_hit_count() -> int:
    """Programs loaded from the persistent compilation cache in this process so far (each is
    also one of backend_compile_count's)."""
    return _CACHE_HITS[0]


def backend_compile_count() -> int:
    """XLA compiles in this process so far (any jit, not only the engine's; loads from the
    persistent compilation cache included): tests diff it."""
    return _BACKEND_COMPILES[0]


def thread_compile_count() -> int:
    """backend_compile_count's compiles on the calling thread."""
    return getattr(_THREAD_COMPILES, "count", 0)


def release_freed_memory() -> bool:
    """Return the heap memory that compiling freed to the OS (glibc keeps it mapped otherwise:
    about 200 MB after warming up the 0.5B model's programs). False where there is no glibc."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def pow2_bucket(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n (at least lo), capped at hi."""
    b = lo
    while b < n:
        b *= 2
    return min(b, hi)


def default_prefill_chunk(backend: str | None = None) -> int:
    """Prompt tokens per prefill call. On the CPU 512: the fastest of 256-2048 for a 2048-token
    prompt at the 0.5B shape (bf16: 92 tok/s, against 81 in one call). On an accelerator 2048,
    an estimate not yet measured there: each call also reads all the weights once (7B: 15 GB,
    about 5 ms at 3 TB/s, next to about 11 ms for the matrix products of 512 tokens at 600
    TFLOP/s), so larger chunks waste less, and the scores of a 2048-token chunk over an
    8192-token cache are 1.9 GB per layer at the 7B shape."""
    return 512 if (backend or jax.default_backend()) == "cpu" else 2048


def default_steps_per_call(backend: str | None = None) -> int:
    """Decode steps per device call. On an accelerator 8: several steps per call keep the
    device busy between host round trips (H200, 7B shapes, batch 1: 134 -> 190 tok/s).

    On the CPU 1. A multi-step call runs the layers inside a loop, where XLA materialises
    float32 copies of weights that a one-step program multiplies as they are (bf16: the
    embedding table, converted once for the lm_head; int8 under the AVX2 plan: every weight,
    every step), and every step reads them (bf16 demo model: 132 -> 19 tok/s; 0.5B int8, AVX2
    plan: 12.0 -> 5.0). Only int8 weights under the AVX512-BF16 plan, multiplied by int8
    levels as they are, gain from it (Xeon VM, 0.5B, 4 steps per call: batch 1 22.2 -> 23.9
    tok/s, batch 8 121 -> 135 in one process), and there it costs 0.46 GiB more peak memory and
    2.4x the warm-up (17 programs instead of 11; benchmarks/README.md): an option
    (`--steps-per-call 4`), not the default."""
    return 1 if (backend or jax.default_backend()) == "cpu" else 8


def default_row_buckets(max_slots: int, quantized: bool = False,
                        backend: str | None = None) -> list[int]:
    """Decode batch sizes compiled below max_slots (busy rows are padded up to the next one).

    On the CPU every power of two: a step costs about as much per row as a batch-1 step, and a
    row's results do not depend on the rows beside it (model.fixed_order_sum; YNNPACK's
    products).

    On an accelerator none, so every decode call runs max_slots rows: a step costs about the
    same for any batch there (it reads the weights once), and the GPU's matrix products round
    differently for different row counts. Measured on an H200 (benchmarks/batch_invariance.py,
    7B widths, 4 layers, bf16, 8 steps per call, 2 seeds): with 1- and 8-row programs a seeded
    request's logprobs differed from its second token between alone and beside 1, 3 or 7
    others (by up to 4.5e-5, enough to change sampled tokens); with 2- and 8-row programs,
    between beside 1 and beside 3 or 7; with 8 rows only, identical everywhere. Batch-1
    decode at the full 7B shape: 1 and 8 rows 169-171 tok/s, 8 rows only 174 (2 and 8: 197,
    not invariant); 8 rows only, max_len 1024, 198 since the 8-row step stopped sorting the
    vocabulary for the top log-probabilities and, where it reads the whole cache, gathering its
    cache rows (`all_slots`). Except int8 weights: one row has its own product off the CPU
    (linear._int8_linear: 264 tok/s at 7B where a batched product converts the weights first),
    so it keeps a 1-row program and is not batch-invariant there."""
    if (backend or jax.default_backend()) == "cpu":
        return [1 << i for i in range(max_slots.bit_length()) if 1 << i < max_slots]
    return [1] if quantized and max_slots > 1 else []


def check_prefill_chunk(chunk: int) -> int:
    """`chunk` if it is a valid prefill chunk (a power of two >= MIN_BUCKET), else ValueError."""
    if chunk < MIN_BUCKET or chunk & (chunk - 1):
        raise ValueError(f"prefill_chunk must be a power of two >= {MIN_BUCKET}, got {chunk}")
    return chunk


def all_buckets(max_len: int) -> list[int]:
    """Every power-of-two bucket from MIN_BUCKET up, capped at (and ending with) max_len."""
    out, b = [], MIN_BUCKET
    while True:
        out.append(min(b, max_len))
        if b >= max_len:
            return out
        b *= 2


def prefill_plan(n: int, chunk: int, max_len: int) -> list[tuple[int, int, int]]:
    """(start, length bucket, kv_len) of each prefill call for n prompt tokens.

    At most `chunk` tokens per call, so the attention scores of a long prompt never exist all
    at once (a single 8192-token call at the 0.5B shape needed 10.6 GiB of temporaries). The
    remainder goes first, padded to its bucket and attending to itself; then full chunks, each
    attending to the power-of-two cache prefix that its last position needs. The first call's
    padding is overwritten by the next chunk, and the calls' programs are the same for every
    prompt length: one per length bucket up to `chunk`, then one per kv_len bucket (where
    attention reads the cache in chunks, the CPU's default, `Engine._prefill_plan` makes the
    calls after the first one program)."""
    first = n - chunk * ((n - 1) // chunk)  # in [1, chunk]
    b = pow2_bucket(first, MIN_BUCKET, max_len)
    return [(0, b, b)] + [(s, chunk, pow2_bucket(s + chunk, chunk, max_len))
                          for s in range(first, n, chunk)]


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Use JAX's persistent compilation cache so a restarted server does not compile again.

    Default directory: $QWEN_JAX_XLA_CACHE or ~/.cache/qwen-jax/xla. Call once at start-up.
    OSError if it cannot be created or written (JAX would warn once per program and cache
    nothing).
    """
    p = Path(path or os.environ.get("QWEN_JAX_XLA_CACHE") or "~/.cache/qwen-jax/xla").expanduser()
    p.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=p):
        pass
    jax.config.update("jax_compilation_cache_dir", str(p))
    # Cache every compile: on CPU even the small ones cost a noticeable start-up delay.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return p


# ---------------------------------------------------------------------------------------------
# The device functions (pure; jitted per engine so their compile caches can be counted).


def _prefill(params, cache: KVCache, tokens, slot, start, last, *, cfg: QwenConfig,
             kv_len: int | None) -> tuple[jax.Array, KVCache]:
    """Prefill tokens[1, T] (right-padded) at positions start.. into cache row `slot`; they
    attend to the first kv_len cache entries (the row's earlier chunks and themselves; kv_len
    None: the cache read in chunks of KV_CHUNK keys, as many as the positions need). Returns
    the logits[1, V] of tokens[0, last] (in the last chunk: the prompt's last token) and the
    cache, in `forward`'s order."""
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    logits, cache = forward(params, cfg, tokens, positions, cache, kv_len=kv_len,
                            kv_chunk=KV_CHUNK if kv_len is None else None,
                            logits_at=last[None], cache_rows=slot[None])
    return logits, cache


def _copy_row(cache: KVCache, src, dst) -> KVCache:
    """Copy cache row src to row dst (the n choices of one request share one prefill)."""
    def cp(x):
        row = jax.lax.dynamic_index_in_dim(x, src, axis=0, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(x, row, dst, axis=0)

    return jax.tree_util.tree_map(cp, cache)


def _gather_rows(tree: Any, slots) -> Any:
    """Rows `slots` of every leaf; all of them, as they are, for slots None."""
    return tree if slots is None else jax.tree_util.tree_map(lambda a: a[slots], tree)


def _scatter_rows(tree: Any, part: Any, slots) -> Any:
    return part if slots is None else jax.tree_util.tree_map(
        lambda full, p: full.at[slots].set(p), tree, part)


# The decode programs below take `all_slots` (static): True when the call runs every cache row
# in slot order (slots = 0..max_slots-1, which the engine then passes), so that the sampling
# rows and the penalty state are used as they are rather than gathered by `slots`, and so is the
# cache where attention reads all of it (kv_len = max_len). A shorter prefix of it is read by
# gathering the rows anyway: XLA copies a slice of the cache, and transposes it, where a gather
# of the same keys is one copy (H200, 7B shape, 8 rows, per decode step: kv_len = max_len 1024,
# 5.09 ms of kernels without the gather, 5.30 with it; kv_len 1024 of max_len 4096, the slice
# and its transposes 0.64 ms where the gather took 0.25).


def _forward_rows(params, cache: KVCache, slots, tokens, positions, *, cfg: QwenConfig,
                  kv_len: int | None, all_slots: bool = False):
    """One decode step's model half: logits[R, V] of tokens[R] at positions[R] in the R cache
    rows `slots`, and the cache with their keys/values written. kv_len None: the cache is read
    in chunks of KV_CHUNK keys."""
    whole = kv_len is not None and kv_len == cache.k[0].shape[1]
    return forward(params, cfg, tokens[:, None], positions[:, None], cache, kv_len=kv_len,
                   kv_chunk=KV_CHUNK if kv_len is None else None,
                   logits_at=jnp.zeros(tokens.shape, jnp.int32),
                   cache_rows=None if all_slots and whole else slots)


def _sample_rows(logits, pstate, sbatch, slots, steps, allowed, *, vocab_limit: int,
                 all_slots: bool = False):
    """One decode step's sampling half, for the rows `slots`: outputs shaped as _decode's for
    one step, the sampled tokens as [R] (a lookahead call's input), and the penalty state with
    the sampled tokens counted (not for rows at step -1: padding that may be another request's
    row)."""
    slots = None if all_slots else slots
    ps = _gather_rows(pstate, slots)
    out = S.sample(logits, _gather_rows(sbatch, slots), ps, steps, allowed,
                   vocab_limit=vocab_limit)
    ps = S.update_penalty_state(ps, jnp.where(steps >= 0, out.tokens, -1))
    return (jax.tree_util.tree_map(lambda x: x[None], out), out.tokens,
            _scatter_rows(pstate, ps, slots))


def _decode(params, cache, pstate, sbatch, slots, tokens, positions, steps, allowed, *,
            cfg: QwenConfig, kv_len: int | None, vocab_limit: int, num_steps: int,
            all_slots: bool = False):
    """`num_steps` decode steps for the R cache rows `slots` (distinct): feed tokens[R] at
    positions[R], sample, repeat. Running only the busy rows matters on a CPU, where a step costs
    about as much per row as a batch-1 step. Returns the [num_steps, R] outputs, the last step's
    tokens [R] (indexing the outputs on the host's side would compile a small program per
    shape), the cache and the penalty state."""
    # Gathered once, scattered back after the last step.
    rows = None if all_slots else slots
    sb, ps = _gather_rows(sbatch, rows), _gather_rows(pstate, rows)

    def step(carry, _):
        cache, ps, tokens, positions, steps = carry
        logits, cache = _forward_rows(params, cache, slots, tokens, positions, cfg=cfg,
                                      kv_len=kv_len, all_slots=all_slots)
        out = S.sample(logits, sb, ps, steps, allowed, vocab_limit=vocab_limit)
        ps = S.update_penalty_state(ps, out.tokens)
        # A padding row (position -1) stays out of the cache for all the call's steps.
        positions = jnp.where(positions < 0, positions, positions + 1)
        return (cache, ps, out.tokens, positions, steps + 1), out

    carry = (cache, ps, tokens, positions, steps)
    (cache, ps, last, *_), outs = jax.lax.scan(step, carry, None, length=num_steps)
    return outs, last, cache, _scatter_rows(pstate, ps, rows)


# ---------------------------------------------------------------------------------------------


class Engine:
    """Continuous-batching generation over a static `[max_slots, max_len]` KV cache."""

    def __init__(self, params: Any, cfg: QwenConfig, *, max_slots: int = 8, max_len: int = 2048,
                 vocab_limit: int | None = None, queue_size: int = 64,
                 steps_per_call: int = 1, prefill_chunk: int | None = None,
                 cache_dtype: Any = None,
                 row_buckets: Sequence[int] | None = None, lookahead: bool | None = None,
                 chunked_attention: bool | None = None, prefix_caching: bool = False,
                 start: bool = True) -> None:
        """`row_buckets`: the decode batch sizes compiled (busy rows are padded up to the next
        one; max_slots is always one). Default: `default_row_buckets` (every power of two on the
        CPU, max_slots alone on an accelerator).

        `prefill_chunk`: prompt tokens per prefill call (default: `default_prefill_chunk()`).

        `lookahead`: dispatch each decode call before streaming the previous one's tokens (see
        `_step`). Default: on an accelerator with several steps per call, where the host's work
        between calls otherwise leaves the device idle (H100, 7B shapes, batch 1, 8 steps per
        call: 147 -> 170 tok/s in two runs, no change in a third); not with one step per call,
        where it measured 1-10% slower there (a profile of the 8-step program shows the
        dispatching thread held inside the call for most of each step, waiting in a `lax.cond`
        of the sampler, whose predicate the GPU runtime reads on the host), nor on the CPU,
        where it made no measurable difference at the 0.5B shape (bf16, 5 alternating pairs)
        and a call that a stop token makes useless costs a whole step of both cores.

        `chunked_attention`: decode, and each prefill call after a prompt's first, read the
        cache in chunks (one program per row bucket, and one for those prefill calls) rather
        than a power-of-two prefix of it (one program per prefix length too). Default: on the
        CPU (KV_CHUNK, DECODE_MIN_KV say why).

        `prefix_caching`: a free row keeps the keys and values of its last request's prompt and
        reply, and a request that begins with the same tokens (the next turn of a chat) is
        admitted into that row and prefills only the rest (`_choose_slots`, `_reuse_start`;
        warm-up compiles what those calls need). Off by default: the reused keys were computed
        in other calls (other chunk boundaries, decode steps) than a prompt's own prefill would
        run, so a seeded request's logits can differ in their last bits with and without a hit,
        and its tokens with them."""
        if max_slots < 1 or max_len < 2 or queue_size < 0 or steps_per_call < 1:
            raise ValueError("max_slots >= 1, max_len >= 2, queue_size >= 0, steps_per_call >= 1")
        if prefill_chunk is None:
            prefill_chunk = default_prefill_chunk()
        check_prefill_chunk(prefill_chunk)
        if row_buckets is None:
            row_buckets = default_row_buckets(max_slots, is_quantized(params))
        if any(not 1 <= r <= max_slots for r in row_buckets):
            raise ValueError(f"row_buckets must lie in [1, {max_slots}]")
        self.row_buckets = sorted(set(row_buckets) | {max_slots})
        self.params, self.cfg = params, cfg
        self.max_slots, self.max_len, self.queue_size = max_slots, max_len, queue_size
        self.vocab_limit = min(vocab_limit or cfg.vocab_size, cfg.vocab_size)
        self.steps_per_call = steps_per_call
        self.prefill_chunk = prefill_chunk
        self.prefix_caching = prefix_caching
        # Per slot: the tokens whose keys/values its cache row holds from position 0 (while
        # the slot is free, those of its last request; kept only with prefix caching).
        self._kept: list[list[int]] = [[] for _ in range(max_slots)]
        if lookahead is None:
            lookahead = jax.default_backend() != "cpu" and steps_per_call > 1
        self.lookahead = lookahead
        if chunked_attention is None:
            chunked_attention = jax.default_backend() == "cpu"
        self.chunked_attention = chunked_attention
        self._inflight: _Call | None = None  # the call dispatched ahead (lookahead)
        self._trimmed_at = 0  # device calls made when the heap was last trimmed (_loop)
        if cache_dtype is None:
            cache_dtype = params.final_norm.dtype  # the activation dtype, also for int8 weights
        self.cache = init_cache(cfg, max_slots, max_len, cache_dtype)
        self.sbatch = S.make_sampling_batch(max_slots)
        self.pstate = S.init_penalty_state(max_slots, cfg.vocab_size)
        self._all_true: dict[int, jax.Array] = {}  # [R, V] all-True masks, kept on device

        # Compiled programs, one per static signature, built explicitly (AOT) so that warm-up
        # compiles without running every program (no 8k-token prefill at start-up) and compiles
        # are counted (_program).
        self._programs: dict[tuple, Any] = {}
        self.stats = _Stats()
        self._warm = False
        # Programs compiled on each thread (_note_other_compiles).
        self._compiled_here = threading.local()
        self._slots: list[_Row | None] = [None] * max_slots
        # Admitted requests still prefilling, in turn order (a request goes to the back after
        # each of its prefill calls).
        self._prefills: collections.deque[_Prefill] = collections.deque()
        self._dirty: set[int] = set()  # freed rows whose sampling params are stale
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._cond = threading.Condition()
        self._device_lock = threading.Lock()  # the loop and warmup() both use params + cache
        self._closed = False
        self._dead: str | None = None
        self._thread = threading.Thread(target=self._loop, name="qwen-jax-engine", daemon=True)
        if start:
            self._thread.start()

    # ---------------------------------------------------------------- public API

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises ValueError for a malformed one, QueueFullError when full."""
        self._validate(request)
        handle = RequestHandle(self, request)
        with self._cond:
            if self._closed or self._dead:
                raise EngineClosedError(self._dead or SHUTDOWN_ERROR)
            if not self._has_room_unlocked(request.n):
                raise QueueFullError(f"the queue is full: {self._queued_unlocked()[1]} "
                                     f"request(s) wait for free rows (queue_size "
                                     f"{self.queue_size})")
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def warmup(self, prompt_lengths: Sequence[int] | None = None,
               kv_lens: Sequence[int] | None = None, rows: Sequence[int] | None = None) -> None:
        """Compile prefill for the buckets of `prompt_lengths` (default: every bucket) and decode
        for every row bucket up to that of max(`rows`) busy rows (default: all) and, unless
        decode is chunked, for the kv_len buckets of the cache lengths `kv_lens` (default: all):
        requests arriving together join one or a few at a time, so their batch passes through
        the smaller buckets, and each request's first tokens are sampled on the bucket of its n.
        Afterwards a compile, of a program or of anything else on the engine thread, is
        logged as a warning."""
        lengths = list(prompt_lengths) if prompt_lengths is not None else self._all_buckets()
        # (With prefix caching these are also the calls that follow a reused prefix.)
        prefills = sorted({(b, kv) for n in lengths for _, b, kv in self._prefill_plan(n)},
                          key=lambda p: (p[0], p[1] or 0))
        kvs = sorted({self._decode_kv(n) for n in kv_lens or self._all_buckets()},
                     key=lambda kv: kv or 0)
        t0 = time.perf_counter()
        with self._device_lock:
            for b, kv in prefills:
                self._program("prefill", b, kv)
            self._program("copy")
            row_buckets = self.row_buckets if rows is None else [
                r for r in self.row_buckets if r <= self._row_bucket(max(rows))]
            for r in row_buckets:
                self._program("sample", r)
                for kv in kvs:
                    self._program("forward", kv, r)
                    if self.steps_per_call > 1:
                        self._program("decode", kv, self.steps_per_call, r)
            self._run_programs_once(prefills, kvs, row_buckets)
            self._warm = True
        self.stats.extra["warmup_s"] = time.perf_counter() - t0
        release_freed_memory()

    def _run_programs_once(self, prefills: Sequence[tuple[int, int | None]],
                           kvs: Sequence[int | None], row_buckets: Sequence[int]) -> None:
        """Run each decode program once, and each prefill program but those over a cache
        bucket longer than a chunk, on idle input: decode rows at position -1 and prefill
        tokens at positions past max_len, or before 0 for chunked attention, which then reads
        one chunk (no key or value is written, no token is kept). The first run of a compiled
        program on the CPU sets up its YNNPACK operators (0.5B shape: a one-row decode step
        took 404 ms, then 44-56 ms; a 128-token prefill 722 ms, then 181 ms), so without this
        the first request to reach each bucket would wait that long. A prefill over a longer
        cache bucket would read all of it: a long prefill at start-up. The penalty state the
        idle samples count into is put back."""
        for b, kv in prefills:
            if kv is None or kv <= self.prefill_chunk:
                start = -b if kv is None else self.max_len
                _, self.cache = self._program("prefill", b, kv)(
                    self.params, self.cache, np.zeros((1, b), np.int32), np.int32(0),
                    np.int32(start), np.int32(b - 1))
        saved = jax.tree_util.tree_map(jnp.copy, self.pstate)
        # What a request's join runs besides programs (the row updates, jitted on first use,
        # and the copy for n > 1): 0.42 s of the first request's time to first token at the 0.5B
        # shape otherwise. On a free row, left as a free row is (idle params; the penalty row
        # comes back with the rest below).
        free = next((i for i, r in enumerate(self._slots) if r is None), None)
        if free is not None:
            self.sbatch = S.set_row(self.sbatch, free, S.IDLE_PARAMS, seed=0)
            self.pstate = S.set_penalty_row(self.pstate, free, [])
            self.cache = self._program("copy")(self.cache, np.int32(free), np.int32(free))
        for r in row_buckets:
            slots, zeros = np.arange(r, dtype=np.int32), np.zeros(r, np.int32)
            idle = np.full(r, -1, np.int32)
            allowed = self._all_allowed(r)
            for kv in kvs:
                logits, self.cache = self._program("forward", kv, r)(
                    self.params, self.cache, slots, zeros, idle)
                _, _, self.pstate = self._program("sample", r)(
                    logits, self.pstate, self.sbatch, slots, zeros, allowed)
                if self.steps_per_call > 1:
                    _, _, self.cache, self.pstate = self._program(
                        "decode", kv, self.steps_per_call, r)(
                        self.params, self.cache, self.pstate, self.sbatch, slots, zeros, idle,
                        zeros, allowed)
        self.pstate = saved
        jax.block_until_ready((self.cache, self.pstate))

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            return {"active": self.max_slots - self._free_slots_unlocked(),
                    "waiting": len(self._waiting), "compiles": self.stats.compiles,
                    "compiles_after_warmup": self.stats.compiles_after_warmup,
                    "decode_steps": self.stats.decode_steps, "tokens": self.stats.tokens}

    # ---------------------------------------------------------------- validation & buckets

    def _validate(self, r: GenerationRequest) -> None:
        ids = list(r.prompt_ids)
        if not ids:
            raise ValueError("prompt_ids is empty")
        if any(not isinstance(t, (int, np.integer)) or not 0 <= t < self.cfg.vocab_size
               for t in ids):
            raise ValueError(f"prompt_ids must be token ids in [0, {self.cfg.vocab_size})")
        if not isinstance(r.max_tokens, int) or r.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {r.max_tokens!r}")
        if len(ids) + r.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({r.max_tokens}) exceeds "
                             f"the engine's max_len {self.max_len}")
        if not isinstance(r.n, int) or not 1 <= r.n <= self.max_slots:
            raise ValueError(f"n must be in [1, {self.max_slots}], got {r.n!r}")
        if r.constraints is not None and len(r.constraints) != r.n:
            raise ValueError(f"need one constraint per choice ({r.n}), got {len(r.constraints)}")
        if not 0 <= r.top_logprobs <= S.NUM_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {S.NUM_TOP_LOGPROBS}]")
        if not isinstance(r.min_tokens, int) or not 0 <= r.min_tokens <= r.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {r.min_tokens!r}")

    def _prefill_plan(self, n: int) -> list[tuple[int, int, int | None]]:
        """prefill_plan's calls, with kv_len None (the cache read in chunks) for every call
        after the first when attention is chunked, and with prefix caching for the first too:
        then a prompt prefilled whole goes through the same attention code as one prefilled
        after a reused prefix (a seeded request's first reply on a fresh row differed from its
        replays when the first call attended in one piece)."""
        plan = prefill_plan(n, self.prefill_chunk, self.max_len)
        if not self.chunked_attention:
            return plan
        first = plan[:1] if not self.prefix_caching else [(0, plan[0][1], None)]
        return first + [(start, b, None) for start, b, _ in plan[1:]]

    def _all_buckets(self) -> list[int]:
        return all_buckets(self.max_len)

    def _decode_kv(self, n: int) -> int | None:
        """The kv_len a decode call over cache length n is compiled for (None: chunked)."""
        return None if self.chunked_attention else pow2_bucket(n, DECODE_MIN_KV, self.max_len)

    def _row_bucket(self, busy: int) -> int:
        return next(r for r in self.row_buckets if r >= busy)

    def _free_slots_unlocked(self) -> int:
        return sum(r is None for r in self._slots)

    def _queued_unlocked(self) -> tuple[int, int]:
        """(free slots left, requests waiting) once the free slots have taken the queued
        requests they would take now: first in, first out, all of a request's choices at once;
        behind a request that does not fit, everything waits."""
        free, waiting = self._free_slots_unlocked(), 0
        for h in self._waiting:
            if waiting == 0 and h.request.n <= free:
                free -= h.request.n
            else:
                waiting += 1
        return free, waiting

    def _has_room_unlocked(self, n: int) -> bool:
        """Whether a request of `n` choices may join the queue: at most `queue_size` requests
        may wait (`_queued_unlocked`). (Counting every free slot as room let requests of several
        choices, which free slots cannot always take, pile up past it.)"""
        free, waiting = self._queued_unlocked()
        return (waiting == 0 and n <= free) or waiting < self.queue_size

    def _spec(self, tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)

    def _program(self, kind: str, *key: int | None) -> Any:
        """The compiled program for (kind, *key), compiling it on first use."""
        prog = self._programs.get((kind, *key))
        if prog is not None:
            return prog
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        if kind == "prefill":
            args = (self.params, self.cache, jax.ShapeDtypeStruct((1, key[0]), jnp.int32), i32,
                    i32, i32)
        elif kind == "copy":
            args = (self.cache, i32, i32)
        elif kind == "forward":
            row = jax.ShapeDtypeStruct((key[1],), jnp.int32)
            args = (self.params, self.cache, row, row, row)
        elif kind == "sample":
            row = jax.ShapeDtypeStruct((key[0],), jnp.int32)
            args = (jax.ShapeDtypeStruct((key[0], self.cfg.vocab_size), jnp.float32),
                    self.pstate, self.sbatch, row, row,
                    jax.ShapeDtypeStruct((key[0], self.cfg.vocab_size), jnp.int8))
        else:
            row = jax.ShapeDtypeStruct((key[2],), jnp.int32)
            mask = jax.ShapeDtypeStruct((key[2], self.cfg.vocab_size), jnp.int8)
            args = (self.params, self.cache, self.pstate, self.sbatch, row, row, row, row, mask)
        specs = tuple(map(self._spec, args))
        # Engines of one shape in one process (tests, the benchmark) share compiled programs.
        shared_key = (kind, key, self.cfg, self.vocab_limit, repr(specs))
        prog = _SHARED_PROGRAMS.get(shared_key)
        if prog is None:
            t0 = time.perf_counter()
            rows = key[-1] if kind in ("decode", "forward", "sample") else None
            every = rows == self.max_slots  # all_slots: see _padded_slots
            static = (dict(kv_len=key[0], num_steps=key[1], all_slots=every)
                      if kind == "decode" else
                      dict(kv_len=key[1]) if kind == "prefill" else
                      dict(kv_len=key[0], all_slots=every) if kind == "forward" else
                      dict(all_slots=every) if kind == "sample" else {})
            prog = _SHARED_PROGRAMS[shared_key] = self._jitted(kind).lower(
                *specs, **static).compile()
            self.stats.compiles += 1
            self._compiled_here.programs = getattr(self._compiled_here, "programs", 0) + 1
            self.stats.extra["compile_s"] = self.stats.extra.get("compile_s", 0.0) + (
                time.perf_counter() - t0)
            if self._warm:
                self.stats.compiles_after_warmup += 1
                log.warning("engine compiled %s%s after warm-up (%.1f s)", kind, key,
                            time.perf_counter() - t0)
        self._programs[(kind, *key)] = prog
        return prog

    def _jitted(self, kind: str) -> Callable[..., Any]:
        """A new jitted function for one compile. jax caches a function's traced program and
        its lowering for as long as the function lives; the engine keeps the compiled program
        only, so these caches go with the function (0.5B shape on the CPU: 34 instead of 45 MiB
        held per decode program, 16 programs for `serve`'s defaults)."""
        if kind == "prefill":
            return jax.jit(partial(_prefill, cfg=self.cfg), static_argnames=("kv_len",),
                           donate_argnums=(1,))
        if kind == "copy":  # a new function object too, for the caches to go with it
            return jax.jit(partial(_copy_row), donate_argnums=(0,))
        if kind == "decode":
            return jax.jit(partial(_decode, cfg=self.cfg, vocab_limit=self.vocab_limit),
                           static_argnames=("kv_len", "num_steps", "all_slots"),
                           donate_argnums=(1, 2))
        if kind == "forward":
            # One step per call runs as two programs: the model (one per kv_len and row
            # bucket) and the sampler (one per row bucket only), instead of a sampler compiled
            # into every decode program: at the 0.5B shape on the CPU, when the model was
            # compiled per cache bucket there too, warming up max_len 2048 and 1 and 8 rows took
            # 44 s instead of 71 s and held 307 instead of 419 MiB.
            return jax.jit(partial(_forward_rows, cfg=self.cfg),
                           static_argnames=("kv_len", "all_slots"), donate_argnums=(1,))
        assert kind == "sample", kind
        return jax.jit(partial(_sample_rows, vocab_limit=self.vocab_limit),
                       static_argnames=("all_slots",), donate_argnums=(1,))

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---------------------------------------------------------------- the engine thread

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    idle = not (self._closed or self._waiting or any(self._slots))
                if idle and self.stats.decode_calls + self.stats.prefill_calls > self._trimmed_at:
                    # Gone idle after work: return the heap the requests freed to the OS. The
                    # server's threads spread small allocations over many malloc arenas, which
                    # glibc keeps (demo model, rounds of 190 mixed requests: RSS 681 -> 690 MiB
                    # over 5 rounds without this, 638 -> 640 and flat with it).
                    self._trimmed_at = self.stats.decode_calls + self.stats.prefill_calls
                    release_freed_memory()
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or self._waiting
                                        or any(self._slots))
                    if self._closed:
                        break
                compiled = (self._warm, thread_compile_count(),
                            getattr(self._compiled_here, "programs", 0))
                self._handle_cancels()
                self._admit()
                with self._device_lock:
                    # A chunk's worth of prefill, then one decode call for the rows already
                    # generating: prompts delay other streams by about a chunk at a time.
                    self._advance_prefills()
                    if any(r is not None and r.ready for r in self._slots):
                        self._step()
                self._note_other_compiles(*compiled)
        except Exception as e:  # a bug or a device failure: fail every request, refuse new ones
            log.exception("engine thread died")
            self._dead = f"engine failed: {type(e).__name__}: {e}"
        finally:
            # Running and waiting requests end with an error: they did not complete.
            reason = self._dead or SHUTDOWN_ERROR
            for i, row in enumerate(self._slots):
                if row is not None:
                    self._finish(i, None, "error", reason)
            with self._cond:
                waiting, self._waiting = list(self._waiting), collections.deque()
            for h in waiting:
                for c in range(h.request.n):
                    h._emit(TokenEvent(c, None, None, (), "error", reason))

    def _note_other_compiles(self, warm: bool, thread_compiles: int, programs: int) -> None:
        """If warm-up was over when (thread_compiles, programs) were read, count and log what
        this thread compiled since besides the engine's programs (which `_program` logs): a
        jitted helper or an array operation meeting a new shape, a stall that warm-up should
        have taken."""
        other = (thread_compile_count() - thread_compiles
                 - (getattr(self._compiled_here, "programs", 0) - programs))
        if other > 0 and warm:
            log.warning("engine thread compiled %d XLA computation(s) besides its programs "
                        "after warm-up (JAX_LOG_COMPILES=1 names them)", other)
            self.stats.compiles_after_warmup += other  # after the log: tests wait on it

    def _handle_cancels(self) -> None:
        # A row still prefilling keeps its slot until the prefill ends (the prompt is written to
        # its request's first slot): _advance_prefills handles those.
        for i, row in enumerate(self._slots):
            if row is not None and row.ready and row.choice in row.handle.cancel_requested:
                self._finish(i, None, "cancelled")
        with self._cond:
            keep = collections.deque()
            for h in self._waiting:
                if len(h.cancel_requested) == h.request.n:
                    for c in range(h.request.n):
                        h._emit(TokenEvent(c, None, None, (), "cancelled"))
                else:
                    keep.append(h)
            self._waiting = keep

    def _admit(self) -> None:
        """Move waiting requests (FIFO) into free slots while all their choices fit; their
        prompts are then prefilled by _advance_prefills."""
        while True:
            with self._cond:
                free = [i for i, r in enumerate(self._slots) if r is None]
                if not self._waiting or self._waiting[0].request.n > len(free):
                    return
                handle = self._waiting.popleft()
                r = handle.request
                slots, cached = self._choose_slots(free, r)
                rows = []
                # Reserve the slots now so submit() sees them as taken.
                for c, i in enumerate(slots):
                    self._slots[i] = _Row(handle, c, int(r.prompt_ids[-1]), len(r.prompt_ids) - 1,
                                          constraint=r.constraints[c] if r.constraints else None,
                                          ready=False)
                    rows.append((i, self._slots[i]))
                    # What stays valid in the rows: the reused prefix in the first (the rest
                    # is overwritten by the prefill, the other rows by its copy).
                    self._kept[i] = list(r.prompt_ids[:cached]) if c == 0 else []
            handle.cached_tokens = cached
            self.stats.cached_tokens += cached
            ids = np.asarray(r.prompt_ids, np.int32)
            plan = self._reuse_plan(cached, len(ids)) if cached else self._prefill_plan(len(ids))
            self._prefills.append(_Prefill(handle, rows, ids, plan))

    def _choose_slots(self, free: list[int], r: GenerationRequest) -> tuple[list[int], int]:
        """The free slots for the n choices of `r`, the first one for its prompt, and how many
        of the prompt's tokens that slot already holds (0 without prefix caching). With it, the
        first slot is the one holding the longest usable prefix of the prompt, and otherwise
        slots holding less go first, so that longer prefixes stay for the requests that
        continue them."""
        if not self.prefix_caching:
            return free[: r.n], 0
        prompt = np.asarray(r.prompt_ids)
        n = len(prompt)

        def usable(i: int) -> int:
            kept = np.asarray(self._kept[i][: n - 1])  # at least one token is prefilled
            differ = np.flatnonzero(kept != prompt[: len(kept)])
            common = int(differ[0]) if len(differ) else len(kept)
            return self._reuse_start(common, n)

        reuse = {i: usable(i) for i in free}
        best = max(free, key=lambda i: (reuse[i], -len(self._kept[i])))
        cached = reuse[best]
        if not cached:
            best = min(free, key=lambda i: len(self._kept[i]))
        rest = sorted((i for i in free if i != best), key=lambda i: len(self._kept[i]))
        return [best, *rest[: r.n - 1]], cached

    def _reuse_start(self, common: int, n: int) -> int:
        """Where the prefill of an n-token prompt starts when a row holds its first `common`
        tokens (common < n). Where attention reads the cache in chunks (the CPU), at `common`:
        a call of any length bucket then reads what is before it with one program per bucket
        (`warmup` compiles them with prefix caching). Elsewhere a call's program depends on the
        cache prefix it attends to as well, so the start moves back until whole chunks reach
        the prompt's end: the calls a long prompt runs after its first; 0 if none fits."""
        if self.chunked_attention:
            return common
        start = n - self.prefill_chunk * -(-(n - common) // self.prefill_chunk)
        return max(start, 0)

    def _reuse_plan(self, start: int, n: int) -> list[tuple[int, int, int | None]]:
        """The prefill calls of prompt tokens start..n-1 as `_prefill_plan` would run them for
        a prompt of n - start tokens (the remainder first, then whole chunks), each at its own
        position."""
        c = self.prefill_chunk
        return [(start + s, b, None if self.chunked_attention
                 else pow2_bucket(start + s + c, c, self.max_len))
                for s, b, _ in prefill_plan(n - start, c, self.max_len)]

    def _advance_prefills(self) -> None:
        """Run prefill calls for the admitted requests in turn, until the next one would take
        the calls this iteration past `prefill_chunk` padded tokens (one call always runs). A
        request whose prompt is done gets its other choices' cache rows and its sampling rows,
        streams its first tokens and joins decode. So the rows already generating get a token
        between every chunk's worth of prefill, and, taking turns, a short prompt does not wait
        behind a long one."""
        budget, ran = self.prefill_chunk, False
        while self._prefills:
            p = self._prefills[0]
            if any(self._slots[i] is not row for i, row in p.rows):  # ended (engine failure)
                self._prefills.popleft()
                continue
            if len(p.handle.cancel_requested) == len(p.rows):  # no need to finish the prompt
                self._prefills.popleft()
                for i, _ in p.rows:
                    self._finish(i, None, "cancelled")
                continue
            plan = p.plan  # at least one call
            size = plan[p.done][1]
            if ran and size > budget:
                return
            self._prefills.popleft()
            budget, ran = budget - size, True
            try:
                logits = self._prefill_call(p.ids, p.rows[0][0], plan, p.done)
                p.done += 1
                if p.done == len(plan):
                    self._join(p, logits)
                else:
                    self._prefills.append(p)  # its next call after the others' turns
            except Exception as e:  # e.g. invalid sampling params reaching the sampler
                log.exception("prefill failed")
                for i, _ in p.rows:
                    self._finish(i, None, "error", f"{type(e).__name__}: {e}")

    def _join(self, p: _Prefill, logits: jax.Array) -> None:
        """The prompt of `p` is in its first slot: copy it to the other choices' slots, set
        their sampling and penalty rows, stream their first tokens, sampled from `logits` (the
        prefill's, at the prompt's last token), and let them decode."""
        r = p.handle.request
        seed = S.resolve_seed(r.sampling)  # one seed for all choices; they differ by choice
        first = p.rows[0][0]
        self.stats.prefills += 1
        for c, (i, _) in enumerate(p.rows):
            if c:
                self.cache = self._program("copy")(self.cache, np.int32(first), np.int32(i))
            self.sbatch = S.set_row(self.sbatch, i, r.sampling, self.vocab_limit, c, seed=seed)
            self.pstate = S.set_penalty_row(self.pstate, i, p.ids)
        for c, (i, row) in enumerate(p.rows):
            row.ready = True
            if c in p.handle.cancel_requested:
                self._finish(i, None, "cancelled")
        self._first_tokens([i for i, row in p.rows if self._slots[i] is row], logits)

    def _first_tokens(self, live: list[int], logits: jax.Array) -> None:
        """Sample and stream the first token of the rows `live` (the choices of a request whose
        prompt is done) from the prompt's last logits[1, V], at once: no model pass, and no
        wait for the other prompts being prefilled or for the next decode call. The sampler runs
        on a row bucket; its padding rows (other slots, at step -1) are neither counted nor
        streamed."""
        masks = self._masks(live)
        live = [i for i in live if self._slots[i] is not None]
        if not live:
            return
        slots = self._padded_slots(live)
        R = len(slots)
        steps = np.full(R, -1, np.int32)
        steps[_columns(slots, live)] = 0
        # One row (n=1) takes the logits as they are, on the device; more repeat them.
        first = logits if R == 1 else np.broadcast_to(np.asarray(logits, np.float32),
                                                       (R, self.cfg.vocab_size))
        outs, last, self.pstate = self._program("sample", R)(
            first, self.pstate, self.sbatch, slots, steps, self._allowed(slots, masks))
        self._consume(_Call(outs, last, [(i, self._slots[i]) for i in live], slots,
                            np.full(R, -1, np.int32), steps, 1))

    def _prefill_tokens(self, ids: np.ndarray, slot: int) -> None:
        """Write the keys and values of ids (positions 0..) into cache row `slot`."""
        plan = self._prefill_plan(len(ids))
        for call in range(len(plan)):
            self._prefill_call(ids, slot, plan, call)

    def _prefill_call(self, ids: np.ndarray, slot: int,
                      plan: list[tuple[int, int, int | None]], call: int) -> jax.Array:
        """Run prefill call `call` of `plan`; the logits [1, V] at its last token."""
        start, b, kv = plan[call]
        end = plan[call + 1][0] if call + 1 < len(plan) else len(ids)
        tokens = np.zeros((1, b), np.int32)
        tokens[0, : end - start] = ids[start:end]
        logits, self.cache = self._program("prefill", b, kv)(
            self.params, self.cache, tokens, np.int32(slot), np.int32(start),
            np.int32(end - start - 1))
        self.stats.prefill_calls += 1
        return logits

    def _step(self) -> None:
        """Run one decode call and stream its tokens. With lookahead, the call after it is
        dispatched first, from this call's tokens still on the device, so the device computes
        while the host streams (it is dropped for rows that finish or are cancelled meanwhile)."""
        self._reset_free_rows()
        call, self._inflight = self._inflight, None
        if call is not None and all(self._slots[i] is not r for i, r in call.rows):
            call = None  # every row it was dispatched for has ended: nothing to stream
        if call is None:
            call = self._launch()
            if call is None:
                return
        if self.lookahead:
            self._inflight = self._launch_next(call)
        self._consume(call)

    def _steps_for(self, rows: Sequence[tuple[_Row, int, int]]) -> int:
        """Steps for the next call over (row, generated, position): several only when no row
        can reach max_tokens or max_len inside the call (no host check is needed in between)."""
        k = self.steps_per_call
        if k > 1 and any(r.handle.request.max_tokens - g < k or pos + k > self.max_len
                         for r, g, pos in rows):
            return 1
        return k

    def _launch(self) -> _Call | None:
        """Plan a decode call from the rows' host state and dispatch it."""
        rows = self._slots
        active = [i for i, r in enumerate(rows) if r is not None and r.ready]

        masks = self._masks(active)
        active = [i for i in active if rows[i] is not None]
        if not active:
            return None

        # Padding rows at position -1: the model writes and attends nothing for them; a free
        # row's sampling params are greedy, and a row still prefilling gets its own when it joins.
        slots = self._padded_slots(active)
        R = len(slots)
        tokens = np.zeros(R, np.int32)
        positions = np.full(R, -1, np.int32)
        steps = np.zeros(R, np.int32)
        for i, j in zip(active, _columns(slots, active)):
            tokens[j], positions[j], steps[j] = rows[i].next_token, rows[i].position, \
                rows[i].generated
        # A grammar (or a min_tokens ban) needs the host between tokens.
        k = 1 if masks else self._steps_for(
            [(rows[i], rows[i].generated, rows[i].position) for i in active])
        return self._dispatch([(i, rows[i]) for i in active], slots, tokens, positions, steps,
                              self._allowed(slots, masks), k)

    def _padded_slots(self, busy: list[int]) -> np.ndarray:
        """The slots of a call, padded to the row bucket of `busy`: every slot in order when
        that bucket is max_slots (the programs then need no gather: `all_slots`), else `busy`
        first, then other slots, free ones first."""
        r = self._row_bucket(len(busy))
        if r == self.max_slots:
            return np.arange(r, dtype=np.int32)
        others = sorted(set(range(self.max_slots)) - set(busy),
                        key=lambda i: self._slots[i] is not None)
        return np.asarray(busy + others[: r - len(busy)], np.int32)

    def _masks(self, slots: Sequence[int]) -> dict[int, np.ndarray]:
        """The int8 allowed-token masks (sampler.sample) of the rows among `slots` that need
        one (by slot): a grammar's (`_grammar_masks`: ALLOWED or FORBIDDEN), and, below a
        request's min_tokens, its stop tokens BANNED (unless they are all its grammar allows:
        the grammar wins)."""
        masks = {i: np.where(m, S.ALLOWED, S.FORBIDDEN).astype(np.int8)
                 for i, m in self._grammar_masks(slots).items()}
        for i in slots:
            row = self._slots[i]
            if row is None or not _banning_stops(row):
                continue
            m = masks.get(i)
            if m is None:
                m = np.full(self.cfg.vocab_size, S.ALLOWED, np.int8)
            banned = m.copy()
            stops = [t for t in row.handle.request.stop_token_ids if t < len(m)]
            banned[stops] = np.where(m[stops] == S.ALLOWED, S.BANNED, m[stops])
            masks[i] = banned if (banned[: self.vocab_limit] == S.ALLOWED).any() else m
        return masks

    def _grammar_masks(self, slots: Sequence[int]) -> dict[int, np.ndarray]:
        """The allowed-token masks of the constrained rows among `slots` (by slot), from their
        grammars on the host. A row whose grammar allows no token ends: "stop" if the grammar
        is complete, else its request fails (as does one whose grammar raises)."""
        masks: dict[int, np.ndarray] = {}
        for i in slots:
            row = self._slots[i]
            if row is None or row.constraint is None:
                continue
            try:
                m = np.asarray(row.constraint.allowed_tokens(), bool)
                if m.ndim != 1 or len(m) > self.cfg.vocab_size:
                    raise ValueError(f"allowed_tokens() returned shape {m.shape}")
                if not m[: self.vocab_limit].any():  # the sampler draws below vocab_limit
                    if row.constraint.is_finished():
                        self._finish(i, None, "stop")
                        continue
                    raise ValueError("the grammar allows no token")
                masks[i] = m
            except Exception as e:
                self._fail_request(row.handle, e)
        return masks

    def _allowed(self, slots: np.ndarray, masks: dict[int, np.ndarray]) -> jax.Array:
        """The [R, V] allowed-token mask of a call over `slots` (masks by slot)."""
        if not masks:
            return self._all_allowed(len(slots))
        mask = np.full((len(slots), self.cfg.vocab_size), S.ALLOWED, np.int8)
        for j, i in enumerate(slots):
            if i in masks:
                mask[j] = S.FORBIDDEN
                mask[j, : len(masks[i])] = masks[i]
        # device_put: jnp.asarray compiles a small program per new shape (jax 0.10), here the
        # first time a grammar constrains a call of each row bucket.
        return jax.device_put(mask)

    def _launch_next(self, call: _Call) -> _Call | None:
        """Dispatch the call that will follow `call` if nothing can change it: every busy row
        is in `call`, none is constrained or ends by length inside it, and no request waits."""
        if any(r.constraint is not None or _banning_stops(r, call.k) for _, r in call.rows) or [
                i for i, _ in call.rows] != [i for i, r in enumerate(self._slots) if r is not None]:
            return None
        with self._cond:
            if self._waiting:
                return None
        k = call.k
        after = [(r, r.generated + k, r.position + k) for _, r in call.rows]
        if any(self._slots[i] is not r or g >= r.handle.request.max_tokens
               for (i, r), (_, g, _) in zip(call.rows, after)):
            return None
        busy = _columns(call.slots, [i for i, _ in call.rows])
        positions, steps = call.positions.copy(), call.steps.copy()
        positions[busy] += k
        steps[busy] += k
        self.stats.lookahead_calls += 1
        return self._dispatch(call.rows, call.slots, call.last_tokens, positions, steps,
                              self._all_allowed(len(call.slots)), self._steps_for(after))

    def _dispatch(self, rows: list[tuple[int, _Row]], slots: np.ndarray, tokens: Any,
                  positions: np.ndarray, steps: np.ndarray, allowed: jax.Array, k: int) -> _Call:
        """Dispatch a decode call of k steps."""
        kv_len = self._decode_kv(max(int(positions.max()), 0) + k)
        if k == 1:
            logits, self.cache = self._program("forward", kv_len, len(slots))(
                self.params, self.cache, slots, tokens, positions)
            outs, last, self.pstate = self._program("sample", len(slots))(
                logits, self.pstate, self.sbatch, slots, steps, allowed)
        else:
            outs, last, self.cache, self.pstate = self._program("decode", kv_len, k,
                                                                len(slots))(
                self.params, self.cache, self.pstate, self.sbatch, slots, tokens, positions,
                steps, allowed)
        self.stats.decode_calls += 1
        self.stats.decode_steps += k
        return _Call(outs, last, rows, slots, positions, steps, k)

    def _all_allowed(self, rows: int) -> jax.Array:
        if rows not in self._all_true:
            self._all_true[rows] = jnp.full((rows, self.cfg.vocab_size), S.ALLOWED, jnp.int8)
        return self._all_true[rows]

    def _consume(self, call: _Call) -> None:
        """Wait for `call`'s tokens and stream them, skipping rows that ended meanwhile."""
        toks, lps = np.asarray(call.outs.tokens), np.asarray(call.outs.logprobs)
        want_top = any(r.handle.request.top_logprobs for _, r in call.rows)
        top_ids = np.asarray(call.outs.top_ids) if want_top else None
        top_lps = np.asarray(call.outs.top_logprobs) if want_top else None
        cols = _columns(call.slots, [i for i, _ in call.rows])
        for s in range(call.k):
            for j, (i, row) in zip(cols, call.rows):
                if self._slots[i] is not row:  # finished (or cancelled) before this token
                    continue
                self._emit_token(i, row, int(toks[s, j]), float(lps[s, j]),
                                 None if top_ids is None else (top_ids[s, j], top_lps[s, j]))

    def _emit_token(self, i: int, row: _Row, tok: int, lp: float, top) -> None:
        req = row.handle.request
        row.generated += 1
        if self.prefix_caching:
            row.tokens.append(tok)
        self.stats.tokens += 1
        finish = None
        if tok in req.stop_token_ids:
            finish = "stop"
        elif row.generated >= req.max_tokens:
            finish = "length"
        if row.constraint is not None and finish != "stop":
            try:
                # A complete grammar allows only its end (EOS), which is not a stop token under
                # ignore_eos: once it took that token, the choice has ended all the same.
                if row.constraint.is_finished():
                    finish = "stop"
                row.constraint.advance(tok)
            except Exception as e:
                self._fail_request(row.handle, e)
                return
        tops: tuple[tuple[int, float], ...] = ()
        if top is not None and req.top_logprobs:
            # Tokens the grammar forbids (-inf) are no alternatives: fewer are listed, as
            # OpenAI's spec allows.
            tops = tuple((int(t), float(p)) for t, p in
                         zip(top[0][: req.top_logprobs], top[1][: req.top_logprobs])
                         if p > -np.inf)
        ev = TokenEvent(row.choice, tok, lp if req.logprobs else None, tops, finish)
        row.handle._emit(ev)
        if finish is not None:
            self._free(i)
        else:
            row.next_token, row.position = tok, row.position + 1

    def _finish(self, i: int, token: int | None, reason: str, error: str | None = None,
                error_param: str | None = None) -> None:
        row = self._slots[i]
        if row is None:
            return
        self._free(i)
        row.handle._emit(TokenEvent(row.choice, token, None, (), reason, error, error_param))

    def _free(self, i: int) -> None:
        row = self._slots[i]
        if self.prefix_caching and row is not None and row.ready:
            # Its prompt and every sampled token but the last: each of those was fed to the
            # decode step that sampled the next one, which wrote its key/value. (A row freed
            # while prefilling keeps what admission left: the reused prefix, or nothing.)
            self._kept[i] = [*row.handle.request.prompt_ids, *row.tokens[:-1]]
        self._slots[i] = None
        self._dirty.add(i)
        self._wake()

    def _reset_free_rows(self) -> None:
        """Give freed rows greedy params again, so an idle row never forces the sampled path
        (a row still prefilling is padding too until it joins with its own params)."""
        for i in sorted(self._dirty):
            if self._slots[i] is None or not self._slots[i].ready:
                self.sbatch = S.set_row(self.sbatch, i, S.IDLE_PARAMS, seed=0)
        self._dirty.clear()

    def _fail_request(self, handle: RequestHandle, e: Exception) -> None:
        """An error in one request (e.g. its grammar raised) ends all of its choices. A
        RequestError is the request's fault: its message and field go to the client."""
        log.warning("request failed: %s: %s", type(e).__name__, e)
        client = isinstance(e, RequestError)
        message = str(e) if client else f"{type(e).__name__}: {e}"
        for i, row in enumerate(self._slots):
            if row is not None and row.handle is handle:
                self._finish(i, None, "error", message, e.param if client else None)


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    """Block until the engine has no active or waiting request (for tests)."""
    t0 = time.monotonic()
    while engine.snapshot()["active"] or engine.snapshot()["waiting"]:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("engine did not become idle")
        time.sleep(0.005)
