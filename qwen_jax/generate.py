"""Simple batched greedy generation on top of `model.forward`: the reference path the notebooks
and the parity tests use. The server and `qwen-jax generate` run `engine.Engine` instead
(continuous batching, sampling, and on the CPU a cache read in chunks).

Prompts of different lengths share one batch: each row is right-padded to a common bucket length
and decodes at its own positions. Prefill and the decode step are jit-compiled with the cache
donated; lengths are rounded up to powers of two so that new prompt lengths rarely recompile.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import QwenConfig
from qwen_jax.model import KVCache, Params, forward, init_cache


def bucket_length(n: int, minimum: int = 16, maximum: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), capped at `maximum` (n must fit in it)."""
    if n < 1:
        raise ValueError(f"length must be positive, got {n}")
    if maximum is not None and n > maximum:
        raise ValueError(f"length {n} exceeds the maximum {maximum}")
    bucket = 1 << (max(n, minimum) - 1).bit_length()
    return bucket if maximum is None else min(bucket, maximum)


@partial(jax.jit, static_argnums=1, static_argnames="kv_len", donate_argnums=4)
def prefill(
    params: Params, cfg: QwenConfig, tokens: jax.Array, lengths: jax.Array, cache: KVCache,
    *, kv_len: int,
) -> tuple[jax.Array, KVCache]:
    """Right-padded prompts tokens[B, T], true lengths[B] -> (last-token logits [B, V], cache)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return forward(params, cfg, tokens, positions, cache, kv_len=kv_len, logits_at=lengths - 1)


@partial(jax.jit, static_argnums=1, static_argnames="kv_len", donate_argnums=4)
def decode_step(
    params: Params, cfg: QwenConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache,
    *, kv_len: int,
) -> tuple[jax.Array, KVCache]:
    """One token per row: tokens[B] at positions[B] -> (logits [B, V], cache)."""
    logits, cache = forward(params, cfg, tokens[:, None], positions[:, None], cache, kv_len=kv_len)
    return logits[:, 0], cache


def greedy_generate(
    params: Params,
    cfg: QwenConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Greedy continuations of each prompt (a row stops after emitting one of `eos_ids`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    for p in prompts:
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got {list(p)}")

    lengths = np.array([len(p) for p in prompts], np.int32)
    prompt_len = bucket_length(int(lengths.max()))
    cache_len = bucket_length(int(lengths.max()) + max_new_tokens)
    tokens = np.zeros((len(prompts), prompt_len), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p

    cache = init_cache(cfg, len(prompts), cache_len, params.final_norm.dtype)
    logits, cache = prefill(params, cfg, tokens, lengths, cache, kv_len=prompt_len)
    next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    eos = set(eos_ids)
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for step in range(max_new_tokens):
        chosen = np.asarray(next_tokens)
        for row, tok in enumerate(chosen):
            if not done[row]:
                out[row].append(int(tok))
                done[row] = int(tok) in eos
        if done.all() or step == max_new_tokens - 1:
            break
        positions = lengths + step  # the position of the token just chosen, per row
        kv_len = bucket_length(int(positions.max()) + 1, maximum=cache_len)
        logits, cache = decode_step(params, cfg, next_tokens, positions, cache, kv_len=kv_len)
        next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return out
