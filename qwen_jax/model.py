"""The Qwen2 decoder as pure functions over a params pytree.

Numerics follow transformers' `modeling_qwen2.py`: RMSNorm statistics in float32 with the normalised
value cast back to the activation dtype before the weight multiply, rotary angles in float32,
softmax in float32. Weights keep the Hugging Face `(out_features, in_features)` layout and are
applied as `x @ W.T` by `linear` (linear.py, which also takes int8 and column-blocked weights and
picks XLA's CPU matmul path), so loading a checkpoint is a plain copy (on an AVX2-only CPU, a bf16
weight wider than 3584 columns is stored as column blocks instead: layout.py, cpu_matmul.py).

The layers are a Python list and `forward` loops over them, like `nn.ModuleList`: XLA sees each
layer's weights as separate arrays. (A `lax.scan` over stacked weights compiles faster on paper,
but on the CPU backend it made decode 2-15x slower: XLA hoisted a float32 copy of every stacked
weight out of the loop. Measured figures: benchmarks/README.md.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from qwen_jax.config import QwenConfig
from qwen_jax.linear import linear
from qwen_jax.quantize import Int8Weight
from qwen_jax.rope import rope_cos_sin, rotate

# Masked attention scores: a large finite value (not -inf) so a query with no visible key gives
# a uniform average instead of NaN (e.g. an inactive batch row with a negative position).
_MASKED = -1e30


@jax.tree_util.register_dataclass
@dataclass
class LayerParams:
    """One decoder layer's weights (`model.layers.{i}.*` in Hugging Face names). The seven
    projection matrices may be `Int8Weight`s (quantize.py)."""

    input_norm: jax.Array  # [D]          input_layernorm.weight
    q_proj: jax.Array  # [H*hd, D]        self_attn.q_proj.weight
    q_bias: jax.Array  # [H*hd]           self_attn.q_proj.bias
    k_proj: jax.Array  # [KV*hd, D]
    k_bias: jax.Array  # [KV*hd]
    v_proj: jax.Array  # [KV*hd, D]
    v_bias: jax.Array  # [KV*hd]
    o_proj: jax.Array  # [D, H*hd]        (no bias)
    post_norm: jax.Array  # [D]           post_attention_layernorm.weight
    gate_proj: jax.Array  # [F, D]
    up_proj: jax.Array  # [F, D]
    down_proj: jax.Array  # [D, F]


@jax.tree_util.register_dataclass
@dataclass
class Params:
    embed: jax.Array | Int8Weight  # [V, D]  model.embed_tokens.weight
    layers: list[LayerParams]
    final_norm: jax.Array  # [D]             model.norm.weight (its dtype is the activations')
    lm_head: jax.Array | Int8Weight | None  # [V, D], None when tied to `embed`


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """Static-shape key/value cache: one [batch, max_len, kv_heads, head_dim] array per layer.

    On the CPU a bfloat16 cache holds its values' bit patterns as uint16 (`cache_storage_dtype`):
    XLA's CPU backend converts a bf16 array to float32 and back around every update, copying the
    whole cache at each layer of each step; an integer array is updated in place."""

    k: list[jax.Array]
    v: list[jax.Array]


def layer_shapes(cfg: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's weights."""
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


def init_params(cfg: QwenConfig, key: jax.Array, dtype: jnp.dtype = jnp.bfloat16) -> Params:
    """Random weights (normal, std 0.02 as transformers' initializer_range), norms at one.

    Unlike transformers, biases are random too (std 0.02) so tests exercise the bias path.
    One compiled program per layer shape, reused for every layer (compiling the whole model's
    initialisation as one program took minutes at 7B on a GPU).
    """
    k_embed, k_head, k_layers = jax.random.split(key, 3)
    vd = (cfg.vocab_size, cfg.hidden_size)
    return Params(
        embed=_normal(k_embed, vd, dtype),
        layers=[_init_layer(cfg, jax.random.fold_in(k_layers, i), dtype)
                for i in range(cfg.num_hidden_layers)],
        final_norm=jnp.ones((cfg.hidden_size,), dtype),
        lm_head=None if cfg.tie_word_embeddings else _normal(k_head, vd, dtype),
    )


@partial(jax.jit, static_argnums=(1, 2))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@partial(jax.jit, static_argnums=(0, 2))
def _init_layer(cfg: QwenConfig, key: jax.Array, dtype: jnp.dtype) -> LayerParams:
    shapes = layer_shapes(cfg)
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    return LayerParams(**{
        name: jnp.ones(shape, dtype) if name.endswith("norm") else _normal(keys[name], shape, dtype)
        for name, shape in shapes.items()
    })


def init_cache(
    cfg: QwenConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.bfloat16
) -> KVCache:
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    n, storage = cfg.num_hidden_layers, cache_storage_dtype(dtype)
    return KVCache(k=[jnp.zeros(shape, storage) for _ in range(n)],
                   v=[jnp.zeros(shape, storage) for _ in range(n)])


def cache_storage_dtype(dtype: jnp.dtype, backend: str | None = None) -> jnp.dtype:
    """The array dtype of a KV cache of `dtype`: uint16 bit patterns for bfloat16 on the CPU."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and (backend or jax.default_backend()) == "cpu":
        return jnp.dtype(jnp.uint16)
    return dtype


def _to_cache(x: jax.Array, storage: jnp.dtype) -> jax.Array:
    if storage == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(storage)


def _from_cache(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    if x.dtype == jnp.uint16:
        x = jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    return x.astype(dtype)


def _halves(x: jax.Array, combine, pad: float, axis: int) -> jax.Array:
    """Reduce `axis` (kept, as size 1) by combining its halves elementwise, repeatedly
    (x[:n/2] with x[n/2:]), after padding it to a power of two with `pad`."""
    axis = axis % x.ndim
    n = x.shape[axis]
    width = 1 << (n - 1).bit_length()  # the next power of two
    if width > n:
        x = jnp.pad(x, [(0, width - n if a == axis else 0) for a in range(x.ndim)],
                    constant_values=pad)
    while width > 1:
        width //= 2
        x = combine(jax.lax.slice_in_dim(x, 0, width, axis=axis),
                    jax.lax.slice_in_dim(x, width, 2 * width, axis=axis))
    return x


def fixed_order_sum(x: jax.Array, axis: int = -1) -> jax.Array:
    """Sum over `axis` (kept, as size 1) in an order fixed by this code, not by the compiler.

    A row's sum is the same whether it is alone or one of many rows: XLA compiles `jnp.sum` for
    the whole shape, and on the CPU the order in which it adds a row's elements can change with
    the number of rows, so one request's logits differed in their last bits between batches of
    different sizes (a seeded reply diverged beside 2 others: ARCHITECTURE.md, Sampling). Here the
    halves are added elementwise, repeatedly: an elementwise add rounds the same wherever it
    runs. Zeros appended to a row (the padding up to a power of two, keys past a row's position
    in a longer cache bucket) change nothing: x + 0 == x."""
    return _halves(x, jnp.add, 0.0, axis)


def fixed_order_max(x: jax.Array, axis: int = -1) -> jax.Array:
    """Maximum over `axis` (kept) without a reduction op. A maximum is exact in any order; this
    is for what sits next to it: XLA's CPU backend hands a reduction and the elementwise ops
    fused with it to YNNPACK for some batch shapes and not others, and YNNPACK's exp rounds ~2%
    of values differently than XLA's (the softmax's exp of a 2-row decode step against a 1-row
    one)."""
    return _halves(x, jnp.maximum, -jnp.inf, axis)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean_square = fixed_order_sum(x32 * x32) / x.shape[-1]
    normed = x32 * jax.lax.rsqrt(mean_square + eps)
    return weight * normed.astype(x.dtype)


def _embed(table: jax.Array | Int8Weight, tokens: jax.Array, dim: int, dtype: jnp.dtype
           ) -> jax.Array:
    if isinstance(table, Int8Weight):
        q = jnp.moveaxis(table.q[:, tokens], 0, -2)  # [..., blocks, block_in]
        q = q.reshape(*tokens.shape, -1)[..., :dim]
        return (q.astype(jnp.float32) * table.scale[tokens][..., None]).astype(dtype)
    return table[tokens]


def _mlp(x: jax.Array, p: LayerParams) -> jax.Array:
    gate = linear(x, p.gate_proj)
    # silu in float32, like torch's CPU kernel for bf16 inputs.
    act = jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype)
    return linear(act * linear(x, p.up_proj), p.down_proj)


def _attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cfg: QwenConfig
) -> jax.Array:
    """q[B,T,H,hd], k/v[B,S,KV,hd], mask[B,T,S] (True = visible) -> [B,T,H*hd]."""
    b, t, _, hd = q.shape
    # Head-major operands, so that the scores, the mask and the softmax all live in the
    # [B, KV, groups, T, S] layout that the products produce. (With token-major operands XLA's
    # CPU backend transposed the float32 scores twice per layer: 24 layers of a 512-token
    # prefill took 429 ms instead of 119.) Query head h uses kv head h // groups: heads are
    # grouped contiguously per kv head.
    q = q.reshape(b, t, cfg.num_key_value_heads, cfg.num_groups, hd).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, hd]
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (hd**-0.5)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    if t == 1:
        # Decode, where rows of other requests share the batch: a batch-invariant softmax.
        exps = jnp.exp(scores - fixed_order_max(scores))
        probs = (exps / fixed_order_sum(exps)).astype(v.dtype)
    else:
        # A prompt (prefilled alone): XLA's softmax keeps the scores in place, where the sum's
        # tree of slices would write more score-sized arrays.
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # Accumulated in float32 and rounded once, as torch's bf16 matmul does.
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, -1)


def _attend_in_chunks(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, rows: jax.Array,
                      positions: jax.Array, cfg: QwenConfig, chunk: int) -> jax.Array:
    """q[B,T,H,hd] at positions[B,T] attending to cache rows `rows` up to each position ->
    [B,T,H*hd], reading the cache `chunk` keys at a time, as many chunks as the largest position
    needs: a loop whose length is data, so one compiled program serves every cache length
    (instead of one per length bucket, each holding 30-60 MiB at the 0.5B shape).

    Online softmax: each chunk rescales the running maximum, denominator and weighted sum of
    values. A chunk past a row's position adds exactly nothing to that row (its scores are
    masked, exp(masked - max) == 0, the rescale is exp(0) == 1), so a row's result does not
    depend on the other rows' positions either. A row at position -1 (padding) sees every key
    masked and averages the values read instead of producing NaN."""
    b, t, _, hd = q.shape
    dtype, max_len = q.dtype, cache_k.shape[1]
    chunk = min(chunk, max_len)
    kv, groups = cfg.num_key_value_heads, cfg.num_groups
    q = q.reshape(b, t, kv, groups, hd).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, hd]

    def read(cache: jax.Array, start: jax.Array) -> jax.Array:  # -> [B, KV, chunk, hd]
        part = jax.lax.dynamic_slice_in_dim(cache, start, chunk, axis=1)[rows]
        return _from_cache(part, dtype).transpose(0, 2, 1, 3)

    def step(j, carry):
        top, total, acc = carry
        # The last chunk may start earlier (a cache length that is no multiple of the chunk):
        # keys before j * chunk were counted by chunk j - 1.
        start = jnp.minimum(j * chunk, max_len - chunk)
        keys = start + jnp.arange(chunk)
        visible = (keys >= j * chunk)[None, None] & (keys[None, None] <= positions[:, :, None])
        scores = jnp.einsum("bkgtd,bksd->bkgts", q, read(cache_k, start),
                            preferred_element_type=jnp.float32) * (hd**-0.5)
        scores = jnp.where(visible[:, None, None], scores, _MASKED)
        new_top = jnp.maximum(top, fixed_order_max(scores))
        exps = jnp.exp(scores - new_top)
        scale = jnp.exp(top - new_top)
        total = total * scale + fixed_order_sum(exps)
        acc = acc * scale + jnp.einsum("bkgts,bksd->bkgtd", exps.astype(dtype),
                                       read(cache_v, start), preferred_element_type=jnp.float32)
        return new_top, total, acc

    chunks = jnp.maximum(jnp.max(positions), 0) // chunk + 1
    init = (jnp.full((b, kv, groups, t, 1), _MASKED, jnp.float32),
            jnp.zeros((b, kv, groups, t, 1), jnp.float32),
            jnp.zeros((b, kv, groups, t, hd), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, chunks, step, init)
    # Divided as [B, T, H*hd] arrays, so that o_proj's input is written out in that shape: XLA
    # fuses a reshape of [B, KV, G, T, hd] into the product, which LLVM then vectorised with
    # two accumulators instead of four (another order of the sum) for one row but not for a
    # row sliced out of a batch: a request rounded differently alone and beside others.
    acc = acc.transpose(0, 3, 1, 2, 4).reshape(b, t, -1)
    total = jnp.repeat(total.transpose(0, 3, 1, 2, 4).reshape(b, t, -1), hd, axis=-1)
    return (acc / total).astype(dtype)


def _qkv(x: jax.Array, p: LayerParams, cos: jax.Array, sin: jax.Array, cfg: QwenConfig):
    b, t, _ = x.shape
    hd = cfg.head_dim
    q = (linear(x, p.q_proj) + p.q_bias).reshape(b, t, cfg.num_attention_heads, hd)
    k = (linear(x, p.k_proj) + p.k_bias).reshape(b, t, cfg.num_key_value_heads, hd)
    v = (linear(x, p.v_proj) + p.v_bias).reshape(b, t, cfg.num_key_value_heads, hd)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def _cache_write(cache: jax.Array, rows: jax.Array, positions: jax.Array, new: jax.Array
                 ) -> jax.Array:
    """cache[rows[b], positions[b, t]] = new[b, t]; out-of-range positions are dropped."""
    return cache.at[rows[:, None], positions].set(new.astype(cache.dtype), mode="drop")


def forward(
    params: Params,
    cfg: QwenConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache | None = None,
    *,
    kv_len: int | None = None,
    kv_chunk: int | None = None,
    logits_at: jax.Array | None = None,
    cache_rows: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Logits (float32) of tokens[B, T] at positions[B, T], and the updated cache.

    With a cache, token row b uses cache row `cache_rows[b]` (default: b; rows must be distinct):
    the key/value of token (b, t) is written at cache index positions[b, t] of that row
    (positions outside [0, max_len) are dropped) and query (b, t) attends to cache indices
    j <= positions[b, t], j < kv_len. With `kv_chunk` instead of kv_len, it reads the cache in
    chunks of that many keys, as many as max(positions) needs (one program for every cache
    length). Without a cache: causal attention over the T tokens.
    `logits_at[B]` returns logits only at those token indices ([B, V] instead of [B, T, V]).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    dtype = params.final_norm.dtype  # the activation dtype (the embedding may be int8)
    x = _embed(params.embed, tokens, cfg.hidden_size, dtype)
    cos, sin = rope_cos_sin(positions, cfg, dtype)
    b, t = tokens.shape
    eps = cfg.rms_norm_eps

    if cache is None:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        new_cache = None
    else:
        max_len = cache.k[0].shape[1]
        if kv_chunk is not None and (kv_len is not None or kv_chunk < 1):
            raise ValueError("kv_chunk >= 1, and not with kv_len")
        kv_len = max_len if kv_len is None else kv_len
        if not 0 < kv_len <= max_len:
            raise ValueError(f"kv_len {kv_len} must be in [1, {max_len}]")
        # Negative positions would wrap around in a scatter: send them out of range instead.
        write_pos = jnp.where(positions < 0, max_len, positions)
        rows = jnp.arange(b) if cache_rows is None else jnp.asarray(cache_rows, jnp.int32)
        read_rows = slice(None) if cache_rows is None else rows  # a slice when rows are 0..B-1
        mask = jnp.arange(kv_len)[None, None, :] <= positions[:, :, None]  # [B, T, kv_len]
        new_k, new_v = [], []

    for i, p in enumerate(params.layers):
        q, k, v = _qkv(rms_norm(x, p.input_norm, eps), p, cos, sin, cfg)
        if cache is not None:
            # Write this step's keys/values into the (donated) cache in place, then attend to
            # the first kv_len entries of the rows in use.
            ck = _cache_write(cache.k[i], rows, write_pos, _to_cache(k, cache.k[i].dtype))
            cv = _cache_write(cache.v[i], rows, write_pos, _to_cache(v, cache.v[i].dtype))
            new_k.append(ck)
            new_v.append(cv)
            if kv_chunk is not None:
                attended = _attend_in_chunks(q, ck, cv, rows, positions, cfg, kv_chunk)
            else:
                k = _from_cache(ck[read_rows, :kv_len], dtype)
                v = _from_cache(cv[read_rows, :kv_len], dtype)
                attended = _attend(q, k, v, mask, cfg)
        else:
            attended = _attend(q, k, v, mask, cfg)
        x = x + linear(attended, p.o_proj)
        x = x + _mlp(rms_norm(x, p.post_norm, eps), p)

    if cache is not None:
        new_cache = KVCache(k=new_k, v=new_v)
    if logits_at is not None:
        x = x[jnp.arange(b), jnp.asarray(logits_at, jnp.int32)]  # [B, D]
    x = rms_norm(x, params.final_norm, eps)
    head = params.embed if params.lm_head is None else params.lm_head
    return linear(x, head).astype(jnp.float32), new_cache
