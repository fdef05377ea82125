"""Batch-1 decode speed against the memory-bandwidth bound, at real model shapes, on any device.

    python benchmarks/decode_bound.py --preset 7b            # on a GPU: Qwen2.5-7B shapes, bf16
    python benchmarks/decode_bound.py --preset demo --reference  # a quick local smoke run

On a CPU the copy-bandwidth figure is only indicative (one XLA elementwise op does not saturate
memory there); `qwen-jax bench` uses the machine's measured read bandwidth instead.

Random weights are created on the device (no checkpoint needed). Measured, in one run:
- the device's copy bandwidth (a jitted `x + 1` over a large array, bytes read + written);
- our decode step alone (jitted `forward` + greedy argmax, donated cache), one step per call and
  `--steps` steps per call (a `lax.scan`, no host round trip between tokens);
- the same through the serving `Engine` (sampler, slots, host loop), batch 1 and `--batch`;
- with `--reference`, transformers' eager `generate` (greedy, its dynamic cache) on the same
  device and dtype, with its own random weights of the same shapes.
The bound: every decode step reads all weights plus the cache in use, so
tokens/s <= copy bandwidth / (weight bytes + KV bytes read per step). One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import model
from qwen_jax.bench import copy_bandwidth
from qwen_jax.config import PRESETS
from qwen_jax.engine import Engine, GenerationRequest, pow2_bucket, wait_idle
from qwen_jax.layout import block_wide_weights
from qwen_jax.quantize import quantize_params
from qwen_jax.sampler import SamplingParams


def _timed(fn, repeats: int) -> float:
    """Median seconds of fn() (which must block until its result is ready)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def raw_decode(params, cfg, context: int, steps: int) -> dict:
    """Tokens/s of the bare model step at batch 1, with the cache filled up to `context`."""
    max_len = pow2_bucket(context + steps + 1, 16, 1 << 20)
    cache = model.init_cache(cfg, 1, max_len, jnp.bfloat16)
    kv_len = max_len

    def one(params, tok, pos, cache):
        logits, cache = model.forward(params, cfg, tok[:, None], pos[:, None], cache,
                                      kv_len=kv_len, logits_at=jnp.zeros((1,), jnp.int32))
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    def many(params, tok, pos, cache):
        def body(carry, _):
            tok, pos, cache = carry
            tok, cache = one(params, tok, pos, cache)
            return (tok, pos + 1, cache), tok
        (tok, pos, cache), toks = jax.lax.scan(body, (tok, pos, cache), None, length=steps)
        return toks, cache

    step1 = jax.jit(one, donate_argnums=(3,))
    stepn = jax.jit(many, donate_argnums=(3,))
    tok = jnp.zeros((1,), jnp.int32)
    pos = jnp.full((1,), context, jnp.int32)
    state = {"cache": cache}

    def run1():
        t, state["cache"] = step1(params, tok, pos, state["cache"])
        t.block_until_ready()

    def runn():
        t, state["cache"] = stepn(params, tok, pos, state["cache"])
        t.block_until_ready()

    s1 = _timed(run1, 20)
    sn = _timed(runn, 5) / steps
    kv_read = 2 * cfg.num_hidden_layers * kv_len * cfg.num_key_value_heads * cfg.head_dim * 2
    return {"step_s": s1, "tok_s": 1 / s1, "scan_step_s": sn, "scan_tok_s": 1 / sn,
            "kv_len": kv_len, "kv_bytes_read": kv_read}


def engine_decode(params, cfg, context: int, steps: int, batch: int, steps_per_call: int,
                  lookahead: bool | None = None) -> dict:
    """Tokens/s through the serving engine: `batch` greedy requests of `steps` tokens each."""
    max_len = pow2_bucket(context + steps + steps_per_call + 1, 16, 1 << 20)
    eng = Engine(params, cfg, max_slots=batch, max_len=max_len, queue_size=batch,
                 steps_per_call=steps_per_call, lookahead=lookahead)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    eng.warmup(prompt_lengths=[context], kv_lens=range(context, max_len + 1), rows=[batch])
    compile_s = time.perf_counter() - t
    out = {}
    try:
        for _ in range(2):  # the first pass also warms up host-side paths
            prompts = [tuple(int(x) for x in rng.integers(0, cfg.vocab_size, context))
                       for _ in range(batch)]
            greedy = SamplingParams(temperature=0.0)
            hs = [eng.submit(GenerationRequest(p, greedy, steps)) for p in prompts]
            firsts = [next(h.events()) for h in hs]  # every row prefilled and decoding
            assert all(f.token is not None for f in firsts)
            t0, n0 = time.perf_counter(), eng.stats.tokens
            for h in hs:
                list(h.events())
            dt = time.perf_counter() - t0
            out = {"tok_s": (eng.stats.tokens - n0) / dt, "batch": batch,
                   "steps_per_call": steps_per_call, "lookahead": eng.lookahead,
                   "compile_s": compile_s,
                   "compiles_after_warmup": eng.stats.compiles_after_warmup}
        wait_idle(eng)
    finally:
        eng.close()
    return out


def reference_decode(cfg, context: int, steps: int) -> dict:
    """transformers' greedy generate on the same device and dtype, random weights."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = Qwen2Config(**cfg.to_hf_dict())
    torch.manual_seed(0)
    with torch.device(dev):
        m = Qwen2ForCausalLM._from_config(hf_cfg, torch_dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, context), device=dev)

    def gen(n):
        with torch.inference_mode():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    gen(4)
    t_short = _timed(lambda: gen(2), 3)
    t_long = _timed(lambda: gen(steps + 2), 3)
    s = (t_long - t_short) / steps  # per decoded token, prefill excluded
    return {"device": dev, "torch": torch.__version__, "step_s": s, "tok_s": 1 / s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7b", choices=sorted(PRESETS))
    ap.add_argument("--context", type=int, default=512, help="tokens already in the cache")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per measurement")
    ap.add_argument("--batch", type=int, default=8, help="concurrent requests for the engine")
    ap.add_argument("--reference", action="store_true", help="also time transformers")
    ap.add_argument("--quantize", choices=["none", "int8"], default="none",
                    help="int8 weights for qwen-jax (transformers stays bf16)")
    args = ap.parse_args()
    if args.steps < 16:
        ap.error("--steps must be at least 16 (the engine runs up to 8 steps per call, and the "
                 "rate is timed after the first token)")

    cfg = PRESETS[args.preset]
    dev = jax.devices()[0]
    rec: dict = {"preset": args.preset, "device": dev.device_kind, "platform": dev.platform,
                 "jax": jax.__version__, "context": args.context}
    rec["copy_bandwidth_Bps"] = bw = copy_bandwidth(
        (4 << 30) if dev.platform == "gpu" else (256 << 20), repeats=10)
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    # Laid out as load_checkpoint would (wide bf16 weights as column blocks on the CPU).
    params = quantize_params(params) if args.quantize == "int8" else block_wide_weights(params)
    jax.block_until_ready(params)
    rec["quantize"] = args.quantize
    rec["weight_bytes"] = wb = sum(x.nbytes for x in jax.tree.leaves(params))
    raw = raw_decode(params, cfg, args.context, args.steps)
    bound = bw / (wb + raw["kv_bytes_read"])
    rec.update(raw=raw, bound_tok_s=bound)
    rec["engine_b1"] = engine_decode(params, cfg, args.context, args.steps, 1, 1)
    rec["engine_b1_multi"] = engine_decode(params, cfg, args.context, args.steps, 1, 8)
    # Where lookahead is the default (several steps per call on an accelerator), the A/B: the
    # multi-step engine without it, and the one-step engine with it.
    if rec["engine_b1_multi"]["lookahead"]:
        rec["engine_b1_lookahead"] = engine_decode(params, cfg, args.context, args.steps, 1, 1,
                                                   lookahead=True)
        rec["engine_b1_multi_plain"] = engine_decode(params, cfg, args.context, args.steps, 1,
                                                     8, lookahead=False)
    # With --batch 1 this is the "8 steps per call" run above: measured once, so the one-step
    # batch-1 figure is not overwritten by it (it used to be).
    batch_key = f"engine_b{args.batch}" if args.batch > 1 else "engine_b1_multi"
    if args.batch > 1:
        rec[batch_key] = engine_decode(params, cfg, args.context, args.steps, args.batch, 8)
    del params
    if args.reference:
        rec["transformers"] = reference_decode(cfg, args.context, args.steps)

    weights = "int8 weights" if args.quantize == "int8" else "bf16"
    print(f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}, preset {args.preset}, "
          f"{weights}, context {args.context}")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; weights {wb / 1e9:.2f} GB; "
          f"bound {bound:.1f} tok/s at batch 1")
    rows = [("model step, 1 per call", raw["tok_s"]),
            (f"model step, {args.steps} per call (scan)", raw["scan_tok_s"]),
            ("engine, batch 1", rec["engine_b1"]["tok_s"]),
            ("engine, batch 1, 8 steps per call", rec["engine_b1_multi"]["tok_s"])]
    if "engine_b1_lookahead" in rec:
        rows += [("engine, batch 1, lookahead", rec["engine_b1_lookahead"]["tok_s"]),
                 ("engine, batch 1, 8 per call, no lookahead",
                  rec["engine_b1_multi_plain"]["tok_s"])]
    if args.reference:
        rows.append(("transformers generate, batch 1", rec["transformers"]["tok_s"]))
    for name, v in rows:
        print(f"  {name:40s} {v:8.1f} tok/s  {v / bound:6.1%} of bound")
    print(f"  engine, batch {args.batch}, 8 per call (aggregate) "
          f"{rec[batch_key]['tok_s']:8.1f} tok/s")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
