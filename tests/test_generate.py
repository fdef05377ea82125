"""Generation: greedy tokens equal transformers', the KV cache equals full recomputation, batching
does not change a row's tokens, and prompt buckets are powers of two."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_jax.config import QwenConfig
from qwen_jax.generate import bucket_length, greedy_generate
from qwen_jax.model import forward, init_cache, init_params
from qwen_jax.weights import load_checkpoint

PROMPT_LENGTHS = (5, 17, 11)  # different lengths; 17 crosses the minimum bucket of 16


def _prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def tiny_cfg() -> QwenConfig:
    return QwenConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_params(tiny_cfg):
    return init_params(tiny_cfg, jax.random.PRNGKey(3), jnp.float32)


def test_greedy_matches_transformers_generate(tiny_checkpoint):
    import torch
    from transformers import Qwen2ForCausalLM

    prompts = _prompts(1024)
    model = Qwen2ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for p in prompts:  # one prompt at a time: no padding on the reference side
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=32, min_new_tokens=32, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    del model

    cfg, params = load_checkpoint(tiny_checkpoint, jnp.float32, progress=False)
    got = greedy_generate(params, cfg, prompts, max_new_tokens=32)
    assert [len(g) for g in got] == [32, 32, 32]
    assert got == expected


def test_cached_decoding_equals_full_recomputation(tiny_cfg, tiny_params):
    """Prefill + one-token decode steps give the logits of a full causal forward pass."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tiny_cfg.vocab_size, (2, 24)).astype(np.int32)
    positions = np.broadcast_to(np.arange(24, dtype=np.int32), tokens.shape)
    step_fn = jax.jit(forward, static_argnums=1, static_argnames="kv_len")
    full, _ = step_fn(tiny_params, tiny_cfg, tokens, positions)

    cache = init_cache(tiny_cfg, 2, 32, jnp.float32)
    first, cache = step_fn(tiny_params, tiny_cfg, tokens[:, :10], positions[:, :10], cache)
    steps = [first]
    for t in range(10, 24):
        logits, cache = step_fn(tiny_params, tiny_cfg, tokens[:, t:t + 1], positions[:, t:t + 1],
                                cache, kv_len=bucket_length(t + 1, maximum=32))
        steps.append(logits)
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
    scale = np.abs(np.asarray(full)).max()
    assert np.abs(cached - np.asarray(full)).max() / scale < 1e-5


def test_cache_positions_rows_and_dropped_writes(tiny_cfg, tiny_params):
    """A row's logits depend only on its own cache row; out-of-range positions write nothing."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, tiny_cfg.vocab_size, (2, 8)).astype(np.int32)
    positions = np.stack([np.arange(8), np.arange(8) + 4]).astype(np.int32)  # row 1 starts at 4
    cache = init_cache(tiny_cfg, 2, 16, jnp.float32)
    _, cache = forward(tiny_params, tiny_cfg, tokens, positions, cache)
    k = np.stack([np.asarray(a) for a in cache.k])  # [layers, batch, max_len, kv, hd]
    assert np.all(k[:, 0, 8:] == 0) and np.all(k[:, 1, :4] == 0)
    assert np.all(np.abs(k[:, 0, :8]).max(axis=(-1, -2)) > 0)

    bad = np.array([[16], [-1]], np.int32)  # both outside [0, 16): dropped, nothing written
    _, cache = forward(tiny_params, tiny_cfg, tokens[:, :1], bad, cache)
    np.testing.assert_array_equal(np.stack([np.asarray(a) for a in cache.k]), k)


def test_batched_equals_one_by_one(tiny_cfg, tiny_params):
    prompts = _prompts(tiny_cfg.vocab_size, seed=5)
    batched = greedy_generate(tiny_params, tiny_cfg, prompts, max_new_tokens=12)
    alone = [greedy_generate(tiny_params, tiny_cfg, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone


def test_eos_stops_a_row(tiny_cfg, tiny_params):
    prompts = _prompts(tiny_cfg.vocab_size, seed=7)
    free = greedy_generate(tiny_params, tiny_cfg, prompts, max_new_tokens=8)
    eos = free[0][2]  # the third token of row 0 becomes an end-of-sequence id
    stopped = greedy_generate(tiny_params, tiny_cfg, prompts, max_new_tokens=8, eos_ids=(eos,))
    for f, s in zip(free, stopped):
        cut = f.index(eos) + 1 if eos in f else len(f)
        assert s == f[:cut]
    assert len(stopped[0]) <= 3


@pytest.mark.parametrize("bad", [[], [[]], [[1, 2, 512]], [[-1]]])
def test_generate_rejects_bad_prompts(tiny_cfg, tiny_params, bad):
    with pytest.raises(ValueError):
        greedy_generate(tiny_params, tiny_cfg, bad, max_new_tokens=4)


@given(n=st.integers(1, 5000), minimum=st.sampled_from([1, 16, 64]))
def test_bucket_length_is_smallest_power_of_two(n, minimum):
    b = bucket_length(n, minimum=minimum)
    assert b >= max(n, minimum) and b & (b - 1) == 0
    assert b // 2 < max(n, minimum)


def test_bucket_length_limits():
    assert bucket_length(1) == 16 and bucket_length(17) == 32
    assert bucket_length(80, maximum=96) == 96
    with pytest.raises(ValueError):
        bucket_length(97, maximum=96)
    with pytest.raises(ValueError):
        bucket_length(0)
