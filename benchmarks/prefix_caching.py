"""What prefix caching saves a chat: time to first token turn by turn, with and without it.

    python benchmarks/prefix_caching.py --preset 0.5b --turns 6 --turn-tokens 256

One engine per setting, the same random weights. A chat of `--turns` turns: the first prompt is
`--first-tokens` random tokens (default: `--turn-tokens`; say a document to discuss); each
later prompt is the previous prompt, the reply (greedy,
`--reply-tokens` tokens, no stop token) and `--turn-tokens` new ones, sent as token ids (a
server re-renders the reply's text, which usually encodes to the same tokens). For each turn:
the prompt's length, the tokens reused (`cached_tokens`) and the time to first token (submit ->
first token event on an otherwise idle engine). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import PRESETS
from qwen_jax.engine import Engine, GenerationRequest, all_buckets
from qwen_jax.layout import block_wide_weights
from qwen_jax.model import init_params
from qwen_jax.sampler import SamplingParams


def chat(engine: Engine, turns: int, first_tokens: int, turn_tokens: int, reply_tokens: int,
         seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    vocab = engine.cfg.vocab_size - 300  # clear of the special tokens
    prompt: list[int] = []
    out = []
    for turn in range(turns):
        new = first_tokens if turn == 0 else turn_tokens
        prompt = prompt + [int(t) for t in rng.integers(0, vocab, new)]
        t0 = time.perf_counter()
        handle = engine.submit(GenerationRequest(tuple(prompt), SamplingParams(temperature=0.0),
                                                 reply_tokens))
        reply, ttft = [], None
        for ev in handle.events(timeout=600):
            if ev.token is not None:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                reply.append(ev.token)
        out.append({"prompt_tokens": len(prompt), "cached_tokens": handle.cached_tokens,
                    "ttft_s": ttft})
        prompt = prompt + reply
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--first-tokens", type=int, default=None)
    ap.add_argument("--turn-tokens", type=int, default=256)
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=None)
    args = ap.parse_args()

    cfg = PRESETS[args.preset]
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    params = block_wide_weights(init_params(cfg, jax.random.PRNGKey(0), dtype))
    first = args.turn_tokens if args.first_tokens is None else args.first_tokens
    need = first + (args.turns - 1) * args.turn_tokens + args.turns * args.reply_tokens
    max_len = next(b for b in all_buckets(1 << 20) if b >= need + 1)
    results = {}
    for caching in (False, True):
        engine = Engine(params, cfg, max_slots=2, max_len=max_len,
                        prefill_chunk=args.prefill_chunk, prefix_caching=caching)
        try:
            t = time.perf_counter()
            engine.warmup(rows=[1])
            print(f"prefix_caching={caching}: warm-up {time.perf_counter() - t:.1f} s", flush=True)
            results[caching] = chat(engine, args.turns, first, args.turn_tokens,
                                    args.reply_tokens, 0)
            assert engine.stats.compiles_after_warmup == 0
        finally:
            engine.close()
    print(f"\n{args.preset} {args.dtype}, {jax.devices()[0].device_kind}, prefill chunk "
          f"{engine.prefill_chunk}: time to first token per turn")
    print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'cold (s)':>9} {'cached (s)':>11} "
          f"{'ratio':>6}")
    for i, (cold, hot) in enumerate(zip(results[False], results[True]), 1):
        print(f"{i:>4} {cold['prompt_tokens']:>7} {hot['cached_tokens']:>7} "
              f"{cold['ttft_s']:>9.2f} {hot['ttft_s']:>11.2f} "
              f"{cold['ttft_s'] / hot['ttft_s']:>6.2f}")
    print(json.dumps({"preset": args.preset, "dtype": args.dtype, "max_len": max_len,
                      "prefill_chunk": engine.prefill_chunk, "cold": results[False],
                      "cached": results[True]}))


if __name__ == "__main__":
    main()
