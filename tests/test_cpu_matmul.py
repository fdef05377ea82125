"""The CPU matmul plan (cpu_matmul.py): chosen from the CPU's flags or $QWEN_JAX_CPU_MATMUL, and
switched only with caches cleared. (Each plan's numerics and compiled programs:
tests/test_decode_paths.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import cpu_matmul, linear
from qwen_jax.cpu_matmul import (
    AVX2,
    AVX512_BF16,
    AVX512_BF16_NO_AMX,
    PLANS,
    cpu_flags,
    detect_plan,
    use_plan,
)

AVX2_FLAGS = "fpu sse sse2 avx fma avx2 bmi2"
XEON_FLAGS = AVX2_FLAGS + " avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8"
ZEN5_FLAGS = AVX2_FLAGS + " avx512f avx512bw avx512_bf16 avx512_vnni"  # no AMX


# A Zen 5 gets the batch-invariant AVX512-BF16 plan with one row padded to 2, not the faster
# one-row avx512-bf16-matvec (opt-in only: cpu_matmul.py).
@pytest.mark.parametrize("flags, plan", [(AVX2_FLAGS, AVX2), (XEON_FLAGS, AVX512_BF16),
                                         (ZEN5_FLAGS, AVX512_BF16_NO_AMX),
                                         (AVX2_FLAGS + " amx_bf16", AVX512_BF16),
                                         (AVX2_FLAGS + " avx512f avx512bw", AVX2), ("", AVX2)])
def test_plan_follows_native_bf16_support(tmp_path, flags, plan):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_flags(str(info)) == set(flags.split())
    assert detect_plan(cpu_flags(str(info))) is plan


def test_unreadable_cpuinfo_gives_the_avx2_plan(tmp_path):
    assert cpu_flags(str(tmp_path / "missing")) == set()
    assert detect_plan(set()) is AVX2


@pytest.mark.parametrize("name", sorted(PLANS))
def test_environment_chooses_the_plan(monkeypatch, name):
    monkeypatch.setattr(cpu_matmul, "_plan", None)
    monkeypatch.setenv("QWEN_JAX_CPU_MATMUL", name)
    assert cpu_matmul.cpu_plan() is PLANS[name]


def test_unknown_plan_name_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "_plan", None)
    monkeypatch.setenv("QWEN_JAX_CPU_MATMUL", "avx9000")
    with pytest.raises(ValueError, match="QWEN_JAX_CPU_MATMUL must be one of"):
        cpu_matmul.cpu_plan()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the plan applies to the CPU backend")
def test_use_plan_retraces_and_restores():
    """A function jitted under one plan is traced again inside `use_plan` with the other (the
    caches are cleared on entry), and again under the first plan after the block."""
    before = cpu_matmul.cpu_plan()
    other = AVX2 if before.matvec_max_rows == 0 else AVX512_BF16  # the other one-row path
    x = jnp.ones((1, 64), jnp.bfloat16)
    w = jnp.ones((32, 64), jnp.bfloat16)
    f = jax.jit(linear.linear)

    def takes_library_matmul() -> bool:
        np.testing.assert_allclose(np.asarray(f(x, w), np.float32), 64.0)
        return "%ynn_fusion" in f.lower(x, w).compile().as_text()

    # One row: the matrix-vector emitter under AVX2 (and avx512-bf16-matvec), YNNPACK (padded
    # rows) under AVX512-BF16.
    assert takes_library_matmul() == (before.matvec_max_rows < 1)
    with use_plan(other):
        assert cpu_matmul.cpu_plan() is other
        assert takes_library_matmul() == (other.matvec_max_rows < 1)
    assert cpu_matmul.cpu_plan() is before
    assert takes_library_matmul() == (before.matvec_max_rows < 1)


def test_invariant_rows_by_plan():
    """Which decode batches each plan keeps batch-invariant (the real-width engine test runs
    where this is 8 or more): the AVX2 plan up to 8 rows of bf16, its opt-in batched variant up
    to 4; YNNPACK's plans any number (int8 up to its 64 rows of exact int8 products)."""
    got = {name: (plan.invariant_rows(), plan.invariant_rows(int8=True))
           for name, plan in PLANS.items()}
    assert got == {"avx2": (8, 8), "avx2-batched": (4, 8), "avx512-bf16": (None, 64),
                   "avx512-bf16-no-amx": (None, 64), "avx512-bf16-matvec": (1, 64)}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the plan applies to the CPU backend")
@pytest.mark.parametrize("name", sorted(PLANS))
def test_rows_round_as_alone_up_to_invariant_rows(name):
    """A bf16 product's row is bit-identical alone and in a batch of up to `invariant_rows`
    rows; one row more (the matrix-vector plans) and some row rounds differently, as the
    library's matmul sums in another order: the limit is real, not only cautious."""
    plan = PLANS[name]
    limit = plan.invariant_rows()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((9, 3584)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((2048, 3584)) * 0.02, jnp.bfloat16)
    with use_plan(plan):
        f = jax.jit(linear.linear)
        alone = np.stack([np.asarray(f(x[r:r + 1], w), np.float32)[0] for r in range(9)])
        for rows in range(2, 10):
            same = np.array_equal(np.asarray(f(x[:rows], w), np.float32), alone[:rows])
            if limit is None or rows <= limit:
                assert same, rows
            elif rows == limit + 1 and plan.matvec_max_rows:
                assert not same, rows
