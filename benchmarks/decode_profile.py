"""Where a decode step's time goes: the engine's multi-step decode program alone, on any device.

    python benchmarks/decode_profile.py --preset 7b --rows 1,8 --profile      # on a GPU
    python benchmarks/decode_profile.py --preset demo --rows 1,2               # a CPU smoke run

Compiles `engine._decode` (the program a serving engine runs for several steps per call) for R
rows, with one request at position `--context` and R - 1 padding rows (as a batch-1 request
runs on a larger row bucket), random weights at the preset's shape, greedy sampling, and times
it called back to back with its outputs fed back in (no host loop, no streaming): milliseconds
per step and tokens/s of the one request. Variants:

- `default`: the engine's program as it is;
- `argmax`: the sampler replaced by a bare argmax (what the sampler costs is the difference).

`--profile` traces two calls of each `default` program with `jax.profiler` and prints the
kernels by total time (on a GPU: one line per fused kernel, e.g. `gemm_fusion_dot_*` for matrix
products, `loop_gather_fusion` for a gather), the kernel time per step and the span it covered
(idle gaps show as span > kernel time; on the CPU the trace's host events nest, so its times
are only indicative). `--xla-flags` runs the `default` programs again in a child process per
set of XLA flags (`;` between sets). Each process ends with one JSON line of its runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp

from qwen_jax import engine as E
from qwen_jax import model
from qwen_jax import sampler as S
from qwen_jax.config import PRESETS


def _argmax_sample(logits, batch, state, steps, allowed=None, *, vocab_limit, candidates=0):
    raw = logits[:, :vocab_limit].astype(jnp.float32)
    r, k = raw.shape[0], min(S.NUM_TOP_LOGPROBS, vocab_limit)
    return S.SampleOutput(tokens=jnp.argmax(raw, -1).astype(jnp.int32),
                          logprobs=jnp.zeros((r,), jnp.float32),
                          top_ids=jnp.zeros((r, k), jnp.int32),
                          top_logprobs=jnp.zeros((r, k), jnp.float32))


@contextlib.contextmanager
def _variant(name: str):
    """Trace `engine._decode` with the sampler swapped for `name`."""
    saved = S.sample
    if name == "argmax":
        S.sample = _argmax_sample
    elif name != "default":
        raise ValueError(f"unknown variant {name!r}")
    try:
        yield
    finally:
        S.sample = saved


def kernel_profile(fn, steps: int) -> dict:
    """Kernel time by name over one fn() (device lines of a jax.profiler trace), per step."""
    from jax.profiler import ProfileData

    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d)
    fn()
    jax.profiler.stop_trace()
    data = ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0])
    # The device's busiest line (on a GPU the compute stream); on the CPU the host threads.
    lines = [ln for pl in data.planes if pl.name.startswith("/device:") for ln in pl.lines]
    lines = lines or [ln for pl in data.planes if "CPU" in pl.name for ln in pl.lines]
    events = max((list(ln.events) for ln in lines), key=len, default=[])
    by_name: dict[str, list] = {}
    for e in events:
        a = by_name.setdefault(e.name, [0, 0.0])
        a[0] += 1
        a[1] += e.duration_ns
    span = (max(e.start_ns + e.duration_ns for e in events) - min(e.start_ns for e in events)
            if events else 0.0)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return {"kernels_per_step": len(events) / steps,
            "kernel_ms_per_step": sum(v[1] for v in by_name.values()) / 1e6 / steps,
            "span_ms_per_step": span / 1e6 / steps,
            "top": [(k[:100], n / steps, ns / 1e6 / steps) for k, (n, ns) in top[:40]]}


def time_decode(params, cfg, *, rows: int, max_len: int, kv_len: int, context: int,
                steps_per_call: int, variant: str, all_slots: bool, profile: bool) -> dict:
    """ms per step of the `variant` decode program on `rows` rows, one of them decoding."""
    max_slots = max(rows, 8)
    cache = model.init_cache(cfg, max_slots, max_len, jnp.bfloat16)
    pstate = S.init_penalty_state(max_slots, cfg.vocab_size)
    sbatch = S.make_sampling_batch(max_slots)
    slots = jnp.arange(rows, dtype=jnp.int32)
    positions = jnp.asarray([context] + [-1] * (rows - 1), jnp.int32)
    steps = jnp.zeros((rows,), jnp.int32)
    allowed = jnp.ones((rows, cfg.vocab_size), bool)
    every = all_slots and rows == max_slots
    t = time.perf_counter()
    with _variant(variant):
        fn = jax.jit(partial(E._decode, cfg=cfg, vocab_limit=cfg.vocab_size, kv_len=kv_len,
                             num_steps=steps_per_call, all_slots=every), donate_argnums=(1, 2))
        prog = fn.lower(params, cache, pstate, sbatch, slots, jnp.zeros((rows,), jnp.int32),
                        positions, steps, allowed).compile()
    compile_s = time.perf_counter() - t
    state = {"cache": cache, "pstate": pstate, "tokens": jnp.zeros((rows,), jnp.int32)}

    def calls(n: int) -> None:
        for _ in range(n):
            _, last, state["cache"], state["pstate"] = prog(
                params, state["cache"], state["pstate"], sbatch, slots, state["tokens"],
                positions, steps, allowed)
            state["tokens"] = last
        state["tokens"].block_until_ready()

    calls(2)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        calls(8)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times) / (8 * steps_per_call)
    out = {"variant": variant, "rows": rows, "max_len": max_len, "kv_len": kv_len,
           "all_slots": every, "step_ms": step_s * 1e3, "tok_s": 1 / step_s,
           "compile_s": compile_s, "conditionals": prog.as_text().count(" conditional(")}
    if profile:
        out["profile"] = kernel_profile(lambda: calls(2), 2 * steps_per_call)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="first N layers (default: all)")
    ap.add_argument("--rows", default="1,8", help="row counts, comma-separated")
    ap.add_argument("--variants", default="default,argmax")
    ap.add_argument("--context", type=int, default=512, help="the decoding row's position")
    ap.add_argument("--kv-len", type=int, default=1024, help="cache keys attended to")
    ap.add_argument("--max-len", default="1024", help="cache lengths, comma-separated")
    ap.add_argument("--steps-per-call", type=int, default=8)
    ap.add_argument("--all-slots", action="store_true",
                    help="as the engine compiles a call over every slot (8 rows)")
    ap.add_argument("--profile", action="store_true", help="kernel time of the default programs")
    ap.add_argument("--xla-flags", default="", help="';'-separated XLA_FLAGS sets to rerun with")
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    max_lens = [int(m) for m in args.max_len.split(",")]
    if not 0 <= args.context < args.kv_len <= min(max_lens):
        ap.error("need 0 <= --context < --kv-len <= every --max-len")
    dev = jax.devices()[0]
    rec: dict = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
                 "preset": args.preset, "layers": cfg.num_hidden_layers,
                 "xla_flags": os.environ.get("XLA_FLAGS", ""), "runs": []}
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    print(f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}, preset {args.preset}, "
          f"{cfg.num_hidden_layers} layers, XLA_FLAGS={rec['xla_flags']!r}", flush=True)
    for variant in args.variants.split(","):
        for max_len in max_lens:
            for rows in (int(r) for r in args.rows.split(",")):
                r = time_decode(params, cfg, rows=rows, max_len=max_len, kv_len=args.kv_len,
                                context=args.context, steps_per_call=args.steps_per_call,
                                variant=variant, all_slots=args.all_slots,
                                profile=args.profile and variant == "default")
                rec["runs"].append(r)
                print(f"  {variant:8s} {rows} rows, max_len {max_len}: {r['step_ms']:.3f} ms a "
                      f"step = {r['tok_s']:.1f} tok/s (compile {r['compile_s']:.0f} s)",
                      flush=True)
                if "profile" in r:
                    p = r["profile"]
                    print(f"    kernels: {p['kernels_per_step']:.0f} a step, "
                          f"{p['kernel_ms_per_step']:.3f} ms, over {p['span_ms_per_step']:.3f} "
                          "ms; the largest (ms a step, launches a step):")
                    for name, n, ms in p["top"][:20]:
                        print(f"      {ms:7.3f} {n:6.1f}  {name}")
    for flags in (f for f in args.xla_flags.split(";") if f.strip()):
        cmd = [sys.executable, __file__, "--preset", args.preset, "--rows", args.rows,
               "--variants", "default", "--context", str(args.context), "--kv-len",
               str(args.kv_len), "--max-len", args.max_len, "--steps-per-call",
               str(args.steps_per_call)]
        cmd += ["--layers", str(args.layers)] if args.layers else []
        cmd += ["--all-slots"] if args.all_slots else []
        cmd += ["--profile"] if args.profile else []
        subprocess.run(cmd, env=dict(os.environ, XLA_FLAGS=flags), check=False)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
