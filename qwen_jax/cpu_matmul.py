"""Which of XLA's CPU matrix-multiply paths a bf16 `x @ W.T` takes, chosen by row count and CPU.

XLA's CPU backend (jax 0.10) has three ways to compute a bf16 product (found by inspecting the
compiled HLO; tests/test_decode_paths.py checks the programs and the numerics):
- its matrix-vector emitter reads bf16 (and int8) weights directly, one row of x at a time, for
  weight rows of at most 3584 columns (wider ones as column blocks, layout.py);
- with a float32 result (`preferred_element_type`) and 2+ rows it calls YNNPACK's bf16 matmul;
- with a bf16 result it converts the whole weight to float32 and runs a float32 matmul.
All three accumulate in float32 and round once, like torch's bf16 linear.

Which one is fastest depends on the CPU (measured, benchmarks/README.md):
- AVX2 only (AMD EPYC VMs): YNNPACK's bf16 matmul runs at 35-50 GFLOP/s, so the emitter wins
  up to 4 rows, YNNPACK from 5 to 64 rows, the converting float32 matmul beyond. But a row
  rounds differently through YNNPACK than through the emitter, so a seeded request would decode
  differently alone than beside 4 or more others: the AVX2 plan keeps the emitter up to 8 rows
  (the default --max-num-seqs; an 8-row 0.5B decode step 302 instead of 187 ms), and
  `avx2-batched` (chosen only by QWEN_JAX_CPU_MATMUL) takes YNNPACK from 5 rows.
- AVX512-BF16 / AMX (an Intel Xeon VM): YNNPACK reaches ~650 GFLOP/s from 256 rows and reads a
  weight faster than the emitter even for one row padded to four (24 gate_proj matrices of the
  0.5B shape: 12.7 vs 15.1 ms); a 512-row product is 3.2x faster than converting. So every bf16
  product takes YNNPACK there, and wide weights stay in one piece (7% faster than blocks).
int8 weights (quantize.py): the AVX2 plan takes the emitter up to 8 rows and converts them to
float32 beyond. The AVX512-BF16 plan writes up to 64 rows of activations as int8 levels for
YNNPACK's exact int8 x int8 product (linear._int8_dot_int8: per weight 1.4-1.6x the rate of its
bf16 product; one decode step 82 -> 42 ms against the emitter), and beyond converts the weights
to bf16 for YNNPACK when the activations are bf16 (512 rows x 24 gate_proj: 185 vs 558 ms through
float32; a 128-token 0.5B prefill 172-184 ms against 191-199 ms with levels, 64 tokens 115-119
both ways).
- AVX512-BF16 without AMX (an AMD EPYC Zen 5 VM): YNNPACK's one-row product (padded to 4 rows)
  reads the weights at about half the machine's bandwidth while the emitter reads them at 80%
  (0.5B batch-1 decode 20.6-21.1 vs 35.2 tok/s); from 2 rows YNNPACK is as on the Xeon. A
  one-row emitter product rounds differently from YNNPACK's, though, so a seeded request would
  decode differently alone than in a batch: the detected plan there is `avx512-bf16-no-amx`,
  the AVX512-BF16 plan with one row padded to 2 rows instead of 4 (YNNPACK's rows are the same
  for any row count; 4-11% less time per weight there, 0.5B batch-1 decode 20.4-20.8 -> 22.4-22.5
  tok/s; on the Xeon 4 rows were fastest). `avx512-bf16-matvec` (chosen only by
  QWEN_JAX_CPU_MATMUL) takes the emitter's speed instead: the emitter for one row (wide weights
  as column blocks), YNNPACK beyond.
The plan is read when a function is traced: switch it only with `use_plan`, which clears JAX's
caches so no program traced under the other plan is reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import jax


@dataclasses.dataclass(frozen=True)
class CpuMatmulPlan:
    """Row-count thresholds for bf16 (and int8-weight) products on the CPU backend."""

    name: str
    matvec_max_rows: int  # 1..this many rows: the matrix-vector emitter, one row at a time
    dot_min_rows: int  # YNNPACK: x is zero-padded up to this many rows
    dot_max_rows: int | None  # more rows: convert the weight to float32 (None: never)
    column_blocks: bool  # bf16 weights wider than 3584 columns stored as blocks (layout.py)
    # int8 weights, by row count: x as int8 levels for YNNPACK's int8 product, up to this many
    # rows; then the matrix-vector emitter up to this many; beyond, the weight converted (to
    # bf16 for YNNPACK where int8_dot_bf16 and x is bf16, else to float32).
    int8_dot_int8_max_rows: int
    int8_matvec_max_rows: int
    int8_dot_bf16: bool

    def invariant_rows(self, int8: bool = False) -> int | None:
        """Up to how many rows a product multiplies each row as it would alone (None: any
        number), so that a seeded request decodes the same alone and in batches of up to that
        many rows: the rows of one path (per-row products, YNNPACK's, exact int8 sums) do not
        depend on how many there are, but two paths round differently."""
        if int8:
            return self.int8_dot_int8_max_rows or self.int8_matvec_max_rows
        return self.matvec_max_rows or self.dot_max_rows


AVX2 = CpuMatmulPlan("avx2", matvec_max_rows=8, dot_min_rows=1, dot_max_rows=64,
                     column_blocks=True, int8_dot_int8_max_rows=0, int8_matvec_max_rows=8,
                     int8_dot_bf16=False)
# Opt-in only (not detected): 8 streams of bf16 decode faster, and not batch-invariant beyond 4
# rows (see the module docstring).
AVX2_BATCHED = dataclasses.replace(AVX2, name="avx2-batched", matvec_max_rows=4)
AVX512_BF16 = CpuMatmulPlan("avx512-bf16", matvec_max_rows=0, dot_min_rows=4, dot_max_rows=None,
                            column_blocks=False, int8_dot_int8_max_rows=64,
                            int8_matvec_max_rows=0, int8_dot_bf16=True)
# Opt-in only (not detected): faster one-row decode where YNNPACK's one-row product is slow, and
# not batch-invariant (see the module docstring).
AVX512_BF16_MATVEC = dataclasses.replace(AVX512_BF16, name="avx512-bf16-matvec",
                                         matvec_max_rows=1, dot_min_rows=1, column_blocks=True)
# Detected on AVX512-BF16 CPUs without AMX: one row padded to 2 for YNNPACK (faster on a Zen 5).
AVX512_BF16_NO_AMX = dataclasses.replace(AVX512_BF16, name="avx512-bf16-no-amx", dot_min_rows=2)
PLANS = {p.name: p for p in (AVX2, AVX2_BATCHED, AVX512_BF16, AVX512_BF16_NO_AMX,
                             AVX512_BF16_MATVEC)}

# Set from QWEN_JAX_CPU_MATMUL (a plan name) or the CPU's flags on first use.
_plan: CpuMatmulPlan | None = None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where unreadable)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect_plan(flags: set[str]) -> CpuMatmulPlan:
    """AVX512_BF16 where the CPU multiplies bf16 natively with AMX, AVX512_BF16_NO_AMX where
    with AVX512-BF16 only, else AVX2."""
    if "amx_bf16" in flags:
        return AVX512_BF16
    return AVX512_BF16_NO_AMX if "avx512_bf16" in flags else AVX2


def cpu_plan() -> CpuMatmulPlan:
    """The plan in use: $QWEN_JAX_CPU_MATMUL (a name in PLANS) if set, else detected."""
    global _plan
    if _plan is None:
        name = os.environ.get("QWEN_JAX_CPU_MATMUL")
        if name and name not in PLANS:
            raise ValueError(f"QWEN_JAX_CPU_MATMUL must be one of {sorted(PLANS)}, not {name!r}")
        _plan = PLANS[name] if name else detect_plan(cpu_flags())
    return _plan


@contextlib.contextmanager
def use_plan(plan: CpuMatmulPlan) -> Iterator[CpuMatmulPlan]:
    """Trace with `plan` inside the block (tests); JAX's caches are cleared on entry
    and exit, since a cached program keeps the plan it was traced with."""
    global _plan
    previous = cpu_plan()
    _plan = plan
    jax.clear_caches()
    try:
        yield plan
    finally:
        _plan = previous
        jax.clear_caches()
