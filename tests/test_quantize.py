"""Weight-only int8 (quantize.py) and its use in the model, loader, engine and compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_jax import model
from qwen_jax.config import QwenConfig
from qwen_jax.cpu_matmul import PLANS, use_plan
from qwen_jax.engine import Engine, GenerationRequest
from qwen_jax.generate import greedy_generate
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


@pytest.mark.parametrize("plan", sorted(PLANS))
@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 10), n_in=st.sampled_from([64, 3584, 3585, 4864]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), seed=st.integers(0, 2**16))
def test_int8_linear_is_x_times_the_dequantized_weight(plan, rows, n_in, dtype, seed):
    """Both the CPU matrix-vector path (<= 8 rows, blocks above 3584 columns) and the einsum
    path (the weight in float32, or in bf16 for bf16 activations under the AVX512-BF16 plan)
    compute x @ dequantize(w).T."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((1, rows, n_in)), dtype)
    qw = quantize_int8(jnp.asarray(rng.standard_normal((96, n_in)) * 0.05, jnp.float32))
    with use_plan(PLANS[plan]):
        got = np.asarray(jax.jit(model._linear)(x, qw).astype(jnp.float32))
    want = np.asarray(x.astype(jnp.float32)) @ np.asarray(dequantize(qw, n_in)).T
    assert got.shape == (1, rows, 96)
    tol = 2**-7 if dtype == jnp.bfloat16 else 1e-5
    assert np.abs(got - want).max() / np.abs(want).max() < tol
    # The accelerator paths (one row: multiply-reduce; more: einsum), run here on the CPU.
    other = jax.jit(model._int8_linear, static_argnums=2)(x, qw, False)
    assert np.abs(np.asarray(other.astype(jnp.float32)) - want).max() / np.abs(want).max() < tol


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
