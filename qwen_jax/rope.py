"""Rotary position embeddings: split-halves (`rotate_half`) convention, default and YaRN scaling.

Follows transformers (`Qwen2RotaryEmbedding`, `_compute_yarn_parameters`): frequencies and angles in
float32, cos/sin multiplied by the YaRN attention factor and then cast to the activation dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import QwenConfig


def rope_frequencies(cfg: QwenConfig) -> tuple[np.ndarray, float]:
    """(inv_freq float32[head_dim // 2], attention scaling applied to cos/sin)."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq, 1.0

    factor = s.factor

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = get_mscale(factor, s.mscale) / get_mscale(factor, s.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength makes `num_rotations` turns over the original context.
        orig = s.original_max_position_embeddings
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero, as transformers does

    ramp = (np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    extrapolation = (np.float32(1) - np.clip(ramp, 0, 1)).astype(np.float32)
    inv_interp = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv_freq = inv_interp * (np.float32(1) - extrapolation) + inv_freq * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(
    positions: jax.Array, cfg: QwenConfig, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + (head_dim,), computed in float32, cast to `dtype`."""
    inv_freq, scale = rope_frequencies(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([angles, angles], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x[..., T, heads, head_dim] by cos/sin[..., T, head_dim] (split-halves convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    return x * cos + rotated * sin


def apply_rope(x: jax.Array, positions: jax.Array, cfg: QwenConfig) -> jax.Array:
    """Rotary embedding of x[B, T, heads, head_dim] at integer positions[B, T]."""
    cos, sin = rope_cos_sin(positions, cfg, x.dtype)
    return rotate(x, cos, sin)
