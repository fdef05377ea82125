"""Weight-only int8 (quantize.py) and its use in the model, loader, engine and compiled program."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import INT8_PLANS
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_jax import linear, model
from qwen_jax.config import QwenConfig
from qwen_jax.cpu_matmul import PLANS, use_plan
from qwen_jax.engine import Engine, GenerationRequest
from qwen_jax.generate import greedy_generate
from qwen_jax.layout import int8_block_width
from qwen_jax.model import forward, init_cache, init_params
from qwen_jax.quantize import Int8Weight, dequantize, is_quantized, quantize_int8, quantize_params
from qwen_jax.sampler import SamplingParams
from qwen_jax.weights import CheckpointError, load_checkpoint, save_checkpoint

CFG = QwenConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(3), jnp.float32)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 24), n_in=st.integers(1, 40), block=st.integers(1, 48),
       zero_row=st.booleans(), seed=st.integers(0, 2**16))
def test_quantize_round_trip_is_within_half_a_step(out, n_in, block, zero_row, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, n_in)).astype(np.float32) * rng.uniform(1e-3, 10)
    if zero_row:
        w[0] = 0.0
    qw = quantize_int8(jnp.asarray(w), block=block)
    blocks, rows, size = qw.q.shape
    assert qw.q.dtype == jnp.int8 and rows == out and size <= block
    assert blocks * size >= n_in and (blocks - 1) * size < n_in  # as few blocks as fit
    q = np.asarray(qw.q).astype(np.int32)
    assert q.min() >= -127 and q.max() <= 127
    scale = np.asarray(qw.scale)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 127, rtol=1e-6)
    back = np.asarray(dequantize(qw, n_in))
    assert back.shape == w.shape
    assert np.all(np.abs(back - w) <= scale[:, None] * 0.5 * (1 + 1e-5) + 1e-30)
    if zero_row:
        assert np.all(back[0] == 0.0)
    # The padding columns of the last block are zero, so they add nothing to a product.
    assert np.all(np.asarray(qw.q).transpose(1, 0, 2).reshape(out, -1)[:, n_in:] == 0)


@pytest.mark.parametrize("plan", INT8_PLANS)
@settings(max_examples=15, deadline=None)
@given(rows=st.one_of(st.integers(1, 10), st.sampled_from([64, 65])),
       n_in=st.sampled_from([64, 3584, 3585, 4864]), block=st.sampled_from([None, 3584]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), seed=st.integers(0, 2**16))
def test_int8_linear_is_x_times_the_dequantized_weight(plan, rows, n_in, block, dtype, seed):
    """Every CPU path computes x @ dequantize(w).T: the matrix-vector path (AVX2 plan, <= 8
    rows), x as int8 levels (AVX512-BF16 plan, <= 64 rows), the einsum path (the weight in
    float32, or in bf16 for bf16 activations under the AVX512-BF16 plan); with the weight in
    one block or in blocks of 3584 columns."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((1, rows, n_in)), dtype)
    qw = quantize_int8(jnp.asarray(rng.standard_normal((96, n_in)) * 0.05, jnp.float32),
                       block=block or n_in)
    with use_plan(PLANS[plan]):
        got = np.asarray(jax.jit(linear.linear)(x, qw).astype(jnp.float32))
    want = np.asarray(x.astype(jnp.float32)) @ np.asarray(dequantize(qw, n_in)).T
    assert got.shape == (1, rows, 96)
    tol = 2**-7 if dtype == jnp.bfloat16 else 1e-5
    assert np.abs(got - want).max() / np.abs(want).max() < tol
    # The accelerator paths (one row: multiply-reduce; more: einsum), run here on the CPU.
    other = jax.jit(linear._int8_linear, static_argnums=2)(x, qw, False)
    assert np.abs(np.asarray(other.astype(jnp.float32)) - want).max() / np.abs(want).max() < tol


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), n_in=st.integers(1, 300), outlier=st.sampled_from([1.0, 1e3, 1e6]),
       zero_row=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_levels_recombine_to_x_within_the_bound(rows, n_in, outlier, zero_row, seed):
    """x[R, in] -> int8 levels q_l (level-major rows) and row scales s with
    |x - s * sum_l q_l / 254**l| <= max|x_row| / (127 * 2 * 254**(levels - 1)), every q_l in
    [-127, 127]; an all-zero row gives zeros (no division by zero); rows with one large
    outlier keep the bound relative to that row's max."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    x[:, rng.integers(n_in)] *= outlier
    if zero_row:
        x[0] = 0.0
    q, scale = jax.jit(linear._int8_levels)(jnp.asarray(x))
    assert np.all(np.isfinite(scale)) and np.all(np.asarray(scale) > 0)  # nothing divides by 0
    levels = linear._INT8_LEVELS
    q = np.asarray(q).astype(np.float64).reshape(levels, rows, n_in)
    assert q.min() >= -127 and q.max() <= 127
    steps = linear._INT8_LEVEL_STEP ** -np.arange(levels)
    back = np.einsum("lri,l->ri", q, steps) * np.asarray(scale, np.float64)[:, None]
    row_max = np.abs(x).max(axis=1, keepdims=True)
    bound = row_max / (127 * 2 * linear._INT8_LEVEL_STEP ** (levels - 1))
    # float32 arithmetic on the way adds a few ulps of the row max
    assert np.all(np.abs(back - x) <= bound + 4 * np.finfo(np.float32).eps * row_max)
    if zero_row:
        assert np.all(q[:, 0] == 0) and np.all(back[0] == 0)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA's CPU code generation")
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_int8_linear_multiplies_int8_levels_by_the_weight_up_to_the_plans_rows(plan):
    """Under the AVX512-BF16 plan an int8 weight is multiplied by x's int8 levels (an
    s8 x s8 -> s32 product, which YNNPACK takes) for 1..64 rows and by the converting einsum
    beyond; the AVX2 plan never multiplies int8 by int8."""
    qw = jax.eval_shape(lambda: quantize_int8(jnp.zeros((256, 896), jnp.float32)))
    with use_plan(PLANS[plan]) as p:
        for rows in (1, 4, 64, 65):
            x = jax.ShapeDtypeStruct((rows, 896), jnp.bfloat16)
            hlo = jax.jit(linear.linear).lower(x, qw).compile().as_text()
            int8_products = re.findall(r"s32\[[\d,]+\]\{[\d,]*\} (?:dot|fusion)\(", hlo)
            assert bool(int8_products) == (rows <= p.int8_dot_int8_max_rows), (rows, hlo[:2000])
    assert PLANS[plan].int8_dot_int8_max_rows == (0 if plan.startswith("avx2") else 64)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA's CPU code generation")
def test_int8_prefill_converts_the_weight_without_a_transposed_copy():
    """Beyond the int8 levels' rows (a prefill) the AVX512-BF16 plan converts a one-block int8
    weight to bf16 for YNNPACK, which reads it as stored: no transpose in the program. (A
    product contracting the block axis too made XLA write a transposed copy of each converted
    weight: a 512-token prefill of the 0.5B shape took 627-638 instead of 525-536 ms.)"""
    with use_plan(PLANS["avx512-bf16"]):
        for out, n_in in ((4864, 896), (896, 4864)):
            qw = jax.eval_shape(quantize_int8, jax.ShapeDtypeStruct((out, n_in), jnp.float32))
            assert qw.q.shape[0] == 1
            x = jax.ShapeDtypeStruct((512, n_in), jnp.bfloat16)
            hlo = jax.jit(linear.linear).lower(x, qw).compile().as_text()
            assert "ynn_fusion" in hlo and " transpose(" not in hlo, hlo[:3000]


def test_int8_weights_are_one_block_unless_the_plan_stores_blocks():
    """quantize_int8's default column blocks follow the plan (layout.int8_block_width): blocks of
    3584 for the AVX2 plan's matrix-vector emitter, one block under AVX512-BF16 (YNNPACK would
    copy each block); accelerators keep the blocks their figures were measured with."""
    w = jnp.zeros((8, 4864), jnp.float32)
    with use_plan(PLANS["avx2"]):
        assert quantize_int8(w).q.shape == (2, 8, 2432)
    with use_plan(PLANS["avx512-bf16"]):
        assert quantize_int8(w).q.shape == (1, 8, 4864)
        assert int8_block_width(4864, backend="gpu") == 3584
    assert quantize_int8(w, block=1000).q.shape == (5, 8, 973)


def test_quantized_embedding_rows_are_the_dequantized_rows(params):
    qp = quantize_params(params)
    tokens = jnp.array([[0, 5, 511], [7, 7, 300]], jnp.int32)
    got = np.asarray(model._embed(qp.embed, tokens, CFG.hidden_size, jnp.float32))
    want = np.asarray(dequantize(qp.embed, CFG.hidden_size))[np.asarray(tokens)]
    np.testing.assert_array_equal(got, want)


def test_quantized_model_stays_close_and_its_cache_matches_recompute(params):
    """int8 logits track the float32 model's; and the quantized model's cached decode equals
    its own cache-free forward (the engine relies on this)."""
    qp = quantize_params(params)
    assert is_quantized(qp) and not is_quantized(params)
    assert all(isinstance(getattr(layer, n), Int8Weight) for layer in qp.layers
               for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj"))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape)
    f = jax.jit(forward, static_argnums=1, static_argnames=("kv_len",))
    ref = np.asarray(f(params, CFG, tokens, pos)[0])
    got = np.asarray(f(qp, CFG, tokens, pos)[0])
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 0.03, rel  # int8 steps of max|row|/127 on std-0.02 weights
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() > 0.999

    # Prefill 8 tokens into a cache, then decode the other 4 one at a time (batch 2 rows).
    cache = init_cache(CFG, 2, 16, jnp.float32)
    logits, cache = f(qp, CFG, tokens[:, :8], pos[:, :8], cache, kv_len=16)
    steps = [logits]
    for t in range(8, 12):
        logits, cache = f(qp, CFG, tokens[:, t:t + 1], pos[:, t:t + 1], cache, kv_len=16)
        steps.append(logits)
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
    np.testing.assert_allclose(cached, got, rtol=2e-4, atol=2e-5)


def test_engine_serves_quantized_params(params):
    """The engine (bf16 activations, int8 weights, 1- and 2-row decode programs) gives the
    greedy tokens generate.py computes from the same quantized params."""
    qp = quantize_params(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    prompts = [[5, 17, 99, 3, 200], [42, 7, 1]]
    want = greedy_generate(qp, CFG, prompts, 8)
    eng = Engine(qp, CFG, max_slots=2, max_len=32, queue_size=4)
    try:
        assert eng.cache.k[0].dtype == model.cache_storage_dtype(jnp.bfloat16)
        handles = [eng.submit(GenerationRequest(tuple(p), SamplingParams(temperature=0.0), 8))
                   for p in prompts]
        got = [[e.token for e in h.events() if e.token is not None] for h in handles]
    finally:
        eng.close()
    assert got == want


def test_load_checkpoint_quantizes_like_quantize_params(tiny_checkpoint, tmp_path):
    cfg, plain = load_checkpoint(tiny_checkpoint, jnp.bfloat16, progress=False)
    cfg2, quant = load_checkpoint(tiny_checkpoint, jnp.bfloat16, progress=False,
                                  quantize="int8")
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(quantize_params(plain)), jax.tree.leaves(quant), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match="quantization"):
        load_checkpoint(tiny_checkpoint, quantize="int4")
    with pytest.raises(CheckpointError, match="int8"):
        save_checkpoint(quant, cfg, tmp_path / "out")


def test_sharding_places_quantized_params(params):
    from qwen_jax.sharding import make_mesh, shard_params

    qp = quantize_params(params)
    sharded = shard_params(qp, make_mesh(1))
    assert jax.tree.structure(sharded) == jax.tree.structure(qp)
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
    pos = np.broadcast_to(np.arange(5, dtype=np.int32), tokens.shape)
    f = jax.jit(forward, static_argnums=1)
    np.testing.assert_array_equal(np.asarray(f(qp, CFG, tokens, pos)[0]),
                                  np.asarray(f(sharded, CFG, tokens, pos)[0]))


def test_quantize_params_keeps_norms_and_biases(params):
    """quantize_params only swaps the weights: norms and biases are the same arrays."""
    qp = quantize_params(params)
    assert qp.final_norm is params.final_norm
    assert all(a.q_bias is b.q_bias and a.input_norm is b.input_norm
               for a, b in zip(qp.layers, params.layers, strict=True))
