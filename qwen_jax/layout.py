"""Weight layout for XLA's CPU backend: wide matrices as contiguous column blocks.

XLA's CPU matrix-vector emitter reads a weight row at full speed only while it has at most
`CPU_MATVEC_MAX_IN` = 3584 columns, so linear.py multiplies a wider weight (the MLP's down_proj:
4864 columns at the Qwen2.5-0.5B shape, 18944 at 7B) one block of columns at a time. Column
slices of one matrix are strided, and XLA reads them slower (one row) or copies each slice before
its product (2-4 rows); a weight stored as contiguous blocks `[out, width]` avoids both: the
0.5B bf16 model step went from 62 to 51 ms at 1 row and from 198 to 168 ms at 4 (medians of 35
calls alternating between the two layouts on an AVX2 machine; benchmarks/README.md).
The int8 weights of quantize.py use the same blocks, except under a CPU plan that stores none
(`int8_block_width`).

Only bfloat16 weights on a CPU whose plan multiplies one row by the emitter are stored this way
(`block_wide_weights`, applied by the loaders; the AVX2 plan of cpu_matmul.py): XLA reads
float32 rows of any width at full speed (there the blocks measured slower), YNNPACK reads a
plain weight faster than blocks (the AVX512-BF16 plan), and other backends need no blocks.
Saving a checkpoint writes the plain layout back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from qwen_jax.cpu_matmul import cpu_plan

if TYPE_CHECKING:  # model.py imports this module (through linear.py)
    from qwen_jax.model import Params

# The widest row XLA's CPU matrix-vector emitter reads directly (linear.py uses it).
CPU_MATVEC_MAX_IN = 3584

# The projection matrices of a layer: everything `x @ W.T` multiplies by.
LINEAR_LAYER_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj")


def column_blocks(n_in: int, block: int = CPU_MATVEC_MAX_IN) -> tuple[int, int]:
    """(count, width): the fewest equal-width blocks of at most `block` columns covering n_in."""
    count = -(-n_in // block)
    return count, -(-n_in // count)


@jax.tree_util.register_dataclass
@dataclass
class BlockedWeight:
    """A linear weight `[out, n_in]` stored as its input-column blocks. Separate arrays, not one
    stacked array: XLA copies a slice of a stacked array that several products read."""

    blocks: list[jax.Array]  # [out, width] each; columns past n_in are zero
    n_in: int = field(metadata=dict(static=True))


@partial(jax.jit, static_argnames="block")
def to_blocks(w: jax.Array, block: int = CPU_MATVEC_MAX_IN) -> BlockedWeight:
    n_in = w.shape[1]
    count, width = column_blocks(n_in, block)
    w = jnp.pad(w, ((0, 0), (0, count * width - n_in)))
    return BlockedWeight(blocks=[w[:, i * width:(i + 1) * width] for i in range(count)],
                         n_in=n_in)


@jax.jit
def from_blocks(w: BlockedWeight) -> jax.Array:
    """The `[out, n_in]` matrix back in the plain (Hugging Face) layout."""
    return jnp.concatenate(w.blocks, axis=1)[:, :w.n_in]


def wants_blocks(w: jax.Array, backend: str | None = None) -> bool:
    """Whether a linear weight is stored as column blocks: bf16, wider than the CPU's limit,
    on the CPU backend with a plan that stores blocks (cpu_matmul.py)."""
    return (isinstance(w, jax.Array) and (backend or jax.default_backend()) == "cpu"
            and cpu_plan().column_blocks
            and w.dtype == jnp.bfloat16 and w.ndim == 2 and w.shape[1] > CPU_MATVEC_MAX_IN)


def int8_block_width(n_in: int, backend: str | None = None) -> int:
    """The column-block width of an int8 weight with n_in columns (quantize.py): one block on
    the CPU backend when its plan stores no blocks (YNNPACK would copy each block of the stacked
    array before its product); else blocks of at most CPU_MATVEC_MAX_IN, for the CPU's
    matrix-vector emitter and on accelerators (the layout the GPU figures were measured with)."""
    whole = (backend or jax.default_backend()) == "cpu" and not cpu_plan().column_blocks
    return n_in if whole else CPU_MATVEC_MAX_IN


def maybe_blocks(w: jax.Array) -> jax.Array | BlockedWeight:
    """`w` as a BlockedWeight if it `wants_blocks`, else `w` itself."""
    return to_blocks(w) if wants_blocks(w) else w


def plain(w: jax.Array | BlockedWeight) -> jax.Array:
    """`w` in the plain layout (other weights, such as int8 ones, are returned as they are)."""
    return from_blocks(w) if isinstance(w, BlockedWeight) else w


def block_wide_weights(params: Params) -> Params:
    """Params with every linear weight that `wants_blocks` as a BlockedWeight (the embedding
    table stays plain: token lookups read its rows). Other backends: params unchanged."""
    layers = [replace(layer, **{name: maybe_blocks(getattr(layer, name))
                                for name in LINEAR_LAYER_WEIGHTS}) for layer in params.layers]
    head = params.lm_head
    return replace(params, layers=layers, lm_head=None if head is None else maybe_blocks(head))


def plain_layout(params: Params) -> Params:
    """The inverse of block_wide_weights: every weight in the Hugging Face layout."""
    layers = [replace(layer, **{name: plain(getattr(layer, name))
                                for name in LINEAR_LAYER_WEIGHTS}) for layer in params.layers]
    head = params.lm_head
    return replace(params, layers=layers, lm_head=None if head is None else plain(head))
