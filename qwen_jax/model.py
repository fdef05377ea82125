"""The Qwen2 decoder as pure functions over a params pytree.

Numerics follow transformers' `modeling_qwen2.py`: RMSNorm statistics in float32 with the normalised
value cast back to the activation dtype before the weight multiply, rotary angles in float32,
softmax in float32. Weights keep the Hugging Face `(out_features, in_features)` layout and are
applied as `x @ W.T`, so loading a checkpoint is a plain copy.
Per-layer weights are stacked on a leading `layers` axis and the layers run under `lax.scan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from qwen_jax.config import QwenConfig
from qwen_jax.rope import rope_cos_sin, rotate

# Masked attention scores: a large finite value (not -inf) so a query with no visible key gives
# a uniform average instead of NaN (e.g. an inactive batch row with a negative position).
_MASKED = -1e30


@jax.tree_util.register_dataclass
@dataclass
class LayerParams:
    """One decoder layer's weights, each stacked on a leading `layers` axis."""

    input_norm: jax.Array  # [L, D]          input_layernorm.weight
    q_proj: jax.Array  # [L, H*hd, D]        self_attn.q_proj.weight
    q_bias: jax.Array  # [L, H*hd]           self_attn.q_proj.bias
    k_proj: jax.Array  # [L, KV*hd, D]
    k_bias: jax.Array  # [L, KV*hd]
    v_proj: jax.Array  # [L, KV*hd, D]
    v_bias: jax.Array  # [L, KV*hd]
    o_proj: jax.Array  # [L, D, H*hd]        (no bias)
    post_norm: jax.Array  # [L, D]           post_attention_layernorm.weight
    gate_proj: jax.Array  # [L, F, D]
    up_proj: jax.Array  # [L, F, D]
    down_proj: jax.Array  # [L, D, F]


@jax.tree_util.register_dataclass
@dataclass
class Params:
    embed: jax.Array  # [V, D]               model.embed_tokens.weight
    layers: LayerParams
    final_norm: jax.Array  # [D]             model.norm.weight
    lm_head: jax.Array | None  # [V, D], None when tied to `embed`


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """Static-shape key/value cache, each [layers, batch, max_len, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array


def layer_shapes(cfg: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the per-layer weights (without the leading layers axis)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {
        "input_norm": (d,), "q_proj": (q, d), "q_bias": (q,), "k_proj": (kv, d),
        "k_bias": (kv,), "v_proj": (kv, d), "v_bias": (kv,), "o_proj": (d, q),
        "post_norm": (d,), "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
    }


def param_count(cfg: QwenConfig) -> int:
    """Number of parameters (the lm_head counted only when it is not tied)."""
    per_layer = sum(math.prod(shape) for shape in layer_shapes(cfg).values())
    vd = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else vd
    return cfg.num_hidden_layers * per_layer + vd + head + cfg.hidden_size


@partial(jax.jit, static_argnums=(0, 2))
def init_params(cfg: QwenConfig, key: jax.Array, dtype: jnp.dtype = jnp.bfloat16) -> Params:
    """Random weights (normal, std 0.02 as transformers' initializer_range), norms at one.

    Unlike transformers, biases are random too (std 0.02) so tests exercise the bias path.
    """
    n = cfg.num_hidden_layers
    keys = iter(jax.random.split(key, 16))

    def normal(shape: tuple[int, ...]) -> jax.Array:
        return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    layers = {}
    for name, shape in layer_shapes(cfg).items():
        if name.endswith("norm"):
            layers[name] = jnp.ones((n, *shape), dtype)
        else:
            layers[name] = normal((n, *shape))
    vd = (cfg.vocab_size, cfg.hidden_size)
    return Params(
        embed=normal(vd),
        layers=LayerParams(**layers),
        final_norm=jnp.ones((cfg.hidden_size,), dtype),
        lm_head=None if cfg.tie_word_embeddings else normal(vd),
    )


def init_cache(
    cfg: QwenConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16
) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def _linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w.T with w in (out, in) layout."""
    return jnp.einsum("...d,fd->...f", x, w)


def _mlp(x: jax.Array, p: LayerParams) -> jax.Array:
    gate = _linear(x, p.gate_proj)
    # silu in float32, like torch's CPU kernel for bf16 inputs.
    act = jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype)
    return _linear(act * _linear(x, p.up_proj), p.down_proj)


def _attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: QwenConfig
) -> jax.Array:
    """q[B,T,H,hd], k/v[B,S,KV,hd], mask[B,T,S] (True = visible) -> [B,T,H*hd]."""
    b, t, _, hd = q.shape
    # Query head h uses kv head h // groups: heads are grouped contiguously per kv head.
    q = q.reshape(b, t, cfg.num_key_value_heads, cfg.num_groups, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (hd**-0.5)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, -1)


def _qkv(x: jax.Array, p: LayerParams, cos: jax.Array, sin: jax.Array, cfg: QwenConfig):
    b, t, _ = x.shape
    hd = cfg.head_dim
    q = (_linear(x, p.q_proj) + p.q_bias).reshape(b, t, cfg.num_attention_heads, hd)
    k = (_linear(x, p.k_proj) + p.k_bias).reshape(b, t, cfg.num_key_value_heads, hd)
    v = (_linear(x, p.v_proj) + p.v_bias).reshape(b, t, cfg.num_key_value_heads, hd)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def forward(
    params: Params,
    cfg: QwenConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache | None = None,
    *,
    kv_len: int | None = None,
    logits_at: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Logits (float32) of tokens[B, T] at positions[B, T], and the updated cache.

    With a cache, the key/value of token (b, t) is written at cache index positions[b, t] of row
    b (positions outside [0, max_len) are dropped) and query (b, t) attends to cache indices
    j <= positions[b, t], j < kv_len. Without a cache: causal attention over the T tokens.
    `logits_at[B]` returns logits only at those token indices ([B, V] instead of [B, T, V]).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    x = params.embed[tokens]
    dtype = x.dtype
    cos, sin = rope_cos_sin(positions, cfg, dtype)
    b, t = tokens.shape
    eps = cfg.rms_norm_eps

    if cache is None:
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = jnp.broadcast_to(causal, (b, t, t))

        def layer(x, p):
            q, k, v = _qkv(rms_norm(x, p.input_norm, eps), p, cos, sin, cfg)
            x = x + _linear(_attend(q, k, v, mask, cfg), p.o_proj)
            x = x + _mlp(rms_norm(x, p.post_norm, eps), p)
            return x, None

        x, _ = jax.lax.scan(layer, x, params.layers)
        new_cache = None
    else:
        max_len = cache.k.shape[2]
        kv_len = max_len if kv_len is None else kv_len
        if not 0 < kv_len <= max_len:
            raise ValueError(f"kv_len {kv_len} must be in [1, {max_len}]")
        # Negative positions would wrap around in a scatter: send them out of range instead.
        write_pos = jnp.where(positions < 0, max_len, positions)
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
        mask = jnp.arange(kv_len)[None, None, :] <= positions[:, :, None]  # [B, T, kv_len]

        def layer(carry, xs):
            x, ck, cv = carry
            p, i = xs
            q, k, v = _qkv(rms_norm(x, p.input_norm, eps), p, cos, sin, cfg)
            # Scatter into the full (carried, donated) cache so XLA updates it in place.
            ck = ck.at[i, rows, write_pos].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[i, rows, write_pos].set(v.astype(cv.dtype), mode="drop")
            k_all = jax.lax.dynamic_index_in_dim(ck, i, 0, keepdims=False)[:, :kv_len]
            v_all = jax.lax.dynamic_index_in_dim(cv, i, 0, keepdims=False)[:, :kv_len]
            x = x + _linear(_attend(q, k_all.astype(dtype), v_all.astype(dtype), mask, cfg),
                            p.o_proj)
            x = x + _mlp(rms_norm(x, p.post_norm, eps), p)
            return (x, ck, cv), None

        layer_ids = jnp.arange(cfg.num_hidden_layers)
        (x, ck, cv), _ = jax.lax.scan(layer, (x, cache.k, cache.v), (params.layers, layer_ids))
        new_cache = KVCache(k=ck, v=cv)

    if logits_at is not None:
        x = x[jnp.arange(b), jnp.asarray(logits_at, jnp.int32)]  # [B, D]
    x = rms_norm(x, params.final_norm, eps)
    head = params.embed if params.lm_head is None else params.lm_head
    return _linear(x, head).astype(jnp.float32), new_cache
