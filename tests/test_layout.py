"""Column-block storage of wide bf16 weights on the CPU (layout.py): the round trip to the Hugging
Face layout, the products, what the loaders store, the engine on them. (That the compiled decode
step reads the blocks without copies: tests/test_decode_paths.py.)"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PLAN_ROWS
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from qwen_jax import layout, linear
from qwen_jax.config import QwenConfig
from qwen_jax.cpu_matmul import AVX2, AVX512_BF16, PLANS, use_plan
from qwen_jax.layout import (
    CPU_MATVEC_MAX_IN,
    BlockedWeight,
    block_wide_weights,
    from_blocks,
    plain_layout,
    to_blocks,
    wants_blocks,
)
from qwen_jax.model import forward, init_cache, init_params
from qwen_jax.quantize import quantize_params
from qwen_jax.sharding import make_mesh, shard_params
from qwen_jax.weights import load_checkpoint, save_checkpoint

ON_CPU = jax.default_backend() == "cpu"


@pytest.fixture(autouse=True, scope="module")
def _avx2_plan():
    """Column blocks are the AVX2 plan's layout (cpu_matmul.py): these tests run under it."""
    with use_plan(AVX2):
        yield

# One layer whose down_proj (in = 3600) is too wide for the CPU's matrix-vector emitter.
WIDE = QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=3600, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 9), blocks=st.integers(1, 4), spare=st.integers(0, 6),
       block=st.sampled_from([7, CPU_MATVEC_MAX_IN]), seed=st.integers(0, 2**16))
def test_blocks_round_trip(out, blocks, spare, block, seed):
    """Blocks are at most `block` wide, as few as possible, zero past n_in, and give back w."""
    n_in = max(1, blocks * block - spare)  # 1-4 blocks' worth, short by `spare` columns
    w = jnp.asarray(np.random.default_rng(seed).standard_normal((out, n_in)), jnp.bfloat16)
    b = to_blocks(w, block)
    count, width = len(b.blocks), b.blocks[0].shape[1]
    assert {a.shape for a in b.blocks} == {(out, width)}
    assert width <= block and count == math.ceil(n_in / block)
    assert b.n_in == n_in and count * width >= n_in
    flat = np.concatenate([np.asarray(a.astype(jnp.float32)) for a in b.blocks], axis=1)
    assert np.all(flat[:, n_in:] == 0)
    np.testing.assert_array_equal(np.asarray(from_blocks(b)), np.asarray(w))


def test_which_weights_are_blocked():
    wide = jnp.zeros((8, CPU_MATVEC_MAX_IN + 1), jnp.bfloat16)
    assert wants_blocks(wide, "cpu")
    assert not wants_blocks(wide, "gpu")  # other backends read any width
    assert not wants_blocks(wide.astype(jnp.float32), "cpu")  # float32 rows read at full speed
    assert not wants_blocks(jnp.zeros((8, CPU_MATVEC_MAX_IN), jnp.bfloat16), "cpu")
    with use_plan(AVX512_BF16):  # YNNPACK reads plain weights faster than blocks
        assert not wants_blocks(wide, "cpu")
    params = init_params(WIDE, jax.random.PRNGKey(0), jnp.bfloat16)
    blocked = block_wide_weights(params)
    for layer in blocked.layers:
        assert isinstance(layer.down_proj, BlockedWeight) == ON_CPU
        assert not isinstance(layer.gate_proj, BlockedWeight)  # in = 64
    assert isinstance(blocked.embed, jax.Array)  # token lookups read rows: never blocked
    again = plain_layout(blocked)
    assert jax.tree.structure(again) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again),
                                                    jax.tree.leaves(params)))


@pytest.mark.parametrize("plan, rows", PLAN_ROWS)
@settings(max_examples=3, deadline=None)
@given(n_in=st.sampled_from([3585, 4864, 7300]), seed=st.integers(0, 2**16))
def test_blocked_linear_matches_float32_reference(plan, rows, n_in, seed):
    """x @ W.T with W as column blocks, by each row-count path of either plan, equals a float32
    matmul of the same bf16 inputs to bf16 rounding, and the plain weight's result to float32
    rounding."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((1, rows, n_in)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((80, n_in)) * 0.05, jnp.bfloat16)
    with use_plan(PLANS[plan]):
        product = jax.jit(linear.linear)
        got = np.asarray(product(x, to_blocks(w)).astype(jnp.float32))
        same = np.asarray(product(x, w).astype(jnp.float32))
    want = np.asarray(x.astype(jnp.float32)) @ np.asarray(w.astype(jnp.float32)).T
    assert got.shape == (1, rows, 80)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 2 ** -7
    assert np.abs(got - same).max() / scale < 2 ** -7


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    params = init_params(WIDE, jax.random.PRNGKey(3), jnp.bfloat16)
    return save_checkpoint(params, WIDE, tmp_path_factory.mktemp("wide")), params


def test_load_stores_wide_bf16_weights_as_blocks_and_saves_them_plain(wide_checkpoint, tmp_path):
    path, original = wide_checkpoint
    cfg, params = load_checkpoint(path, jnp.bfloat16, progress=False)
    assert cfg == WIDE
    assert isinstance(params.layers[0].down_proj, BlockedWeight) == ON_CPU
    _, f32 = load_checkpoint(path, jnp.float32, progress=False)
    assert not any(isinstance(x, BlockedWeight) for x in f32.layers[0].__dict__.values())
    np.testing.assert_array_equal(np.asarray(layout.plain(params.layers[1].down_proj)),
                                  np.asarray(original.layers[1].down_proj))
    # Saving writes the Hugging Face layout back: the same file contents.
    again = load_file(save_checkpoint(params, cfg, tmp_path) / "model.safetensors")
    first = load_file(path / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(np.array_equal(again[k], first[k]) for k in first)
    # int8 quantization of blocked params equals that of the plain ones.
    qa, qb = quantize_params(params), quantize_params(original)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(qa), jax.tree.leaves(qb)))


def test_forward_with_blocks_equals_plain_layout(wide_checkpoint):
    """Prefill then decode steps (1 and 3 rows) give the logits of the plain layout."""
    _, params = wide_checkpoint
    blocked = block_wide_weights(params)
    rng = np.random.default_rng(0)
    f = jax.jit(forward, static_argnums=1, static_argnames=("kv_len",))
    for batch in (1, 3):
        tokens = rng.integers(0, WIDE.vocab_size, (batch, 7)).astype(np.int32)
        pos = np.broadcast_to(np.arange(7, dtype=np.int32), tokens.shape)
        outs = []
        for p in (params, blocked):
            cache = init_cache(WIDE, batch, 16, jnp.bfloat16)
            first, cache = f(p, WIDE, tokens[:, :6], pos[:, :6], cache, kv_len=16)
            second, _ = f(p, WIDE, tokens[:, 6:], pos[:, 6:], cache, kv_len=16)
            outs.append((np.asarray(first), np.asarray(second)))
        for a, b in zip(*outs):
            np.testing.assert_allclose(b, a, rtol=0, atol=2e-2 * np.abs(a).max())


def test_shard_params_takes_blocked_weights(wide_checkpoint):
    """shard_params maps each block to the whole weight's axes (a tree mismatch raised before)."""
    _, params = wide_checkpoint
    blocked = block_wide_weights(params)
    sharded = shard_params(blocked, make_mesh(1))
    assert jax.tree.structure(sharded) == jax.tree.structure(blocked)


def test_engine_serves_blocked_weights(wide_checkpoint):
    """The serving engine on loaded (blocked) bf16 weights: two concurrent greedy requests give
    the tokens of the same engine on the plain layout."""
    from qwen_jax.engine import Engine, GenerationRequest
    from qwen_jax.sampler import SamplingParams

    path, _ = wide_checkpoint
    _, params = load_checkpoint(path, jnp.bfloat16, progress=False)
    params = dataclasses.replace(params, lm_head=params.lm_head * 10)  # well-separated argmaxes
    assert any(isinstance(x, BlockedWeight) for x in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, BlockedWeight))) == ON_CPU
    prompts = [(5, 17, 99, 3), (200, 42, 7, 1, 8, 9)]
    outs = []
    for p in (params, plain_layout(params)):
        engine = Engine(p, WIDE, max_slots=2, max_len=32)
        try:
            handles = [engine.submit(GenerationRequest(q, SamplingParams(temperature=0.0), 6))
                       for q in prompts]
            outs.append([[e.token for e in h.events(timeout=120) if e.token is not None]
                         for h in handles])
        finally:
            engine.close()
    assert outs[0] == outs[1] and all(len(t) == 6 for t in outs[0])
