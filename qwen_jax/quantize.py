"""Weight-only int8 quantization (per output channel, symmetric), as gpt-fast does it.

Decode reads every weight once per token, so its speed is the bytes it reads: int8 weights halve
them against bfloat16. Each row of a weight `W[out, in]` keeps a float32 scale, and
`W ~= q * scale[:, None]` with `q = round(W / scale)` in [-127, 127], `scale = max|W[row]| / 127`.
Activations, norms, biases and the KV cache keep their dtype; `linear.py` multiplies by the scale
after the matrix product, where it costs one multiply per output instead of one per weight.

The tied embedding is quantized too: its row scales serve both the token lookup and the lm_head.

How the CPU multiplies by them depends on its plan (cpu_matmul.py): the AVX2 plan reads int8
through XLA's matrix-vector emitter; the AVX512-BF16 plan writes the activations as int8 levels
and runs an exact int8 x int8 product (linear.py, `_int8_dot_int8`).

Layout: `q[blocks, out, block_in]`, the input dimension cut into zero-padded blocks of at most
`block` columns. Under the AVX2 plan the blocks are 3584 columns wide, for the matrix-vector
emitter (layout.py: a contiguous block per product ran the 0.5B shape's int8 down_proj in 6.2 ms
per token instead of 11.3 ms for column slices of one matrix), and on accelerators (as
measured there); under the AVX512-BF16 plan one block holds the whole row (YNNPACK copied each
block of the stacked array before its product: 5.3 ms of a 50 ms step).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from qwen_jax.layout import LINEAR_LAYER_WEIGHTS, column_blocks, int8_block_width, plain

if TYPE_CHECKING:  # model.py and linear.py import this module for Int8Weight
    from qwen_jax.model import Params

@jax.tree_util.register_dataclass
@dataclass
class Int8Weight:
    """A linear weight `[out, in]` as int8 values in input-column blocks and one float32 scale
    per output row."""

    q: jax.Array  # int8 [blocks, out, block_in]; columns past `in` are zero
    scale: jax.Array  # float32 [out]


def quantize_option(value: str | None) -> str | None:
    """The `--quantize` command-line value as `load_checkpoint` takes it ("none" -> None)."""
    return None if value in (None, "none") else value


def quantize_int8(w: jax.Array, block: int | None = None) -> Int8Weight:
    """Symmetric per-row int8: |dequantize(quantize_int8(w)) - w| <= scale / 2 elementwise.
    `block`: the column-block width (default: layout.int8_block_width)."""
    return _quantize_int8(w, block or int8_block_width(w.shape[1]))


@partial(jax.jit, static_argnames="block")
def _quantize_int8(w: jax.Array, block: int) -> Int8Weight:
    out, n_in = w.shape
    blocks, size = column_blocks(n_in, block)
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero row stays zero
    q = jnp.clip(jnp.round(w32 / safe[:, None]), -127, 127).astype(jnp.int8)
    q = jnp.pad(q, ((0, 0), (0, blocks * size - n_in)))
    return Int8Weight(q=q.reshape(out, blocks, size).transpose(1, 0, 2), scale=scale)


def dequantize(w: Int8Weight, n_in: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The `[out, n_in]` matrix `w` stands for."""
    blocks, out, size = w.q.shape
    q = w.q.transpose(1, 0, 2).reshape(out, blocks * size)[:, :n_in]
    return (q.astype(jnp.float32) * w.scale[:, None]).astype(dtype)


def quantize_params(params: Params) -> Params:
    """Params with every linear weight (and the embedding / lm_head) as an Int8Weight.

    The original params stay alive while this runs (both models in memory at the peak);
    `load_checkpoint(..., quantize="int8")` quantizes each tensor as it loads instead."""
    layers = [
        replace(layer, **{name: quantize_int8(plain(getattr(layer, name)))
                          for name in LINEAR_LAYER_WEIGHTS})
        for layer in params.layers
    ]
    return replace(
        params,
        embed=quantize_int8(params.embed),
        layers=layers,
        lm_head=None if params.lm_head is None else quantize_int8(plain(params.lm_head)),
    )


def is_quantized(params: Params) -> bool:
    return isinstance(params.embed, Int8Weight)

