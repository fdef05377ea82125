"""The decode-specific code paths of model.py and linear.py: cache rows mapped to slots, and the
CPU bf16 paths of every CPU matmul plan (matrix-vector products, YNNPACK's bf16 matmul,
convert-then-float32-matmul): their numerics, and checks of the compiled programs that decode
really avoids converting whole weights to float32 (10-30x in decode speed) and that a prefill's
attention keeps its scores in place."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import INT8_PLANS, PLAN_ROWS
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_jax import linear, model
from qwen_jax.config import QwenConfig
from qwen_jax.cpu_matmul import AVX2, PLANS, CpuMatmulPlan, use_plan
from qwen_jax.layout import block_wide_weights
from qwen_jax.model import forward, init_cache, init_params
from qwen_jax.quantize import quantize_params

CFG = QwenConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(5), jnp.float32)


def _stack(cache) -> np.ndarray:
    return np.stack([np.asarray(a) for a in cache.k + cache.v])


def test_cache_rows_equal_the_default_row_layout(params):
    """Rows (2, 0) of a 4-row cache behave exactly like rows (0, 1) of a 2-row cache, and the
    other rows are left untouched."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (2, 6)).astype(np.int32)
    positions = np.stack([np.arange(6), np.arange(6) + 3]).astype(np.int32)
    f = jax.jit(forward, static_argnums=1, static_argnames=("kv_len",))

    def filled(rows):  # recognisable contents (row 1 of the tokens also attends to 0..2 unwritten)
        return jax.tree.map(lambda a: a + 7.0, init_cache(CFG, rows, 16, jnp.float32))

    ref_logits, ref_cache = f(params, CFG, tokens, positions, filled(2), kv_len=16)
    big = filled(4)
    logits, big = f(params, CFG, tokens, positions, big, kv_len=16,
                    cache_rows=np.array([2, 0], np.int32))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    got, want = _stack(big), _stack(ref_cache)
    # Written positions match; row 2 <- token row 0 (positions 0..5), row 0 <- row 1 (3..8).
    np.testing.assert_allclose(got[:, 2, :6], want[:, 0, :6], rtol=1e-6)
    np.testing.assert_allclose(got[:, 0, 3:9], want[:, 1, 3:9], rtol=1e-6)
    assert np.all(got[:, 2, 6:] == 7.0) and np.all(got[:, 0, :3] == 7.0)
    assert np.all(got[:, 1] == 7.0) and np.all(got[:, 3] == 7.0)


@pytest.mark.parametrize("plan, rows", PLAN_ROWS)
@settings(max_examples=4, deadline=None)
@given(n_in=st.sampled_from([64, 3584, 3585, 4864]), seed=st.integers(0, 2**16))
def test_bf16_linear_matches_float32_reference(plan, rows, n_in, seed):
    """Each CPU bf16 path of each plan (per-row matrix-vector products with the contraction split
    in chunks above 3584, YNNPACK's bf16 matmul with or without padded rows, convert-then-matmul;
    chosen by the row count) computes x @ W.T like a float32 matmul of the same bf16 inputs, to
    bf16 rounding."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((1, rows, n_in)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((96, n_in)) * 0.05, jnp.bfloat16)
    with use_plan(PLANS[plan]):
        got = np.asarray(jax.jit(linear.linear)(x, w).astype(jnp.float32))
    want = np.asarray(x.astype(jnp.float32)) @ np.asarray(w.astype(jnp.float32)).T
    assert got.shape == (1, rows, 96)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 2 ** -7  # within a couple of bf16 ulps of the max


def _float_weight_copies(hlo: str, weight_sizes: set[int]) -> list[str]:
    """Top-level instructions of compiled HLO text (arrays that are materialised in memory, not
    values inside a fusion; parameters excluded) producing a float array as large as a weight."""
    bad = []
    for line in hlo[hlo.index("\nENTRY"):].splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (?:f32|bf16)\[([\d,]+)\]", line)
        if (m and "parameter(" not in line
                and math.prod(int(d) for d in m.group(1).split(",")) in weight_sizes):
            bad.append(line.strip()[:160])
    return bad


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA's CPU code generation")
@pytest.mark.parametrize("weights, plan", [("bf16", name) for name in sorted(PLANS)]
                         + [("int8", name) for name in INT8_PLANS])
def test_cpu_decode_step_reads_weights_without_float_copies(weights, plan):
    """A regression guard: under either CPU plan, the compiled batch-1, -4 and -8 decode steps at
    Qwen2.5-0.5B layer shapes (two layers), with bf16 or int8 weights, must not materialise a
    float copy of any weight matrix (or, for int8, of one of its column blocks); a one-row step
    multiplies its weights by YNNPACK (bf16, or int8 by int8 levels) exactly under the
    AVX512-BF16 plan."""
    with use_plan(PLANS[plan]):
        _check_decode_step_copies(weights, PLANS[plan])


def _check_decode_step_copies(weights: str, plan: CpuMatmulPlan) -> None:
    cfg = QwenConfig(vocab_size=4096, hidden_size=896, intermediate_size=4864,
                     num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16))
    sizes = {math.prod(a.shape) for a in jax.tree.leaves(params) if a.ndim == 2}
    if weights == "int8":
        params = jax.eval_shape(quantize_params, params)
        blocks = [a.shape for a in jax.tree.leaves(params) if a.ndim == 3]
        sizes |= {math.prod(shape[1:]) for shape in blocks}

    def step(params, tokens, positions, cache):
        return forward(params, cfg, tokens, positions, cache, kv_len=cache.k[0].shape[1],
                       logits_at=jnp.zeros(tokens.shape[:1], jnp.int32))

    for batch in (1, 4, 8):
        cache = jax.eval_shape(lambda b=batch: init_cache(cfg, b, 64, jnp.bfloat16))
        ids = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
        hlo = jax.jit(step).lower(params, ids, ids, cache).compile().as_text()
        assert not _float_weight_copies(hlo, sizes), _float_weight_copies(hlo, sizes)[:3]
        if batch == 1:  # attention's two products per layer take YNNPACK under every plan
            ynn = len(re.findall(r"%ynn_fusion[.\d]* = ", hlo[hlo.index("\nENTRY"):]))
            projections = 7 * cfg.num_hidden_layers + 1  # and the lm_head
            one_row_library = (plan.int8_dot_int8_max_rows >= 1 if weights == "int8"
                               else plan.matvec_max_rows < 1)
            assert (ynn >= projections) == one_row_library, ynn

    # The guard itself can fail: a long prefill converts int8 weights under either plan, and
    # bf16 weights under the AVX2 plan only (the other multiplies them by YNNPACK as they are).
    # 160 tokens: more rows than either plan's YNNPACK bf16 (AVX2) or int8 (AVX512-BF16)
    # products take, and no activation of a weight's size.
    prefill = jax.ShapeDtypeStruct((1, 160), jnp.int32)
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 256, jnp.bfloat16))
    hlo = jax.jit(step).lower(params, prefill, prefill, cache).compile().as_text()
    assert bool(_float_weight_copies(hlo, sizes)) == (plan.dot_max_rows is not None
                                                       or weights == "int8")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA's CPU code generation")
@use_plan(AVX2)  # column blocks are the AVX2 plan's layout
def test_cpu_decode_reads_blocks_without_copying_them():
    """At the 0.5B layer shapes, the compiled 1- and 4-row decode steps materialise no copy of a
    column block of down_proj; with the plain layout the 4-row step copies each column slice
    (so the check can fail)."""
    cfg = QwenConfig(vocab_size=1024, hidden_size=896, intermediate_size=4864,
                     num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16))
    blocked = jax.eval_shape(block_wide_weights, params)
    blocks = [a.shape for a in blocked.layers[0].down_proj.blocks]
    assert blocks == [(896, 2432)] * 2
    sizes = {896 * 2432}

    def step(params, tokens, positions, cache):
        return forward(params, cfg, tokens, positions, cache, kv_len=64,
                       logits_at=jnp.zeros(tokens.shape[:1], jnp.int32))

    def copies(p, rows):
        cache = jax.eval_shape(lambda: init_cache(cfg, rows, 64, jnp.bfloat16))
        ids = jax.ShapeDtypeStruct((rows, 1), jnp.int32)
        hlo = jax.jit(step).lower(p, ids, ids, cache).compile().as_text()
        return _float_weight_copies(hlo, sizes)

    assert copies(blocked, 1) == [] and copies(blocked, 4) == []
    assert copies(params, 4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA's CPU scheduling")
@use_plan(AVX2)  # the plan whose long prefills convert
def test_cpu_bf16_prefill_converts_weights_one_layer_at_a_time():
    """A bf16 prefill under the AVX2 plan converts each weight to f32 for its matmul: the
    compiled program must not keep all layers' converted copies alive at once (qwen_jax sets
    XLA's CPU scheduler flag)."""
    cfg = QwenConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024,
                     num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16))
    # 128 tokens: up to 64 rows take YNNPACK's bf16 matmul, which converts nothing.
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 128, jnp.bfloat16))
    ids = jax.ShapeDtypeStruct((1, 128), jnp.int32)

    def prefill(params, tokens, cache):
        return forward(params, cfg, tokens, jnp.arange(128)[None], cache,
                       logits_at=jnp.zeros((1,), jnp.int32))

    mem = jax.jit(prefill).lower(params, ids, cache).compile().memory_analysis()
    layer_weights_f32 = 4 * sum(math.prod(a.shape) for a in jax.tree.leaves(params.layers[0]))
    # All 8 layers' f32 copies would be 8x; allow two layers' worth plus activations.
    assert mem.temp_size_in_bytes < 2 * layer_weights_f32 + (4 << 20), mem.temp_size_in_bytes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_cache_write_sets_rows_and_drops_out_of_range(dtype):
    """The 16-bit caches are written through an integer view: same result as a plain scatter."""
    rng = np.random.default_rng(3)
    cache = jnp.asarray(rng.standard_normal((4, 8, 2, 3)), dtype)
    new = jnp.asarray(rng.standard_normal((2, 3, 2, 3)), dtype)
    rows = jnp.array([3, 1], jnp.int32)
    positions = jnp.array([[0, 1, 8], [5, 6, 7]], jnp.int32)  # 8 is out of range: dropped
    got = np.asarray(jax.jit(model._cache_write)(cache, rows, positions, new).astype(jnp.float32))
    want = np.asarray(cache.astype(jnp.float32)).copy()
    new32 = np.asarray(new.astype(jnp.float32))
    want[3, 0], want[3, 1] = new32[0, 0], new32[0, 1]
    want[1, 5:8] = new32[1]
    np.testing.assert_array_equal(got, want)


def test_bf16_cache_holds_bits_on_cpu_and_reads_back_the_same(params):
    """A bf16 cache is stored as uint16 bit patterns on the CPU (and as bf16 elsewhere); the
    model reads it exactly like a bf16 cache."""
    assert model.cache_storage_dtype(jnp.bfloat16, "gpu") == jnp.bfloat16
    assert model.cache_storage_dtype(jnp.bfloat16, "cpu") == jnp.uint16
    assert model.cache_storage_dtype(jnp.float32, "cpu") == jnp.float32
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CFG.vocab_size, (2, 7)).astype(np.int32)
    pos = np.broadcast_to(np.arange(7, dtype=np.int32), tokens.shape)
    f = jax.jit(forward, static_argnums=1, static_argnames=("kv_len",))
    bits = jax.tree.map(lambda a: a.astype(jnp.uint16), init_cache(CFG, 2, 16, jnp.float32))
    plain = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_cache(CFG, 2, 16, jnp.float32))
    outs = []
    for cache in (bits, plain):
        first, cache = f(p16, CFG, tokens[:, :6], pos[:, :6], cache, kv_len=16)
        second, cache = f(p16, CFG, tokens[:, 6:], pos[:, 6:], cache, kv_len=16)
        outs.append((np.asarray(first), np.asarray(second), _stack(cache)))
    (a1, a2, ca), (b1, b2, cb) = outs
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert ca.dtype == np.uint16
    np.testing.assert_array_equal(ca, cb.view(np.uint16))
    assert np.any(ca != 0)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA's CPU code generation")
def test_cpu_decode_step_updates_the_cache_in_place():
    """The engine-style decode step (rows mapped to cache slots) must not copy the cache: its
    temporaries stay below one layer's cache. The same step with a plain bf16 cache, which XLA's
    CPU backend converts to float32 around the update, does exceed it (so the check can fail)."""
    cfg = QwenConfig(vocab_size=1024, hidden_size=128, intermediate_size=256,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16))
    ids = jax.ShapeDtypeStruct((2, 1), jnp.int32)
    slots = jax.ShapeDtypeStruct((2,), jnp.int32)

    def step(params, tokens, positions, slots, cache):
        return forward(params, cfg, tokens, positions, cache, kv_len=256, cache_rows=slots,
                       logits_at=jnp.zeros((2,), jnp.int32))

    def temps(dtype):
        cache = jax.eval_shape(lambda: jax.tree.map(
            lambda a: a.astype(dtype), init_cache(cfg, 8, 1024, jnp.float32)))
        compiled = jax.jit(step, donate_argnums=4).lower(params, ids, ids, slots, cache).compile()
        return compiled.memory_analysis().temp_size_in_bytes, cache.k[0].size * 2

    used, layer_cache = temps(model.cache_storage_dtype(jnp.bfloat16))
    assert used < layer_cache, (used, layer_cache)
    used, layer_cache = temps(jnp.bfloat16)
    assert used > layer_cache, (used, layer_cache)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA's CPU code generation")
def test_cpu_prefill_attention_keeps_the_scores_in_place():
    """A 512-token prefill at the 0.5B attention shape materialises at most two float32 arrays
    of the attention scores' size per layer (the product and the masked scores). With
    token-major operands XLA also wrote a transposed copy of the scores and of the
    probabilities (four per layer; 24 layers of attention took 429 instead of 119 ms)."""
    t = 512
    cfg = QwenConfig(vocab_size=1024, hidden_size=896, intermediate_size=1024,
                     num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16))
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, t, jnp.bfloat16))

    def prefill(params, tokens, cache):
        return forward(params, cfg, tokens, jnp.arange(t)[None], cache, kv_len=t,
                       logits_at=jnp.zeros((1,), jnp.int32))

    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    hlo = jax.jit(prefill).lower(params, ids, cache).compile().as_text()
    scores = cfg.num_attention_heads * t * t
    arrays = [line for line in hlo[hlo.index("\nENTRY"):].splitlines()
              if (m := re.match(r"\s*(?:ROOT )?%\S+ = f32\[([\d,]+)\]", line))
              and math.prod(int(d) for d in m.group(1).split(",")) == scores]
    assert 0 < len(arrays) <= 2 * cfg.num_hidden_layers, arrays


def _while_and_entry_copies(hlo: str, weight_sizes: set[int]) -> list[str]:
    """_float_weight_copies over the entry computation and the bodies of its loops (the
    computations that run unfused), in compiled HLO text; a loop body's views of its loop state
    (get-tuple-element) are not copies."""
    bodies = set(re.findall(r"body=(%[\w.-]+)", hlo))
    bad = _float_weight_copies(hlo, weight_sizes)
    for block in hlo.split("\n\n"):
        head = block.lstrip().split(" ", 1)[0]
        if head in bodies:
            bad += _float_weight_copies("\nENTRY" + block.split("\n", 1)[1], weight_sizes)
    return [line for line in bad if " get-tuple-element(" not in line]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA's CPU code generation")
@pytest.mark.parametrize("plan, weights, convert", [
    ("avx512-bf16", "int8", False), ("avx512-bf16", "bf16", True), ("avx2", "int8", True)])
def test_cpu_multi_step_decode_copies_weights_unless_int8_levels(plan, weights, convert):
    """Where several decode steps per call can pay off on the CPU (engine.default_steps_per_call,
    `--steps-per-call`): the multi-step program (a loop over steps) must not materialise a float
    copy of any weight for int8 weights under the AVX512-BF16 plan; it does for bf16 weights (the
    embedding table converted to float32 once, outside the loop, for the lm_head of every step)
    and for int8 weights under the AVX2 plan (each weight converted inside the loop, every
    step)."""
    from qwen_jax import sampler as S
    from qwen_jax.engine import _decode

    cfg = QwenConfig(vocab_size=4096, hidden_size=896, intermediate_size=4864,
                     num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2)
    with use_plan(PLANS[plan]):
        params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16))
        sizes = {math.prod(a.shape) for a in jax.tree.leaves(params) if a.ndim == 2}
        params = jax.eval_shape(quantize_params if weights == "int8" else block_wide_weights,
                                params)
        sizes |= {math.prod(a.shape[1:]) for a in jax.tree.leaves(params) if a.ndim == 3}
        rows = 2
        cache = jax.eval_shape(lambda: init_cache(cfg, rows, 64, jnp.bfloat16))
        sbatch = jax.eval_shape(lambda: S.make_sampling_batch(rows, cfg.vocab_size))
        pstate = jax.eval_shape(lambda: S.init_penalty_state(rows, cfg.vocab_size))
        ids = jax.ShapeDtypeStruct((rows,), jnp.int32)
        allowed = jax.ShapeDtypeStruct((rows, cfg.vocab_size), jnp.bool_)
        program = jax.jit(lambda *a: _decode(*a, cfg=cfg, kv_len=None, vocab_limit=cfg.vocab_size,
                                             num_steps=4))
        hlo = program.lower(params, cache, pstate, sbatch, ids, ids, ids, ids,
                            allowed).compile().as_text()
    assert " while(" in hlo
    assert bool(_while_and_entry_copies(hlo, sizes)) == convert, (
        _while_and_entry_copies(hlo, sizes)[:3])


@settings(max_examples=12, deadline=None)
@given(chunk=st.sampled_from([1, 7, 16, 64]), seed=st.integers(0, 2**31 - 1))
def test_attention_in_chunks_equals_attention_over_the_cache(params, chunk, seed):
    """`kv_chunk` in decode (the cache read in chunks, as many as the largest position needs)
    gives the logits and cache of attending to the whole cache, for a cache length that is no
    multiple of the chunk (40) and positions anywhere in it; a row's logits do not depend, to
    the bit, on how many chunks the other rows need."""
    rng = np.random.default_rng(seed)
    cache = _random_cache(rng, 4)
    tokens = rng.integers(0, CFG.vocab_size, (3, 1)).astype(np.int32)
    positions = rng.integers(0, 40, (3, 1)).astype(np.int32)
    rows = np.array([3, 0, 2], np.int32)
    _assert_chunks_match_whole_cache(params, tokens, positions, cache, rows, chunk)
    # Row 0 beside rows at the start of the cache, then at its end (more chunks to read).
    near, far = positions.copy(), positions.copy()
    near[1:], far[1:] = 0, 39
    a, _ = _forward(params, CFG, tokens, near, cache, kv_chunk=chunk, cache_rows=rows)
    b, _ = _forward(params, CFG, tokens, far, cache, kv_chunk=chunk, cache_rows=rows)
    np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])


_forward = jax.jit(forward, static_argnums=1, static_argnames=("kv_len", "kv_chunk"))


def _random_cache(rng: np.random.Generator, rows: int) -> model.KVCache:
    """A float32 cache of `rows` rows and 40 positions, filled with random keys and values."""
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                        init_cache(CFG, rows, 40, jnp.float32))


def _assert_chunks_match_whole_cache(params, tokens, positions, cache, rows, chunk: int) -> None:
    """forward reading the cache `chunk` keys at a time gives the logits and the cache of
    attending to all of it."""
    want, want_cache = _forward(params, CFG, tokens, positions, cache, kv_len=40,
                                cache_rows=rows)
    got, got_cache = _forward(params, CFG, tokens, positions, cache, kv_chunk=chunk,
                              cache_rows=rows)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    # (Layer 0 writes the same keys; later layers' differ as their inputs do, in the last bits.)
    np.testing.assert_allclose(_stack(got_cache), _stack(want_cache), rtol=2e-5, atol=2e-5)


@settings(max_examples=12, deadline=None)
@given(chunk=st.sampled_from([1, 7, 16, 64]), t=st.sampled_from([3, 8]), data=st.data())
def test_prefill_attention_in_chunks_equals_attention_over_the_cache(params, chunk, t, data):
    """A prefill call (the engine's calls after a prompt's first, on the CPU): t tokens at
    consecutive positions from `start`, attending to the cache written before them and to
    each other, read in chunks, give the logits and cache of attending to the whole cache (40
    keys, no multiple of 7, 16 or 64; 64: one chunk longer than the cache)."""
    start = data.draw(st.integers(0, 40 - t))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    tokens = rng.integers(0, CFG.vocab_size, (1, t)).astype(np.int32)
    positions = (start + np.arange(t, dtype=np.int32))[None]
    _assert_chunks_match_whole_cache(params, tokens, positions, _random_cache(rng, 2),
                                     np.array([1], np.int32), chunk)


def test_kv_chunk_is_checked(params):
    cache = init_cache(CFG, 1, 8, jnp.float32)
    ids = np.zeros((1, 1), np.int32)
    for kw in (dict(kv_chunk=0), dict(kv_chunk=4, kv_len=8)):
        with pytest.raises(ValueError, match="kv_chunk"):
            forward(params, CFG, ids, ids, cache, **kw)
