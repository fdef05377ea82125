"""The batched sampler against an independent NumPy statement of the same semantics.

Shapes are fixed (V = 16 with vocab_limit 14, a few batch sizes) so each jit compiles once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qwen_jax import sampler as S
from qwen_jax.sampler import SAMPLING_RANGES, SamplingParams

ROWS = 8  # batch size of the small checks (one compile shared by all)
V = 16  # logits width (the "embedding rows")
LIMIT = 14  # tokenizer ids: 14 and 15 must never come out
DRAWS = 4096  # rows of one statistical check
PARAMS = settings(max_examples=30, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


# ----------------------------------------------------------------------------- NumPy reference


def ref_process(logits, p: SamplingParams, allowed, prompt_mask, counts):
    """Bias, mask, vocab limit, penalties (vLLM apply_penalties), in float64."""
    x = logits[:LIMIT].astype(np.float64)
    for token, bias in p.logit_bias:
        if token < LIMIT:
            x[token] += bias
    x[~allowed[:LIMIT]] = -np.inf
    c = counts[:LIMIT]
    seen = (c > 0) | prompt_mask[:LIMIT]
    r = p.repetition_penalty
    x = np.where(seen, np.where(x > 0, x / r, x * r), x)
    return x - p.frequency_penalty * c - p.presence_penalty * (c > 0)


def _softmax(z):
    e = np.exp(z - z[np.isfinite(z)].max())
    return e / e.sum()


class Ambiguous(Exception):
    """A float32/float64 rounding could flip a cut-off: the example proves nothing."""


def ref_distribution(x, p: SamplingParams, margin=1e-4):
    """Softmax of temperature / min_p / top_k / top_p-transformed logits (greedy: one-hot)."""
    if p.temperature < S.GREEDY_BELOW:
        out = np.zeros_like(x)
        out[np.argmax(x)] = 1.0
        return out
    z = x / p.temperature
    fin = np.isfinite(z)
    if p.min_p > 0:
        rel = z - z[fin].max()  # log(p_i / p_max)
        if np.any(np.abs(rel[fin] - math.log(p.min_p)) < margin):
            raise Ambiguous
        z = np.where(rel < math.log(p.min_p), -np.inf, z)
    vals = np.sort(z[np.isfinite(z)])[::-1]
    if 0 < p.top_k < len(vals):
        if vals[p.top_k - 1] - vals[p.top_k] < margin:
            raise Ambiguous
        z = np.where(z < vals[p.top_k - 1], -np.inf, z)
    if p.top_p < 1:
        probs = _softmax(z)
        order = np.argsort(-z, kind="stable")
        cum = np.cumsum(probs[order])
        if np.any(np.abs(cum[:-1] - p.top_p) < margin):
            raise Ambiguous
        keep = int(np.sum(cum - probs[order] < p.top_p))
        z = np.where(z < z[order[keep - 1]], -np.inf, z)
    return _softmax(z)


# ----------------------------------------------------------------------------- strategies


@st.composite
def params(draw, greedy_ok=True):
    temperature = draw(st.sampled_from([0.0]) if greedy_ok and draw(st.booleans())
                       else st.floats(0.3, 2.0))
    bias = draw(st.dictionaries(st.integers(0, V - 1), st.floats(-5, 5), max_size=3))
    return SamplingParams(
        temperature=temperature,
        top_p=draw(st.just(1.0) | st.floats(0.05, 1.0)),
        top_k=draw(st.just(0) | st.integers(1, V + 2)),
        min_p=draw(st.just(0.0) | st.floats(0.0, 0.5)),
        presence_penalty=draw(st.just(0.0) | st.floats(-2, 2)),
        frequency_penalty=draw(st.just(0.0) | st.floats(-2, 2)),
        repetition_penalty=draw(st.just(1.0) | st.floats(0.5, 3.0)),
        logit_bias=tuple(bias.items()),
        seed=draw(st.integers(0, 2**63 - 1)),
    )


def row_data(seed: int, rows: int):
    """Random logits, allowed masks (>= 1 allowed id below LIMIT), prompt masks and counts."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(rows, V)) * 2.5).astype(np.float32)
    logits[:, LIMIT:] += 20.0  # ids past the tokenizer are the most likely, yet never chosen
    allowed = rng.random((rows, V)) > 0.25
    allowed[np.arange(rows), rng.integers(0, LIMIT, rows)] = True
    prompt_mask = rng.random((rows, V)) < 0.2
    counts = rng.integers(0, 4, (rows, V)) * (rng.random((rows, V)) < 0.3)
    return logits, allowed, prompt_mask, counts.astype(np.int32)


def rep(a):
    """One row repeated ROWS times."""
    return np.repeat(a[:1], ROWS, 0)


def device_state(prompt_mask, counts):
    return S.PenaltyState(prompt_mask=jnp.asarray(prompt_mask),
                          output_counts=jnp.asarray(counts, jnp.int32))


# ----------------------------------------------------------------------------- exact checks


@PARAMS
@given(rows=st.lists(params(greedy_ok=False), min_size=ROWS, max_size=ROWS),
       data_seed=st.integers(0, 2**32 - 1), candidates=st.sampled_from([4, S.CANDIDATES]))
def test_sampling_distribution_matches_reference(rows, data_seed, candidates):
    """A mixed batch: every row's sampling logits give the reference's distribution. With
    candidates=4 most top_k/top_p rows take the exact radix-select fallback."""
    logits, allowed, pm, counts = row_data(data_seed, len(rows))
    try:
        expected = [ref_distribution(ref_process(logits[i], p, allowed[i], pm[i], counts[i]), p)
                    for i, p in enumerate(rows)]
    except Ambiguous:
        assume(False)
    z = S.sampling_logits(jnp.asarray(logits), S.make_sampling_batch(rows, V),
                          device_state(pm, counts), jnp.asarray(allowed), vocab_limit=LIMIT,
                          candidates=candidates)
    for i, z_row in enumerate(np.asarray(z, np.float64)):
        np.testing.assert_array_equal(np.isfinite(z_row), expected[i] > 0, err_msg=f"row {i}")
        np.testing.assert_allclose(_softmax(z_row), expected[i], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("candidates", [4, S.CANDIDATES])
def test_ties_at_a_cut_off_are_all_kept(candidates):
    """The documented tie rule, on both the candidate path and the radix-select fallback."""
    logits = np.array([[3, 2, 2, 2, 1, 1, 0, 0, -1, -1, -2, -2, -3, -3, 5, 5]] * ROWS, np.float32)
    rows = [SamplingParams(top_k=2), SamplingParams(top_k=5), SamplingParams(min_p=math.exp(-1)),
            SamplingParams(top_p=0.5)] + [SamplingParams(top_k=k) for k in (1, 4, 7, 14)]
    z = np.asarray(S.sampling_logits(jnp.asarray(logits), S.make_sampling_batch(rows, V),
                                     S.init_penalty_state(ROWS, V), jnp.ones((ROWS, V), bool),
                                     vocab_limit=LIMIT, candidates=candidates))
    kept = [set(np.nonzero(np.isfinite(row))[0]) for row in z]
    # top_k=2: the 3 and the three 2s; top_k=5: down to the 1s; min_p = e^-1: logits >= 2.
    assert kept[:3] == [{0, 1, 2, 3}, set(range(6)), {0, 1, 2, 3}]
    # top_p=0.5: the 3 alone has p ~ 0.40 < 0.5, so the 2s (p ~ 0.15 each) are reached: all kept.
    assert kept[3] == {0, 1, 2, 3}
    assert kept[4:] == [{0}, {0, 1, 2, 3}, set(range(8)), set(range(LIMIT))]


@pytest.mark.parametrize("candidates", [4, S.CANDIDATES])
def test_top_p_drops_a_token_whose_preceding_mass_equals_top_p(candidates):
    """vLLM keeps a token only while the mass before it is strictly below top_p. Probabilities
    0.5, 0.25, 0.125, 0.125 are exact in float32, so top_p = 0.5 sits exactly on a prefix mass:
    the 0.5 token alone is kept. top_k=5 > candidates=4 sends rows to the radix-select path."""
    ln2 = np.float32(math.log(2))
    row = np.full(V, -np.inf, np.float32)
    row[:4] = [0, -ln2, -2 * ln2, -2 * ln2]
    probs = np.exp(row[:4] - jax.nn.logsumexp(jnp.asarray(row)))
    assert np.cumsum(probs, dtype=np.float32).tolist() == [0.5, 0.75, 0.875, 1.0]  # exact
    rows = [SamplingParams(top_p=q, top_k=k) for k in (0, 5) for q in (0.5, 0.75, 0.6, 1.0)]
    z = np.asarray(S.sampling_logits(jnp.asarray(rep(row[None])), S.make_sampling_batch(rows, V),
                                     S.init_penalty_state(ROWS, V), jnp.ones((ROWS, V), bool),
                                     vocab_limit=LIMIT, candidates=candidates))
    kept = [set(np.nonzero(np.isfinite(r))[0]) for r in z]
    assert kept == [{0}, {0, 1}, {0, 1}, {0, 1, 2, 3}] * 2


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.lists(params(), min_size=ROWS, max_size=ROWS), data_seed=st.integers(0, 2**32 - 1))
def test_penalties_bias_and_mask_match_numpy(rows, data_seed):
    logits, allowed, pm, counts = row_data(data_seed, len(rows))
    x = S.process_logits(jnp.asarray(logits), S.make_sampling_batch(rows, V),
                         device_state(pm, counts), jnp.asarray(allowed), vocab_limit=LIMIT)
    for i, p in enumerate(rows):
        np.testing.assert_allclose(np.asarray(x[i]),
                                   ref_process(logits[i], p, allowed[i], pm[i], counts[i]),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty", "repetition_penalty"])
@settings(max_examples=25, deadline=None, derandomize=True)
@given(data_seed=st.integers(0, 2**32 - 1), a=st.floats(0, 1), b=st.floats(0, 1))
def test_each_penalty_is_monotone(field, data_seed, a, b):
    """Raising one penalty never raises a logit, and leaves tokens it does not cover alone."""
    low, high, _, _ = SAMPLING_RANGES[field]
    lo, hi = (low + (high - low) * t for t in sorted((a, b)))
    logits, _, pm, counts = row_data(data_seed, 1)
    rows = [SamplingParams(**{field: lo}), SamplingParams(**{field: hi})] + [S.IDLE_PARAMS] * 6
    x = np.asarray(S.process_logits(jnp.asarray(rep(logits)), S.make_sampling_batch(rows, V),
                                    device_state(rep(pm), rep(counts)), jnp.ones((ROWS, V), bool),
                                    vocab_limit=LIMIT))
    assert np.all(x[1] <= x[0])
    covered = ((counts[0] > 0) | (pm[0] if field == "repetition_penalty" else False))[:LIMIT]
    np.testing.assert_array_equal(x[1][~covered], x[0][~covered])
    if np.any(covered & (logits[0, :LIMIT] != 0)) and hi - lo > 1e-3:
        assert np.any(x[1] < x[0])


# ----------------------------------------------------------------------------- statistics


def chi2_bound(df: int, z: float = 5.0) -> float:
    """Upper tail quantile of chi-square (Wilson-Hilferty), z = 5 sigma: p ~ 3e-7."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_frequencies(tokens: np.ndarray, probs: np.ndarray) -> None:
    """Tokens of probability 0 never drawn; the rest match `probs` by a chi-square test."""
    counts = np.bincount(tokens, minlength=len(probs))
    assert len(counts) == len(probs), "a token beyond the vocabulary was drawn"
    impossible = np.nonzero(counts * (probs == 0))[0]
    assert len(impossible) == 0, f"tokens of probability 0 drawn: {impossible}"
    expected = probs * len(tokens)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    if len(exp) < 2:
        return
    stat = float(np.sum((obs - exp) ** 2 / exp))
    assert stat < chi2_bound(len(exp) - 1), f"chi2 {stat:.1f} for {len(exp) - 1} dof"


def draw_many(p: SamplingParams, logits, allowed, pm, counts):
    """DRAWS tokens of one request in one call: row i is its step i (key fold_in(base, i))."""
    many = lambda a: np.repeat(a[None], DRAWS, 0)  # noqa: E731
    batch = jax.tree_util.tree_map(lambda a: jnp.repeat(a, DRAWS, 0), S.make_sampling_batch([p]))
    out = S.sample(jnp.asarray(many(logits)), batch,
                   device_state(many(pm), many(counts)), jnp.arange(DRAWS, dtype=jnp.int32),
                   jnp.asarray(many(allowed)), vocab_limit=LIMIT)
    return np.asarray(out.tokens)


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(p=params(greedy_ok=False), data_seed=st.integers(0, 2**32 - 1))
def test_frequencies_match_reference_distribution(p, data_seed):
    logits, allowed, pm, counts = (a[0] for a in row_data(data_seed, 1))
    try:
        probs = ref_distribution(ref_process(logits, p, allowed, pm, counts), p)
    except Ambiguous:
        assume(False)
    assert_frequencies(draw_many(p, logits, allowed, pm, counts),
                       np.append(probs, np.zeros(V - LIMIT)))


# ----------------------------------------------------------------------------- argmax cases


@settings(max_examples=20, deadline=None, derandomize=True)
@given(data_seed=st.integers(0, 2**32 - 1), base=params(greedy_ok=False))
def test_degenerate_settings_give_the_argmax(data_seed, base):
    """top_k=1, tiny top_p, min_p=1 and temperature 0 all pick argmax of the processed logits."""
    kw = dict(presence_penalty=base.presence_penalty, frequency_penalty=base.frequency_penalty,
              repetition_penalty=base.repetition_penalty, logit_bias=base.logit_bias,
              seed=base.seed)
    t = base.temperature
    rows = [SamplingParams(top_k=1, temperature=t, **kw),
            SamplingParams(top_p=1e-9, temperature=t, **kw),
            SamplingParams(min_p=1.0, temperature=t, **kw),
            SamplingParams(temperature=0.0, top_k=base.top_k, top_p=base.top_p, **kw),
            SamplingParams(top_k=1, top_p=1e-9, min_p=1.0, temperature=2.0, **kw),
            SamplingParams(temperature=0.0, **kw),
            SamplingParams(top_k=1, top_p=0.5, temperature=t, **kw),
            SamplingParams(min_p=1.0, top_k=base.top_k, temperature=t, **kw)]
    logits, allowed, pm, counts = row_data(data_seed, 1)
    x = ref_process(logits[0], rows[0], allowed[0], pm[0], counts[0])
    best = np.sort(x[np.isfinite(x)])[::-1]
    assume(len(best) == 1 or best[0] - best[1] > 1e-4)  # no float32 near-tie for the maximum
    batch = S.make_sampling_batch(rows, V)
    for step in range(3):
        out = S.sample(jnp.asarray(rep(logits)), batch, device_state(rep(pm), rep(counts)),
                       jnp.full(ROWS, step, jnp.int32), jnp.asarray(rep(allowed)),
                       vocab_limit=LIMIT)
        assert np.all(np.asarray(out.tokens) == np.argmax(x))


def test_masked_and_out_of_vocabulary_tokens_never_chosen():
    logits, allowed, pm, counts = (a[0] for a in row_data(7, 1))
    allowed[:] = False
    allowed[[2, 9, 15]] = True  # 15 is past LIMIT: allowed by the mask, still impossible
    tokens = draw_many(SamplingParams(temperature=2.0, seed=1), logits, allowed, pm, counts)
    assert set(np.unique(tokens)) == {2, 9}


def test_logit_bias_extremes():
    logits, allowed, pm, counts = (a[0] for a in row_data(11, 1))
    allowed[:] = True
    top = int(np.argmax(logits[:LIMIT]))
    banned = SamplingParams(temperature=2.0, logit_bias=((top, -100.0),), seed=5)
    assert top not in set(draw_many(banned, logits, allowed, pm, counts))
    low = int(np.argmin(logits[:LIMIT]))
    forced = SamplingParams(temperature=2.0, logit_bias=((low, 100.0),), seed=6)
    assert set(draw_many(forced, logits, allowed, pm, counts)) == {low}


# ----------------------------------------------------------------------------- randomness


def _generate(rows, logits, allowed, prompts, steps=12):
    """Outputs of `steps` decode steps of a batch on fixed logits (penalties see the outputs)."""
    batch = S.make_sampling_batch(rows, V)
    state = S.init_penalty_state(batch, V)
    for i, prompt in enumerate(prompts):
        state = S.set_penalty_row(state, i, prompt)
    outs = []
    for step in range(steps):
        out = S.sample(jnp.asarray(logits), batch, state, jnp.full(len(rows), step, jnp.int32),
                       jnp.asarray(allowed), vocab_limit=LIMIT)
        state = S.update_penalty_state(state, out.tokens)
        outs.append(out)
    return outs


def test_same_seed_same_tokens_whatever_the_batch():
    p = SamplingParams(temperature=1.5, top_p=0.95, presence_penalty=0.5, seed=2024)
    logits, allowed, pm, _ = row_data(0, 1)
    prompt = np.nonzero(pm[0])[0]
    alone = [int(o.tokens[0]) for o in _generate([p], logits, allowed, [prompt])]
    assert len(set(alone)) > 1  # really sampling
    others = [SamplingParams(top_k=3, seed=1), SamplingParams(temperature=0.0),
              SamplingParams(min_p=0.2), SamplingParams(repetition_penalty=2.0, seed=9),
              SamplingParams(top_p=0.5), SamplingParams(temperature=0.7, seed=2024),
              SamplingParams(frequency_penalty=1.0)]
    for position in (3, 0, 7):
        rows = others[:position] + [p] + others[position:]
        got = _generate(rows, rep(logits), rep(allowed), [prompt] * ROWS)
        assert [int(o.tokens[position]) for o in got] == alone, f"at row {position}"


def test_choices_and_unseeded_requests_differ_seeded_repeat():
    p = SamplingParams(temperature=2.0, seed=77)
    logits, allowed, _, _ = row_data(3, 1)
    allowed[:] = True
    # Flat: 16 draws among 14 ids, so two different streams agree by chance with p ~ 14**-16
    # (the peaked random logits made two of eight unseeded streams coincide now and then).
    logits[:] = 0.0
    fresh = SamplingParams(temperature=2.0)  # no seed: fresh randomness per request
    rows, choices = [p] * 4 + [fresh] * 4, [0, 1, 0, 1, 0, 0, 0, 0]

    def tokens():
        batch = S.make_sampling_batch(rows, V, choice_indices=choices)
        state = S.init_penalty_state(ROWS, V)
        return np.stack([np.asarray(S.sample(jnp.asarray(rep(logits)), batch, state,
                                             jnp.full(ROWS, s, jnp.int32),
                                             jnp.asarray(rep(allowed)), vocab_limit=LIMIT).tokens)
                         for s in range(16)])

    first, second = tokens(), tokens()
    np.testing.assert_array_equal(first[:, 0], first[:, 2])  # same seed, same choice
    assert not np.array_equal(first[:, 0], first[:, 1])  # the n choices of a request differ
    np.testing.assert_array_equal(first[:, :4], second[:, :4])  # seeded: repeatable
    unseeded = np.concatenate([first[:, 4:], second[:, 4:]], axis=1)
    assert len({tuple(col) for col in unseeded.T}) == 8  # unseeded: all different


def test_a_rows_top_p_cut_does_not_depend_on_a_neighbour_that_needs_the_exact_path():
    """top_p at exact float32 prefix masses (the boundary cases): each row keeps the same set
    alone and next to a flat row whose top_p the candidates cannot cover (the radix-select
    fallback). Small sizes stand in for 1024 candidates of a 152k vocabulary."""
    width, cands, rows = 32, 8, 400
    rng = np.random.default_rng(0)
    raw = rng.normal(0, 2.5, (rows, width)).astype(np.float32)
    probs = np.exp(raw - raw.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    prefix = np.cumsum(-np.sort(-probs, axis=-1), axis=-1, dtype=np.float32)
    top_p = prefix[np.arange(rows), rng.integers(0, 4, rows)]
    params = [SamplingParams(temperature=1.0, top_p=float(q), seed=2) for q in top_p]
    flat = SamplingParams(temperature=1.0, top_p=0.99, seed=1)

    def kept(logits, ps):
        x = S.sampling_logits(jnp.asarray(logits), S.make_sampling_batch(ps, width),
                              S.init_penalty_state(len(ps), width), vocab_limit=width,
                              candidates=cands)
        return np.isfinite(np.asarray(x))[:rows]

    alone = kept(raw, params)
    beside = kept(np.concatenate([raw, np.zeros((1, width), np.float32)]), params + [flat])
    np.testing.assert_array_equal(alone, beside)


def test_row_key_is_documented_fold_in():
    """Row key = fold_in(fold_in(PRNGKey(seed), choice), step)."""
    batch = S.make_sampling_batch([SamplingParams(seed=42)], V, choice_indices=[3])
    expected = jax.random.fold_in(jax.random.PRNGKey(42), 3)
    np.testing.assert_array_equal(np.asarray(batch.base_keys[0]), np.asarray(expected))


def test_mixed_batch_equals_row_by_row():
    rows = [SamplingParams(temperature=0.0),
            SamplingParams(temperature=1.3, top_k=4, seed=1),
            SamplingParams(top_p=0.6, frequency_penalty=1.0, seed=2),
            SamplingParams(min_p=0.3, repetition_penalty=1.5, seed=3),
            SamplingParams(temperature=0.0, logit_bias=((3, 2.0),), presence_penalty=-1.0),
            SamplingParams(temperature=0.8, logit_bias=((5, -3.0), (6, 4.0)), seed=4),
            SamplingParams(temperature=2.0, top_k=2, top_p=0.9, min_p=0.05, seed=5),
            SamplingParams(temperature=1.0, repetition_penalty=0.5, seed=6)]
    logits, allowed, pm, _ = row_data(5, ROWS)
    prompts = [np.nonzero(m)[0] for m in pm]
    batched = _generate(rows, logits, allowed, prompts, steps=8)
    for i, p in enumerate(rows):
        alone = _generate([p], logits[i : i + 1], allowed[i : i + 1], prompts[i : i + 1], steps=8)
        for step, (a, b) in enumerate(zip(alone, batched)):
            for field in S.SampleOutput._fields:
                np.testing.assert_allclose(np.asarray(getattr(a, field)[0]),
                                           np.asarray(getattr(b, field)[i]),
                                           err_msg=f"row {i} step {step} {field}", rtol=1e-6)


# ----------------------------------------------------------------------------- outputs & state


def test_logprobs_are_the_raw_model_distribution_over_what_the_grammar_allows():
    """Raw: before bias, penalties and temperature; over the tokens the grammar allows (vLLM
    masks the logits before its sampler), BANNED ones (min_tokens) included, never drawn."""
    rows = [SamplingParams(temperature=0.5, presence_penalty=2.0, logit_bias=((1, 50.0),),
                           seed=1), SamplingParams(temperature=0.0, repetition_penalty=3.0)] * 4
    logits, allowed, pm, counts = row_data(9, ROWS)
    mask = np.where(allowed, S.ALLOWED, S.FORBIDDEN).astype(np.int8)
    mask[0] = S.ALLOWED  # a row without a grammar
    mask[:, 1] = np.where(mask[:, 1] == S.ALLOWED, S.BANNED, S.FORBIDDEN)  # biased, not drawn
    out = S.sample(jnp.asarray(logits), S.make_sampling_batch(rows, V), device_state(pm, counts),
                   jnp.zeros(ROWS, jnp.int32), jnp.asarray(mask), vocab_limit=LIMIT)
    raw = np.where(mask != S.FORBIDDEN, logits, -np.inf)[:, :LIMIT].astype(np.float64)
    logp = raw - np.log(np.exp(raw).sum(-1, keepdims=True))
    assert not np.isin(np.asarray(out.tokens), [1]).any()
    k = min(S.NUM_TOP_LOGPROBS, LIMIT)
    assert out.top_ids.shape == (ROWS, k) and out.top_ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out.top_ids),  # ties (-inf) by lower id
                                  np.argsort(-logp, -1, kind="stable")[:, :k])
    np.testing.assert_allclose(np.asarray(out.top_logprobs), -np.sort(-logp, -1)[:, :k],
                               rtol=1e-5, atol=1e-5)
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs), logp[np.arange(ROWS), tokens],
                               rtol=1e-5)


_top_k_small = jax.jit(S.top_k_small, static_argnums=1)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(shape=st.sampled_from([(1, 20 * 256 + 1), (3, 6000), (2, 21 * 256), (2, 300)]),
       k=st.sampled_from([1, 7, 20]), seed=st.integers(0, 2**32 - 1), levels=st.integers(1, 6),
       planted=st.integers(0, 19))
def test_top_k_small_is_lax_top_k(shape, k, seed, levels, planted):
    """The two-stage top-k gives lax.top_k's values and ids in its order, ties (few distinct
    values, -inf among them) broken by lower id, for rows of more blocks than k and fewer; a few
    planted maxima put the k-th value at a level shared by the blocks of larger ones."""
    rng = np.random.default_rng(seed)
    if levels == 6:
        x = rng.standard_normal(shape).astype(np.float32)
    else:
        values = np.array([3.0, 1.5, 0.0, -2.0, -np.inf], np.float32)[:levels]
        x = rng.choice(values, size=shape, p=rng.dirichlet(np.ones(levels))).astype(np.float32)
    for row in x:
        row[rng.choice(row.size, planted, replace=False)] = 9.0
    vals, ids = _top_k_small(jnp.asarray(x), k)
    ref_vals, ref_ids = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(ref_vals))
    order = np.argsort(-x, axis=-1, kind="stable")[:, :k]  # an independent statement
    np.testing.assert_array_equal(np.asarray(ids), order)
    assert ids.dtype == jnp.int32


def test_penalty_state_updates():
    state = S.init_penalty_state(3, V)
    state = S.set_penalty_row(state, 1, [2, 2, 7])
    for tokens in ([4, 4, -1], [4, 5, -1], [0, 5, 15]):
        state = S.update_penalty_state(state, jnp.asarray(tokens, jnp.int32))
    expected = np.zeros((3, V), np.int32)
    expected[0, [4, 0]] = [2, 1]
    expected[1, [4, 5]] = [1, 2]
    expected[2, 15] = 1  # -1 (an idle row) is counted nowhere
    np.testing.assert_array_equal(np.asarray(state.output_counts), expected)
    mask = np.asarray(state.prompt_mask)
    assert mask.sum() == 2 and mask[1, 2] and mask[1, 7]
    state = S.set_penalty_row(state, 0, [])  # a new request in row 0 clears its counts
    assert np.asarray(state.output_counts)[0].sum() == 0
    assert np.asarray(state.output_counts)[1].sum() == 3
    with pytest.raises(ValueError):
        S.set_penalty_row(state, 0, [V])
    with pytest.raises(IndexError):
        S.set_penalty_row(state, 3, [1])


def test_set_row_replaces_one_row():
    rows = [SamplingParams(seed=i, top_k=i) for i in range(4)]
    batch = S.make_sampling_batch(rows, V, choice_indices=[0, 1, 2, 3])
    new = SamplingParams(temperature=0.5, top_p=0.7, min_p=0.1, presence_penalty=1.0,
                         frequency_penalty=-1.0, repetition_penalty=1.2,
                         logit_bias=((3, 1.5),), seed=99)
    updated = S.set_row(batch, 2, new, V, choice=1)
    rebuilt = S.make_sampling_batch(rows[:2] + [new] + rows[3:], V, choice_indices=[0, 1, 1, 3])
    for a, b in zip(jax.tree_util.tree_leaves(updated), jax.tree_util.tree_leaves(rebuilt)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # An explicit seed (the engine resolves unseeded requests once) overrides params.seed.
    np.testing.assert_array_equal(
        np.asarray(S.set_row(batch, 0, SamplingParams(), seed=99, choice=1).base_keys[0]),
        np.asarray(updated.base_keys[2]))
    with pytest.raises(IndexError):
        S.set_row(batch, 4, new)
    with pytest.raises(S.SamplingParamError):
        S.set_row(batch, 0, SamplingParams(logit_bias=((V, 1.0),)), V)


def test_idle_batch_and_bad_shapes():
    batch = S.make_sampling_batch(ROWS)  # idle rows: greedy
    assert np.all(np.asarray(batch.temperature) == 0)
    state = S.init_penalty_state(batch, V)
    logits = jnp.asarray(row_data(1, ROWS)[0])
    everything = jnp.ones((ROWS, V), bool)
    out = S.sample(logits, batch, state, jnp.zeros(ROWS, jnp.int32), everything,
                   vocab_limit=LIMIT)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.argmax(logits[:, :LIMIT], -1))
    with pytest.raises(ValueError, match="vocab_limit"):
        S.sample(logits, batch, state, jnp.zeros(ROWS, jnp.int32), vocab_limit=V + 1)
    with pytest.raises(ValueError, match="allowed"):
        S.sample(logits, batch, state, jnp.zeros(ROWS, jnp.int32), everything[:, :LIMIT - 1],
                 vocab_limit=LIMIT)
    with pytest.raises(ValueError, match="rows"):
        S.sample(logits, S.make_sampling_batch(3), state, jnp.zeros(ROWS, jnp.int32),
                 vocab_limit=LIMIT)


def test_real_vocabulary_size():
    """Qwen2.5's shapes (151936 logits, 151665 ids, no mask): greedy row = argmax; a sampled row
    with its mass on tokens in different blocks of the two-level draw matches by chi-square."""
    v, limit, draws = 151936, 151665, 200
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, v)).astype(np.float32)
    logits[:, limit:] = 100.0  # the embedding's padding rows: never sampled
    hot = np.array([0, S._BLOCK - 1, S._BLOCK, 70_000, limit - 1])
    weights = np.arange(1.0, len(hot) + 1)
    logits[1, :] = -1e4  # finite but negligible: all mass on `hot`
    logits[1, hot] = np.log(weights)
    batch = S.make_sampling_batch([SamplingParams(temperature=0.0),
                                   SamplingParams(top_k=50, top_p=0.99, seed=1)])
    state = S.init_penalty_state(batch, v)
    x = jnp.asarray(logits)
    tokens = []
    for step in range(draws):
        out = S.sample(x, batch, state, jnp.full(2, step, jnp.int32), vocab_limit=limit)
        assert int(out.tokens[0]) == int(np.argmax(logits[0, :limit]))
        tokens.append(int(out.tokens[1]))
    probs = np.zeros(limit)
    probs[hot] = weights / weights.sum()
    assert_frequencies(np.array(tokens), probs)
