"""`x @ W.T` for every kind of weight the model holds, on every backend.

Off the CPU a plain weight is one einsum (an int8 one times one row, a multiply-reduce). The
rest is for XLA's CPU backend (jax 0.10), whose three ways to multiply by a bf16 weight differ
in speed by CPU and row count (cpu_matmul.py picks one per row count; benchmarks/README.md has
the measurements): one matrix-vector product per row, YNNPACK's bf16 matmul, or a float32
matmul of a converted copy. Weights may also be stored as column blocks (layout.py) or as int8
with per-row scales (quantize.py), which under the AVX512-BF16 plan are multiplied by the
activations written as int8 levels: an exact integer product. Every path accumulates in float32
(or int32) and rounds once, as torch's bf16 linear does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qwen_jax.cpu_matmul import cpu_plan
from qwen_jax.layout import BlockedWeight, column_blocks
from qwen_jax.quantize import Int8Weight


def linear(x: jax.Array, w: jax.Array | BlockedWeight | Int8Weight) -> jax.Array:
    """x @ w.T with w in (out, in) layout (int8 weights: times their row scales)."""
    rows = math.prod(x.shape[:-1])
    cpu = jax.default_backend() == "cpu"
    if isinstance(w, Int8Weight):
        return _int8_linear(x, w, cpu)
    if isinstance(w, BlockedWeight):
        return _blocked_linear(x, w, cpu)
    if x.dtype == jnp.bfloat16 and cpu:
        plan = cpu_plan()
        if rows <= plan.matvec_max_rows:
            # Column slices when a row is too wide (params not laid out by layout.py): slower.
            n_in = w.shape[1]
            _, size = column_blocks(n_in)
            blocks = [w[:, c:c + size] for c in range(0, n_in, size)]
            y = _cpu_matvecs(x.reshape(rows, n_in), blocks, lambda wb: wb)
        elif plan.dot_max_rows is None or rows <= plan.dot_max_rows:
            y = _cpu_bf16_dot(x.reshape(rows, -1), w, plan.dot_min_rows)
        else:  # a bf16 result: XLA converts the weight and runs a float32 matmul
            return jnp.einsum("...d,fd->...f", x, w)
        return y.reshape(*x.shape[:-1], -1).astype(x.dtype)
    return jnp.einsum("...d,fd->...f", x, w)


def _cpu_bf16_dot(x: jax.Array, w: jax.Array, min_rows: int) -> jax.Array:
    """x[R, in] @ w.T in float32 (on the CPU, a float32 result sends a bf16 dot to YNNPACK), x
    zero-padded to at least `min_rows` rows (YNNPACK reads the weight slower for fewer)."""
    rows = x.shape[0]
    if rows < min_rows:
        x = jnp.pad(x, ((0, min_rows - rows), (0, 0)))
    return jnp.einsum("rd,fd->rf", x, w, preferred_element_type=jnp.float32)[:rows]


def _blocked_linear(x: jax.Array, w: BlockedWeight, cpu: bool) -> jax.Array:
    """x @ w.T for a weight stored as column blocks (layout.py): one product per block, the
    partial sums added in float32, by the same CPU paths as a plain bf16 weight."""
    count, width = len(w.blocks), w.blocks[0].shape[1]
    lead, n_in, dtype = x.shape[:-1], x.shape[-1], x.dtype
    x = x.reshape(-1, n_in)
    rows = x.shape[0]
    if count * width > n_in:  # the last block is zero-padded
        x = jnp.pad(x, ((0, 0), (0, count * width - n_in)))
    blocks, plan = w.blocks, cpu_plan()
    if cpu and rows <= plan.matvec_max_rows:
        y = _cpu_matvecs(x, blocks, lambda wb: wb)
    else:
        if cpu and plan.dot_max_rows is not None and rows > plan.dot_max_rows:
            # Long prefills: XLA's float32 matmul.
            x, blocks = x.astype(jnp.float32), [wb.astype(jnp.float32) for wb in blocks]
        min_rows = plan.dot_min_rows if cpu else 1
        parts = [_cpu_bf16_dot(x[:, i * width:(i + 1) * width], wb, min_rows)
                 for i, wb in enumerate(blocks)]
        y = sum(parts[1:], parts[0])
    return y.astype(dtype).reshape(*lead, -1)


def _int8_linear(x: jax.Array, w: Int8Weight, cpu: bool) -> jax.Array:
    """x @ dequantize(w).T, scaled after the product."""
    blocks, _, size = w.q.shape
    lead, n_in = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, n_in)
    rows = x.shape[0]
    if blocks * size > n_in:  # the quantizer zero-padded the last block
        x = jnp.pad(x, ((0, 0), (0, blocks * size - n_in)))
    plan = cpu_plan()
    if cpu and rows <= plan.int8_dot_int8_max_rows:
        y = _int8_dot_int8(x, w.q)
    elif cpu and rows <= plan.int8_matvec_max_rows:
        # The matrix-vector emitter converts int8 to float32 as it reads (about twice as fast as
        # reading a bf16 weight); a float32 x keeps it on that path.
        y = _cpu_matvecs(x.astype(jnp.float32), list(w.q), lambda wb: wb.astype(jnp.float32))
    elif rows == 1:
        # One row elsewhere (GPU): a multiply-reduce, which XLA fuses with the convert so the
        # int8 weight is read once (the einsum below first writes a converted copy).
        xb = x.reshape(1, blocks, 1, size).astype(jnp.float32)
        y = jnp.sum(xb * w.q.astype(jnp.float32)[None], axis=(1, 3))
    else:
        # On the CPU the weight is converted either way: to bf16 where the plan has YNNPACK
        # multiply bf16 activations by it, else to float32 (a bf16 dot of many rows would
        # convert it a second time); elsewhere to the activation dtype.
        dt = x.dtype
        if cpu:
            bf16 = x.dtype == jnp.bfloat16 and plan.int8_dot_bf16
            dt = jnp.bfloat16 if bf16 else jnp.float32
        if blocks == 1:
            # One block (the AVX512-BF16 plan's layout): x @ q[0].T, which YNNPACK reads as
            # stored. Contracting the block axis too made XLA write a transposed copy of every
            # converted weight (0.5B, 512-token prefill: 172 of 605 thread-ms).
            y = jnp.einsum("rc,fc->rf", x.astype(dt), w.q[0].astype(dt),
                           preferred_element_type=jnp.float32)
        else:
            y = jnp.einsum("rbc,bfc->rf", x.reshape(-1, blocks, size).astype(dt),
                           w.q.astype(dt), preferred_element_type=jnp.float32)
    return (y * w.scale).astype(x.dtype).reshape(*lead, -1)


# int8 activations: x / (max|x_row| / 127) is written as q1 + q2 / 254 + q3 / 254**2 with each q
# an int8 in [-127, 127], which holds that float32 quotient to within 1 / (2 * 254**2); with the
# quotient's own rounding each element of x is within about max|x_row| / 8e6 of its value (finer
# than bf16's rounding for every element above max|x_row| / 2**14).
_INT8_LEVELS = 3
_INT8_LEVEL_STEP = 254.0


def _int8_levels(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x[R, in] -> (int8 [levels * R, in], level-major; float32 row scales [R])."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero (padding) row stays zero
    rest = jnp.clip(x / scale[:, None], -127.0, 127.0)
    levels = []
    for _ in range(_INT8_LEVELS):
        q = jnp.round(rest)
        levels.append(q)
        rest = (rest - q) * _INT8_LEVEL_STEP  # |rest - q| <= 1/2, so the next q is in range
    return jnp.concatenate(levels).astype(jnp.int8), scale


def _int8_dot_int8(x: jax.Array, q: jax.Array) -> jax.Array:
    """x[R, in] @ q[blocks, out, block_in].T (x padded to the blocks' width), unscaled, float32.

    x is split into int8 levels (_int8_levels) stacked as rows, so one int8 x int8 product per
    block reads each weight once, and YNNPACK multiplies int8 with int32 sums, exact (|sum| <=
    127**2 * columns). On the Xeon VM (cpu_matmul.py) that multiplies 1.4-1.6x more weights per
    second than its bf16 product, where XLA's other int8 paths read them at half its speed or
    convert the whole weight first. The levels' sums recombine in float32."""
    rows, size = x.shape[0], q.shape[2]
    levels, scale = _int8_levels(x)  # 3+ rows: YNNPACK takes them without padding
    sums = [jnp.einsum("rc,fc->rf", levels[:, i * size:(i + 1) * size], qb,
                       preferred_element_type=jnp.int32) for i, qb in enumerate(q)]
    total = sum(sums[1:], sums[0])
    # Elementwise, not an einsum over the levels: XLA fuses it into one loop with the converts.
    y = total[:rows].astype(jnp.float32)
    for level in range(1, _INT8_LEVELS):
        part = total[level * rows:(level + 1) * rows].astype(jnp.float32)
        y = y + part * _INT8_LEVEL_STEP ** -level
    return y * scale[:, None]


def _cpu_matvecs(x: jax.Array, blocks: list[jax.Array], read) -> jax.Array:
    """x[R, in] @ concat(read(blocks), axis=1).T in float32, as R matrix-vector products per
    column block (each at most CPU_MATVEC_MAX_IN wide); partial sums add up in float32."""
    out = []
    for r in range(x.shape[0]):
        parts, start = [], 0
        for wb in blocks:
            # The barrier keeps XLA from fusing the float32 convert into a bf16 dot, which would
            # send it back to the converting path (as preferred_element_type does).
            xr = x[r:r + 1, start:start + wb.shape[1]]
            parts.append(jax.lax.optimization_barrier(xr @ read(wb).T).astype(jnp.float32))
            start += wb.shape[1]
        out.append(sum(parts[1:], parts[0]))
    return jnp.concatenate(out)
