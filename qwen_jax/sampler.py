"""Sampling: request parameters, their validation, and one batched, jit-compiled sampler.

One call of `sample` turns logits[B, V] into the next token of every row, each row with its own
parameters, without Python loops over rows, so one decode step serves many requests.

Order of operations (vLLM's v1 sampler, `vllm/v1/sample/sampler.py`: "apply allowed token ids,
logit bias, penalties; then greedy, or temperature, min_p, top_k and/or top_p, sample"):

1. Log-probabilities returned to the client are taken first, from the model's own distribution:
   `log_softmax` of the raw logits (vLLM's default `logprobs_mode="raw_logprobs"`), over the ids the
   tokenizer knows (`vocab_limit`: the 7B embedding has 152064 rows but 151665 tokenizer ids) and
   the row's grammar allows: vLLM applies a grammar's bitmask to the logits before its sampler, so
   a constrained reply's log-probabilities are those of the allowed tokens, renormalised.
2. `logit_bias` is added; tokens the row's `allowed` mask rules out (its grammar, and its stop
   tokens before `min_tokens`) and ids >= `vocab_limit` get -inf, so they are never sampled.
3. Penalties (vLLM `apply_penalties`): for tokens seen in the prompt or the output so far,
   `logit / r` if `logit > 0` else `logit * r` (repetition_penalty r); then
   `frequency_penalty * count` and `presence_penalty * (count > 0)` are subtracted, where count is
   the token's number of occurrences in the *output* only.
4. temperature < 1e-5 (vLLM's `_SAMPLING_EPS`; the API's 0) is greedy: argmax of step 3.
   Otherwise: divide by temperature; min_p drops tokens with p < min_p * max p (vLLM
   `MinPLogitsProcessor`); top_k keeps the k largest; top_p keeps the smallest prefix of the
   remaining tokens, sorted by probability and renormalised after top_k, whose mass reaches top_p
   (the most likely token is always kept), as in vLLM `apply_top_k_top_p`; then sample.
   Ties at a cut-off are all kept (vLLM's top_k does the same; its top_p breaks ties by sort order).

Randomness. A row's key at generation step s is `fold_in(fold_in(PRNGKey(seed), choice), s)`,
computed from nothing but the row's own seed, choice index and step, so given the same logits a
seeded row draws the same tokens whatever else shares the batch, and the `n` choices of a request
differ. The logits do not depend on the batch either wherever the model's arithmetic allows: a
decode row's sums have an order of their own (model.fixed_order_sum: XLA's sums rounded a row
differently with the batch's shape, and a seeded request diverged in a 4-row batch), and the
weight products must read each row in one order for every row count. On the CPU they do for
bf16 weights under the AVX512-BF16 plans (cpu_matmul.py: YNNPACK for every row count) and the
AVX2 plan up to 8 rows (one matrix-vector product per row; the opt-in avx2-batched takes YNNPACK
from 5 rows, which rounds differently), and for int8 weights (exact integer sums, or one
matrix-vector product per row). They do not for float32 weights, where XLA multiplies one row
by its matrix-vector code and 2+ rows by a matrix product: a seeded float32 request's logprobs
differ in their last bits between a one-row call and a busy one, so a sampled reply can diverge
(padding one row to two would halve float32 decode). On a GPU the matrix products round
differently for different row counts (an H200, bf16: 1 and 2 rows each differed from 8), so there
every decode call runs max_slots rows (engine.default_row_buckets), and a seeded bf16 request
gave bit-identical tokens and logprobs alone and beside 1, 3 and 7 others
(benchmarks/batch_invariance.py, 7B widths); int8 weights keep their faster one-row product
there and are not batch-invariant. (vLLM does not promise batch invariance by default.)
A request without a seed gets a fresh random seed drawn on the host (`resolve_seed`) when its
row is built.

Speed (CPU, V = 151936). Sorting a row costs ~70 ms, so nothing here sorts the vocabulary on the
common path: greedy-only batches skip sampling (`lax.cond`); penalties are skipped when no row
uses them; top_k/top_p read a top-1024 candidate set, which is exact whenever the kept set lies
inside it (always for top_k; for top_p when the candidates hold at least top_p of the mass), with
an exact radix-select fallback otherwise; the draw is a two-level inverse CDF (block sums, then one
block) needing one uniform number per row instead of V Gumbel variates; the top-20 log-probabilities
are searched in 20 blocks of the row (`top_k_small`), not the whole row, which XLA's GPU backend
sorts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# param -> (low, high, low_inclusive, high_inclusive); from the hosted API this project imitates.
# "logit_bias" is the range of each bias value. The API layer's OpenAPI spec is tested against it.
SAMPLING_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "temperature": (0.0, 2.0, True, True),
    "top_p": (0.0, 1.0, False, True),
    "top_k": (-1, 1000, True, False),  # -1: off, as 0 (vLLM's long-time default, still sent)
    "min_p": (0.0, 1.0, True, True),
    "presence_penalty": (-2.0, 2.0, True, True),
    "frequency_penalty": (-2.0, 2.0, True, True),
    "repetition_penalty": (0.01, 5.0, True, True),
    "seed": (0, 2**63, True, False),
    "logit_bias": (-100.0, 100.0, True, True),
}
_INTEGER_PARAMS = frozenset({"top_k", "seed"})
_SCALAR_PARAMS = (
    "temperature", "top_p", "top_k", "min_p",
    "presence_penalty", "frequency_penalty", "repetition_penalty",
)
MAX_LOGIT_BIAS = 1024  # entries per request: the batch stores logit_bias sparsely, this wide
NUM_TOP_LOGPROBS = 20  # the API's top_logprobs maximum
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
CANDIDATES = 1024  # size of the top_k / top_p candidate set (>= the largest top_k, 999)
_BLOCK = 1024  # block width of the two-level inverse-CDF draw
_TOP_BLOCK = 256  # block width of the two-stage top-20 (`top_k_small`)
_TOKEN_ID = re.compile(r"0|[1-9][0-9]*")


class SamplingParamError(ValueError):
    """A sampling parameter is out of range or of the wrong type; `.param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _interval(name: str) -> str:
    lo, hi, lo_inc, hi_inc = SAMPLING_RANGES[name]
    lo, hi = (str(x) if isinstance(x, int) else f"{x:g}" for x in (lo, hi))  # 2**63 in full
    return f"{'[' if lo_inc else '('}{lo}, {hi}{']' if hi_inc else ')'}"


def _check_number(name: str, value: Any, what: str | None = None) -> int | float:
    """`value` as int/float if it is a number of the right kind inside `SAMPLING_RANGES[name]`."""
    what = what or name
    integer = name in _INTEGER_PARAMS
    kind = "an integer" if integer else "a number"
    # bool is an int subclass in Python, but `true` is not a number in JSON.
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SamplingParamError(name, f"{what} must be {kind}, got {type(value).__name__}")
    if integer and not isinstance(value, (int, np.integer)):
        raise SamplingParamError(name, f"{what} must be an integer, got {value!r}")
    try:
        value = int(value) if integer else float(value)
    except OverflowError:  # a JSON integer of hundreds of digits is past any float
        raise SamplingParamError(name, f"{what} must be in {_interval(name)}, got an integer "
                                 "too large for a float") from None
    if not integer and not math.isfinite(value):
        raise SamplingParamError(name, f"{what} must be a finite number, got {value}")
    lo, hi, lo_inc, hi_inc = SAMPLING_RANGES[name]
    if not ((value > lo or (lo_inc and value == lo)) and (value < hi or (hi_inc and value == hi))):
        raise SamplingParamError(name, f"{what} must be in {_interval(name)}, got {value}")
    return value


def _check_logit_bias(value: Any, vocab_limit: int | None) -> tuple[tuple[int, float], ...]:
    """A mapping (JSON: {"123": -5}) or pairs of token id -> bias, as sorted (id, bias) pairs."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (tuple, list)) and all(
        isinstance(p, (tuple, list)) and len(p) == 2 for p in value
    ):
        items = [tuple(p) for p in value]
    else:
        raise SamplingParamError(
            "logit_bias", f"logit_bias must map token ids to biases, got {type(value).__name__}"
        )
    if len(items) > MAX_LOGIT_BIAS:
        raise SamplingParamError(
            "logit_bias", f"logit_bias has {len(items)} entries, at most {MAX_LOGIT_BIAS} allowed"
        )
    out: dict[int, float] = {}
    for key, bias in items:
        if isinstance(key, str) and _TOKEN_ID.fullmatch(key):
            token = int(key)
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool) and key >= 0:
            token = int(key)
        else:
            raise SamplingParamError(
                "logit_bias", f"logit_bias keys must be token ids (integers >= 0), got {key!r}"
            )
        if vocab_limit is not None and token >= vocab_limit:
            raise SamplingParamError(
                "logit_bias",
                f"logit_bias token id {token} is outside the vocabulary [0, {vocab_limit})",
            )
        if token in out:
            raise SamplingParamError("logit_bias", f"logit_bias lists token id {token} twice")
        out[token] = float(_check_number("logit_bias", bias, f"logit_bias[{token}]"))
    return tuple(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling parameters (API defaults). Construction validates every field."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (-1 is taken as 0)
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None  # None: a fresh random seed per request (see resolve_seed)

    def __post_init__(self) -> None:
        for name in _SCALAR_PARAMS:
            object.__setattr__(self, name, _check_number(name, getattr(self, name)))
        object.__setattr__(self, "top_k", max(self.top_k, 0))
        object.__setattr__(self, "logit_bias", _check_logit_bias(self.logit_bias, None))
        if self.seed is not None:
            object.__setattr__(self, "seed", _check_number("seed", self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


IDLE_PARAMS = SamplingParams(temperature=0.0)  # rows without a request: greedy, the cheapest path
_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def validate_sampling_params(
    params: SamplingParams | Mapping[str, Any] | None = None,
    /,
    *,
    vocab_limit: int | None = None,
    **fields: Any,
) -> SamplingParams:
    """Check sampling fields and return them as `SamplingParams`; raise `SamplingParamError`.

    Pure; shared by the API layer and the engine. Accepts a `SamplingParams`, a request-body dict
    (keys that are not sampling fields are ignored; None means "use the default"), and/or keyword
    fields. Numbers must be int/float (not bool, str, NaN or inf) inside `SAMPLING_RANGES`; top_k
    and seed must be integers. logit_bias keys are token ids as JSON strings ("123") or ints, each
    below `vocab_limit` when it is given, values in [-100, 100], at most MAX_LOGIT_BIAS entries.
    """
    if isinstance(params, SamplingParams):
        source: dict[str, Any] = {name: getattr(params, name) for name in _FIELDS}
    elif isinstance(params, Mapping):
        source = dict(params)
    elif params is None:
        source = {}
    else:
        raise TypeError(f"expected SamplingParams or a mapping, got {type(params).__name__}")
    unknown = set(fields) - set(_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling fields: {sorted(unknown)}")
    source.update(fields)
    values = {name: source[name] for name in _FIELDS if source.get(name) is not None}
    if "logit_bias" in values:
        values["logit_bias"] = _check_logit_bias(values["logit_bias"], vocab_limit)
    return SamplingParams(**values)


def resolve_seed(params: SamplingParams) -> int:
    """The request's seed, or a fresh random one (so unseeded requests never repeat)."""
    return params.seed if params.seed is not None else secrets.randbits(63)


def seed_key(seed: int) -> np.ndarray:
    """`jax.random.PRNGKey(seed)` (threefry) for any seed in [0, 2**63), without needing x64."""
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


# ----------------------------------------------------------------------------- device batches


@partial(jax.tree_util.register_dataclass,
         data_fields=["temperature", "top_p", "top_k", "min_p", "presence", "frequency",
                      "repetition", "bias_ids", "bias_values", "base_keys"],
         meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters on device; row i belongs to one choice of one request."""

    temperature: jax.Array  # f32[B]
    top_p: jax.Array  # f32[B]
    top_k: jax.Array  # i32[B], 0 = off
    min_p: jax.Array  # f32[B]
    presence: jax.Array  # f32[B]
    frequency: jax.Array  # f32[B]
    repetition: jax.Array  # f32[B]
    bias_ids: jax.Array  # i32[B, MAX_LOGIT_BIAS]; unused entries are (0, 0.0): adding 0 is a no-op
    bias_values: jax.Array  # f32[B, MAX_LOGIT_BIAS]
    base_keys: jax.Array  # u32[B, 2]: fold_in(PRNGKey(seed), choice)

    @property
    def size(self) -> int:
        return self.temperature.shape[0]


@partial(jax.tree_util.register_dataclass, data_fields=["prompt_mask", "output_counts"],
         meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PenaltyState:
    """What the penalties need to know about each row's text so far."""

    prompt_mask: jax.Array  # bool[B, V]: token occurs in the prompt
    output_counts: jax.Array  # i32[B, V]: occurrences in the generated output


class SampleOutput(NamedTuple):
    tokens: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B]: the chosen token's log-probability under the raw model
    top_ids: jax.Array  # i32[B, 20] (fewer when vocab_limit < 20), most likely first
    top_logprobs: jax.Array  # f32[B, 20]


@jax.jit
def _base_keys(seed_keys: jax.Array, choices: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in)(seed_keys, choices)


def _host_rows(params: Sequence[SamplingParams], vocab_size: int | None,
               choices: Sequence[int], seeds: Sequence[int | None]) -> SamplingBatch:
    """Build a SamplingBatch (numpy on the host, one transfer) from Python parameters."""
    n = len(params)
    bias_ids = np.zeros((n, MAX_LOGIT_BIAS), np.int32)
    bias_values = np.zeros((n, MAX_LOGIT_BIAS), np.float32)
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"expected SamplingParams, got {type(p).__name__}")
        if p.logit_bias:
            ids, vals = zip(*p.logit_bias)
            if vocab_size is not None and max(ids) >= vocab_size:
                raise SamplingParamError(
                    "logit_bias", f"logit_bias token id {max(ids)} is outside [0, {vocab_size})")
            bias_ids[i, : len(ids)] = ids
            bias_values[i, : len(ids)] = vals
    keys = np.stack([seed_key(s if s is not None else resolve_seed(p))
                     for p, s in zip(params, seeds)]) if n else np.zeros((0, 2), np.uint32)

    def col(name: str, dtype: Any) -> jax.Array:
        return jnp.asarray(np.array([getattr(p, name) for p in params], dtype))

    return SamplingBatch(
        temperature=col("temperature", np.float32),
        top_p=col("top_p", np.float32),
        top_k=col("top_k", np.int32),
        min_p=col("min_p", np.float32),
        presence=col("presence_penalty", np.float32),
        frequency=col("frequency_penalty", np.float32),
        repetition=col("repetition_penalty", np.float32),
        bias_ids=jnp.asarray(bias_ids),
        bias_values=jnp.asarray(bias_values),
        base_keys=_base_keys(jnp.asarray(keys), jnp.asarray(np.asarray(choices, np.int32))),
    )


def make_sampling_batch(
    params_list: Sequence[SamplingParams] | int,
    vocab_size: int | None = None,
    choice_indices: Sequence[int] | None = None,
) -> SamplingBatch:
    """Device batch for `params_list` (row i = params_list[i], choice choice_indices[i] or 0).

    An int n gives n idle rows (greedy, so an idle batch takes the cheap greedy path).
    `vocab_size`, when given, bounds logit_bias ids. Unseeded rows get a fresh random seed.
    """
    if isinstance(params_list, int):
        params_list = [IDLE_PARAMS] * params_list
    choices = list(choice_indices) if choice_indices is not None else [0] * len(params_list)
    if len(choices) != len(params_list):
        raise ValueError("choice_indices must have one entry per row")
    return _host_rows(list(params_list), vocab_size, choices, [None] * len(params_list))


@jax.jit
def _replace_row(tree: Any, row: jax.Array, new: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, r: a.at[row].set(r[0]), tree, new)


def set_row(batch: SamplingBatch, row: int, params: SamplingParams,
            vocab_size: int | None = None, choice: int = 0, *, seed: int | None = None
            ) -> SamplingBatch:
    """A new batch whose row `row` samples with `params` (one jitted update, no recompiles).

    `seed` overrides params.seed (the engine resolves it once per request so that all its choices
    share it); with neither, a fresh random seed is drawn.
    """
    if not 0 <= row < batch.size:
        raise IndexError(f"row {row} outside a batch of {batch.size}")
    new = _host_rows([params], vocab_size, [choice], [seed])
    return _replace_row(batch, jnp.int32(row), new)


def init_penalty_state(batch: SamplingBatch | int, vocab_size: int) -> PenaltyState:
    """Empty penalty state for a batch (or a batch size) over `vocab_size` ids."""
    b = batch.size if isinstance(batch, SamplingBatch) else int(batch)
    return PenaltyState(prompt_mask=jnp.zeros((b, vocab_size), bool),
                        output_counts=jnp.zeros((b, vocab_size), jnp.int32))


def set_penalty_row(state: PenaltyState, row: int, prompt_ids: Sequence[int] | np.ndarray
                    ) -> PenaltyState:
    """Row `row` starts a new request: prompt tokens marked, output counts cleared."""
    b, v = state.prompt_mask.shape
    if not 0 <= row < b:
        raise IndexError(f"row {row} outside a batch of {b}")
    ids = np.asarray(prompt_ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= v):
        raise ValueError(f"prompt token ids must lie in [0, {v})")
    mask = np.zeros((1, v), bool)
    mask[0, ids] = True
    new = PenaltyState(prompt_mask=jnp.asarray(mask),
                       output_counts=jnp.zeros((1, v), jnp.int32))
    return _replace_row(state, jnp.int32(row), new)


def update_penalty_state(state: PenaltyState, tokens: jax.Array) -> PenaltyState:
    """Count each row's new token (ids outside [0, V), e.g. -1 for idle rows, are ignored)."""
    b, v = state.output_counts.shape
    valid = (tokens >= 0) & (tokens < v)
    counts = state.output_counts.at[jnp.arange(b), jnp.clip(tokens, 0, v - 1)].add(
        valid.astype(jnp.int32))
    return PenaltyState(prompt_mask=state.prompt_mask, output_counts=counts)


# ----------------------------------------------------------------------------- the sampler


def _process(x: jax.Array, batch: SamplingBatch, state: PenaltyState,
             allowed: jax.Array | None) -> jax.Array:
    """Steps 2-3 of the module docstring on f32[B, V'] logits (V' = vocab_limit)."""
    b, v = x.shape

    def add_bias(x: jax.Array) -> jax.Array:
        # One scatter into the flattened logits (a [B, n, 2] index array would be constant-folded
        # at compile time); ids >= vocab_limit are sent out of range and dropped.
        flat = jnp.where(batch.bias_ids < v, jnp.arange(b, dtype=jnp.int32)[:, None] * v
                         + batch.bias_ids, b * v)
        x = x.reshape(-1).at[flat.reshape(-1)].add(batch.bias_values.reshape(-1), mode="drop")
        return x.reshape(b, v)

    x = jax.lax.cond(jnp.any(batch.bias_values != 0), add_bias, lambda x: x, x)
    if allowed is not None:
        x = jnp.where(allowed[:, :v], x, -jnp.inf)

    def penalize(x: jax.Array) -> jax.Array:
        counts = state.output_counts[:, :v]
        in_output = counts > 0
        seen = in_output | state.prompt_mask[:, :v]
        r = batch.repetition[:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
        return (x - batch.frequency[:, None] * counts.astype(jnp.float32)
                - batch.presence[:, None] * in_output.astype(jnp.float32))

    uses_penalties = jnp.any((batch.presence != 0) | (batch.frequency != 0)
                             | (batch.repetition != 1))
    return jax.lax.cond(uses_penalties, penalize, lambda x: x, x)


def _ordered(x: jax.Array) -> jax.Array:
    """Map float32 to uint32 so that the order of floats is the order of the integers."""
    x = jnp.where(x == 0, 0.0, x)  # -0.0 and 0.0 are one value
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _unordered(k: jax.Array) -> jax.Array:
    bits = jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _largest_cut(x: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest value t among x with sum(weights[x >= t]) >= target (> 0).

    Radix select on the float's ordered bit pattern, 8 bits a round: each round histograms the
    weight of the candidates by their next byte (one scatter-add pass over the row) and keeps the
    largest byte whose suffix weight still reaches the target. Exact, 4 passes, no sort.
    """
    b = x.shape[0]
    keys = _ordered(x)
    need = jnp.minimum(target, jnp.sum(weights, axis=-1))  # reachable despite rounding
    prefix = jnp.zeros((b,), jnp.uint32)
    row_bins = jnp.arange(b, dtype=jnp.int32)[:, None] * 256
    for shift in (24, 16, 8, 0):
        w = weights
        if shift < 24:  # only keys that share the bytes chosen so far
            w = jnp.where(keys >> (shift + 8) == (prefix >> (shift + 8))[:, None], weights, 0.0)
        digit = ((keys >> shift) & 0xFF).astype(jnp.int32)
        hist = jax.ops.segment_sum(w.reshape(-1), (row_bins + digit).reshape(-1), b * 256)
        hist = hist.reshape(b, 256)
        above_or_at = jnp.cumsum(hist[:, ::-1], axis=-1)[:, ::-1]  # weight of bytes >= d
        # The largest byte reaching `need`; `> 0` keeps a rounding-zero `need` on a real key.
        d = jnp.maximum(jnp.sum((above_or_at >= need[:, None]) & (above_or_at > 0), -1) - 1, 0)
        above = jnp.take_along_axis(above_or_at - hist, d[:, None], axis=-1)[:, 0]  # bytes > d
        need = jnp.maximum(need - above, 0.0)
        prefix = prefix | (d.astype(jnp.uint32) << shift)
    return _unordered(prefix)


def _safe(lse: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(lse), lse, 0.0)  # a row with nothing left: avoid inf - inf


def _cut_by_radix_select(x: jax.Array, k: jax.Array, p: jax.Array) -> jax.Array:
    """top_k then top_p thresholds for any k and p (the exact, slower fallback)."""
    none = jnp.full(x.shape[:1], -jnp.inf)

    def top_k_cut() -> jax.Array:
        return jnp.where(k > 0, _largest_cut(x, jnp.ones_like(x), k.astype(jnp.float32)), none)

    thr_k = jax.lax.cond(jnp.any(k > 0), top_k_cut, lambda: none)
    xk = jnp.where(x >= thr_k[:, None], x, -jnp.inf)

    def top_p_cut() -> jax.Array:
        probs = jnp.exp(xk - _safe(jax.nn.logsumexp(xk, axis=-1))[:, None])
        return jnp.where(p < 1, _largest_cut(xk, probs, p), none)

    thr_p = jax.lax.cond(jnp.any(p < 1), top_p_cut, lambda: none)
    return jnp.maximum(thr_k, thr_p)


def _cut(x: jax.Array, k: jax.Array, p: jax.Array, candidates: int) -> jax.Array:
    """Per-row logit threshold implementing top_k (k > 0) then top_p (p < 1) on x.

    Reads the `candidates` largest logits only; falls back to radix select when that set might not
    contain every kept token (top_k > candidates, or top_p with the candidates' mass < top_p).
    """
    n = min(candidates, x.shape[-1])
    vals = jax.lax.top_k(x, n)[0]  # descending
    thr_k = jnp.where(k > 0, jnp.take_along_axis(
        vals, jnp.clip(k - 1, 0, n - 1)[:, None], axis=-1)[:, 0], -jnp.inf)
    vals = jnp.where(vals >= thr_k[:, None], vals, -jnp.inf)
    # top_p renormalises over what top_k kept (all inside the candidates), else the full row.
    lse = jnp.where(k > 0, jax.nn.logsumexp(vals, axis=-1), jax.nn.logsumexp(x, axis=-1))
    probs = jnp.exp(vals - _safe(lse)[:, None])
    cum = jnp.cumsum(probs, axis=-1)
    n_keep = jnp.sum(cum - probs < p[:, None], axis=-1)  # mass before a token < top_p: kept
    thr_p = jnp.where(p < 1, jnp.take_along_axis(
        vals, jnp.clip(n_keep - 1, 0, n - 1)[:, None], axis=-1)[:, 0], -jnp.inf)
    fast = jnp.maximum(thr_k, thr_p)
    # Each row takes the candidates' threshold whenever they suffice for it, whatever its
    # neighbours need: the two paths sum probabilities in different orders, and a top_p that
    # falls within rounding of a prefix mass could otherwise keep a different set in a batch.
    exact = (k <= n) & ((k > 0) | (p >= 1) | (cum[:, -1] >= p))
    return jax.lax.cond(jnp.all(exact), lambda: fast,
                        lambda: jnp.where(exact, fast, _cut_by_radix_select(x, k, p)))


def _transform(x: jax.Array, batch: SamplingBatch, candidates: int) -> jax.Array:
    """Step 4 for the sampled rows: temperature, min_p, top_k, top_p; dropped tokens -> -inf."""
    greedy = batch.temperature < GREEDY_BELOW
    x = x / jnp.where(greedy, 1.0, batch.temperature)[:, None]
    # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p)
    thr = jnp.where(batch.min_p > 0, jnp.max(x, axis=-1) + jnp.log(batch.min_p), -jnp.inf)
    x = jnp.where(x >= thr[:, None], x, -jnp.inf)
    k = jnp.where(greedy | (batch.top_k >= x.shape[-1]), 0, batch.top_k)  # k >= V: keeps all
    p = jnp.where(greedy, 1.0, batch.top_p)
    cut = jax.lax.cond(jnp.any((k > 0) | (p < 1)),
                       lambda: _cut(x, k, p, candidates),
                       lambda: jnp.full(x.shape[:1], -jnp.inf))
    return jnp.where(x >= cut[:, None], x, -jnp.inf)


def _last_true(m: jax.Array) -> jax.Array:
    return m.shape[-1] - 1 - jnp.argmax(m[..., ::-1], axis=-1)


def _blocks(x: jax.Array, fill: float) -> jax.Array:
    """f[B, V] -> f[B, blocks, _BLOCK] (padded with `fill`): long rows as short rows."""
    b, v = x.shape
    width = min(_BLOCK, v)
    blocks = -(-v // width)
    return jnp.pad(x, ((0, 0), (0, blocks * width - v)), constant_values=fill).reshape(
        b, blocks, width)


def _argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (first maximum), ~3x faster on CPU for a 152k row:
    XLA's argmax is a slow two-value reduction, max is fast, so argmax only inside one block."""
    xb = _blocks(x, -jnp.inf)
    blk = jnp.argmax(jnp.max(xb, axis=-1), axis=-1)
    inside = jnp.take_along_axis(xb, blk[:, None, None], axis=1)[:, 0]
    return (blk * xb.shape[-1] + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def top_k_small(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x, k)` of f[B, V] for a small k: the same values and ids, in the same
    order (equal values: lower id first), searching k blocks of the row instead of all of it.
    Rows holding NaN may differ (a block's max can drop a NaN that lax.top_k ranks first).

    The k largest values lie in the k blocks with the largest maxima (of equal maxima, the
    lower blocks): a block left out has a maximum no larger than theirs, so k values at least as
    large come before any of its values, ties included, since its ids are higher. The chosen
    blocks are searched in id order, so their ties keep lax.top_k's order. lax.top_k sorts the
    whole row on a GPU (H200, 7B vocabulary, 8 rows: 0.36 ms of a 5.7 ms decode step); this
    sorts 20 blocks' worth (CPU, 8 rows: 1.3 -> 0.26 ms).
    """
    b, v = x.shape
    blocks = -(-v // _TOP_BLOCK)
    if blocks <= k:
        return jax.lax.top_k(x, k)
    xb = jnp.pad(x, ((0, 0), (0, blocks * _TOP_BLOCK - v)), constant_values=-jnp.inf)
    xb = xb.reshape(b, blocks, _TOP_BLOCK)
    chosen = jnp.sort(jax.lax.top_k(jnp.max(xb, axis=-1), k)[1], axis=-1)  # [B, k], id order
    cand = jnp.take_along_axis(xb, chosen[:, :, None], axis=1).reshape(b, k * _TOP_BLOCK)
    vals, at = jax.lax.top_k(cand, k)
    ids = jnp.take_along_axis(chosen, at // _TOP_BLOCK, axis=-1) * _TOP_BLOCK + at % _TOP_BLOCK
    return vals, ids.astype(jnp.int32)


def _draw(z: jax.Array, u: jax.Array) -> jax.Array:
    """Token i with probability softmax(z)_i, given u ~ U[0, 1), by a two-level inverse CDF.

    Block sums pick a block, a cumsum inside that block picks the token: O(V) with one uniform
    per row. Indices are clamped to tokens of nonzero probability against rounding.
    """
    w = jnp.exp(_blocks(z, -jnp.inf) - _safe(jnp.max(z, axis=-1))[:, None, None])
    width = w.shape[-1]
    block_mass = jnp.sum(w, axis=-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    r = u * block_cdf[:, -1]
    blk = jnp.minimum(jnp.sum(block_cdf <= r[:, None], axis=-1), _last_true(block_mass > 0))
    rest = r - (jnp.take_along_axis(block_cdf - block_mass, blk[:, None], axis=-1)[:, 0])
    wb = jnp.take_along_axis(w, blk[:, None, None], axis=1)[:, 0]
    pos = jnp.sum(jnp.cumsum(wb, axis=-1) <= rest[:, None], axis=-1)
    pos = jnp.clip(pos, jnp.argmax(wb > 0, axis=-1), _last_true(wb > 0))
    return (blk * width + pos).astype(jnp.int32)


def _check_shapes(logits: jax.Array, batch: SamplingBatch, state: PenaltyState,
                  vocab_limit: int, allowed: jax.Array | None = None) -> None:
    b, v = logits.shape
    if allowed is not None and (allowed.shape[0] != b or allowed.shape[1] < vocab_limit):
        raise ValueError(f"allowed mask {allowed.shape} does not cover logits {logits.shape}")
    if not 0 < vocab_limit <= v:
        raise ValueError(f"vocab_limit {vocab_limit} must be in [1, {v}] for logits {logits.shape}")
    if batch.size != b or state.output_counts.shape[0] != b:
        raise ValueError(f"batch of {batch.size} rows and penalty state of "
                         f"{state.output_counts.shape[0]} for logits of {b} rows")
    if state.output_counts.shape[1] < vocab_limit:
        raise ValueError(f"penalty state covers {state.output_counts.shape[1]} ids "
                         f"< vocab_limit {vocab_limit}")


@partial(jax.jit, static_argnames=("vocab_limit",))
def process_logits(logits: jax.Array, batch: SamplingBatch, state: PenaltyState,
                   allowed: jax.Array | None = None, *, vocab_limit: int) -> jax.Array:
    """Logits after bias, mask and penalties (what greedy takes the argmax of): f32[B, limit]."""
    _check_shapes(logits, batch, state, vocab_limit, allowed)
    return _process(logits[:, :vocab_limit].astype(jnp.float32), batch, state,
                    None if allowed is None else allowed == ALLOWED)


@partial(jax.jit, static_argnames=("vocab_limit", "candidates"))
def sampling_logits(logits: jax.Array, batch: SamplingBatch, state: PenaltyState,
                    allowed: jax.Array | None = None, *, vocab_limit: int,
                    candidates: int = CANDIDATES) -> jax.Array:
    """The logits a sampled (non-greedy) row draws from: softmax of this is its distribution."""
    x = process_logits(logits, batch, state, allowed, vocab_limit=vocab_limit)
    return _transform(x, batch, candidates)


# The values of an int8 `allowed` mask (`sample`).
FORBIDDEN, ALLOWED, BANNED = 0, 1, 2


@partial(jax.jit, static_argnames=("vocab_limit", "candidates"))
def sample(logits: jax.Array, batch: SamplingBatch, state: PenaltyState, steps: jax.Array,
           allowed: jax.Array | None = None, *, vocab_limit: int,
           candidates: int = CANDIDATES) -> SampleOutput:
    """Next token of every row, its raw log-probability and the raw top-20 (see module doc).

    `steps[i]` is the number of tokens row i has generated so far (its randomness is
    fold_in(base_key_i, steps[i])); `allowed[i, t]` (bool or int8) is ALLOWED (1, True) where
    row i may draw token t, FORBIDDEN (0, False) where its grammar rules t out (t then has no
    log-probability either), BANNED (2) where the grammar allows t but it may not be drawn yet
    (a stop token before min_tokens: a logits processor after the log-probabilities in vLLM).
    Ids at or above the static `vocab_limit` are never returned. `candidates` sizes the
    top_k/top_p candidate set (results do not depend on it; tests lower it to exercise the
    fallback). A row whose every token is ruled out returns token 0.
    """
    _check_shapes(logits, batch, state, vocab_limit, allowed)
    raw = logits[:, :vocab_limit].astype(jnp.float32)
    if allowed is not None:  # the grammar's mask, before the log-probabilities (vLLM's order)
        raw = jnp.where(allowed[:, :vocab_limit] != FORBIDDEN, raw, -jnp.inf)
    x = _process(raw, batch, state, None if allowed is None else allowed == ALLOWED)
    greedy_tokens = _argmax(x)
    greedy = batch.temperature < GREEDY_BELOW

    def sampled() -> jax.Array:
        z = _transform(x, batch, candidates)
        keys = jax.vmap(jax.random.fold_in)(batch.base_keys, steps.astype(jnp.uint32))
        u = jax.vmap(lambda key: jax.random.uniform(key, ()))(keys)
        drawn = _draw(z, u)
        return jnp.where(greedy | ~jnp.any(z > -jnp.inf, axis=-1), greedy_tokens, drawn)

    tokens = jax.lax.cond(jnp.all(greedy), lambda: greedy_tokens, sampled)
    # log_softmax(raw) at the few ids needed, without writing out a [B, V] array. A row with
    # fewer than 20 tokens its grammar allows lists the others at -inf (the engine drops them).
    lse = jax.nn.logsumexp(raw, axis=-1)
    top_raw, top_ids = top_k_small(raw, min(NUM_TOP_LOGPROBS, vocab_limit))
    chosen = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0] - lse
    return SampleOutput(tokens=tokens, logprobs=chosen, top_ids=top_ids.astype(jnp.int32),
                        top_logprobs=top_raw - lse[:, None])
