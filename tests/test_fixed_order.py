"""model.fixed_order_sum / fixed_order_max: a row's result does not depend on the rows beside it.

These are the properties that make decode batch-invariant (test_engine's
test_batch_invariance_at_real_widths checks the whole engine). XLA's own `jnp.sum` over the
0.5B hidden width, compiled for 5 or more rows, rounded ~60% of rows differently than compiled
for one row on the Xeon VM, and `exp(s - jnp.max(s))` ~2% of values between 1 and 2 rows
(YNNPACK computed it for 2), which is why the model uses neither for a decode row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_jax.config import PRESETS
from qwen_jax.model import (
    _attend,
    _attend_in_chunks,
    fixed_order_max,
    fixed_order_sum,
    rms_norm,
)

sum_last = jax.jit(fixed_order_sum)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 1100), rows=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_a_row_sums_the_same_in_any_batch(n, rows, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n)) * rng.uniform(0.01, 100)).astype(np.float32)
    batched = np.asarray(sum_last(x))
    assert batched.shape == (rows, 1)
    for i in range(rows):
        np.testing.assert_array_equal(batched[i], np.asarray(sum_last(x[i:i + 1]))[0])
    # Close to the exact sum: a pairwise sum's error grows with log2(n) roundings.
    exact = x.astype(np.float64).sum(-1, keepdims=True)
    bound = np.abs(x).astype(np.float64).sum(-1, keepdims=True) * 2**-24 * (np.log2(n) + 2)
    assert np.all(np.abs(batched - exact) <= bound)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 700), extra=st.integers(1, 700), seed=st.integers(0, 2**32 - 1))
def test_zeros_appended_change_nothing(n, extra, seed):
    """Keys past a row's position in a longer cache bucket contribute exact zeros."""
    x = np.random.default_rng(seed).standard_normal((3, n)).astype(np.float32)
    padded = np.concatenate([x, np.zeros((3, extra), np.float32)], axis=1)
    np.testing.assert_array_equal(np.asarray(sum_last(padded)), np.asarray(sum_last(x)))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 700), seed=st.integers(0, 2**32 - 1))
def test_fixed_order_max_is_the_maximum(n, seed):
    x = np.random.default_rng(seed).standard_normal((3, n)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(fixed_order_max(jnp.asarray(x))),
                                  x.max(-1, keepdims=True))


def test_other_axes():
    x = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    for axis in (0, 1, -2):
        got = np.asarray(fixed_order_sum(jnp.asarray(x), axis=axis))
        np.testing.assert_allclose(got, x.sum(axis, keepdims=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [5, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_of_a_row_does_not_depend_on_the_batch(rows, dtype):
    rng = np.random.default_rng(rows)
    weight = jnp.asarray(rng.standard_normal(896), dtype)
    norm = jax.jit(lambda x: rms_norm(x, weight, 1e-6).astype(jnp.float32))
    for _ in range(8):
        x = jnp.asarray(rng.standard_normal((rows, 1, 896)) * rng.uniform(0.01, 100), dtype)
        batched = np.asarray(norm(x))
        for i in range(rows):
            np.testing.assert_array_equal(batched[i], np.asarray(norm(x[i:i + 1]))[0])


@pytest.mark.parametrize("chunked", [False, True], ids=["cache-bucket", "chunks"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_of_a_row_does_not_depend_on_the_batch(dtype, chunked):
    """One decode step's attention at the 0.5B head shape over 256 cached keys, as a cache bucket
    (an accelerator's decode) and in chunks (the CPU's): a row's output alone equals its output
    in a batch of 2 or 8."""
    cfg = PRESETS["0.5b"]
    if chunked:
        def attend(q, k, v, pos):
            rows = jnp.arange(q.shape[0])
            return _attend_in_chunks(q, k, v, rows, pos, cfg, 128).astype(jnp.float32)
    else:
        def attend(q, k, v, pos):
            mask = jnp.arange(k.shape[1])[None, None] <= pos[:, :, None]
            return _attend(q, k, v, mask, cfg).astype(jnp.float32)
    attend = jax.jit(attend)
    rng = np.random.default_rng(0)
    for _ in range(6):
        q = jnp.asarray(rng.standard_normal((8, 1, 14, 64)) * 3, dtype)
        k, v = (jnp.asarray(rng.standard_normal((8, 256, 2, 64)), dtype) for _ in "kv")
        pos = jnp.asarray(rng.integers(0, 256, (8, 1)), jnp.int32)
        alone = np.asarray(attend(q[:1], k[:1], v[:1], pos[:1]))[0]
        for rows in (2, 8):
            batched = np.asarray(attend(q[:rows], k[:rows], v[:rows], pos[:rows]))[0]
            np.testing.assert_array_equal(batched, alone)
