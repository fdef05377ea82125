"""What a long prompt costs the engine and the other chats, with and without chunked prefill.

    python benchmarks/long_prompt.py --preset 0.5b --prompt 2048 --chunks 512,2048

For each prefill chunk size (one equal to the prompt length is a single prefill call), one
engine at the same shape and random weights, and in that engine:
- the long prompt alone: prefill seconds (the engine's own prefill calls) and how much the
  process's peak RSS rises above what it held before (the attention temporaries);
- the same prompt submitted while another chat is generating, and a short request submitted
  just after it: the short request's time to first token, and the longest gap between two
  tokens of the chat that was already generating.
Prints one line per chunk size and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.bench import peak_rss_bytes, reset_peak_rss, rss_bytes
from qwen_jax.config import PRESETS
from qwen_jax.engine import Engine, GenerationRequest, release_freed_memory
from qwen_jax.layout import block_wide_weights
from qwen_jax.model import init_params
from qwen_jax.sampler import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def measure(params, cfg, prompt: list[int], chunk: int, max_len: int) -> dict:
    eng = Engine(params, cfg, max_slots=4, max_len=max_len, prefill_chunk=chunk)
    try:
        t = time.perf_counter()
        eng.warmup(prompt_lengths=[len(prompt), len(prompt) + 1, 16], kv_lens=range(1, max_len),
                   rows=[1, 2, 3])
        out: dict = {"chunk": chunk, "compile_s": time.perf_counter() - t}
        release_freed_memory()

        ids = np.asarray(prompt, np.int32)
        reset_peak_rss()
        before = rss_bytes()
        t = time.perf_counter()
        with eng._device_lock:
            eng._prefill_tokens(ids, 0)
            jax.block_until_ready(eng.cache)
        out["prefill_s"] = time.perf_counter() - t
        out["peak_rss_rise_gib"] = (peak_rss_bytes() - before) / 2**30

        # A chat already generating, then the long prompt, then a short request.
        running = eng.submit(GenerationRequest((1, 2, 3), GREEDY, max_len - 8))
        stream = running.events(timeout=3600)
        next(stream)
        stamps: list[float] = []
        done = threading.Event()

        def follow() -> None:
            for _ in stream:
                stamps.append(time.perf_counter())
                if done.is_set():
                    running.cancel()
                    break

        follower = threading.Thread(target=follow)
        follower.start()
        time.sleep(0.5)  # a few of its tokens first
        long_req = eng.submit(GenerationRequest(tuple(prompt), GREEDY, 1))
        t = time.perf_counter()
        short = eng.submit(GenerationRequest((5, 6, 7, 8), GREEDY, 1))
        next(short.events(timeout=3600))
        out["short_ttft_s"] = time.perf_counter() - t
        list(long_req.events(timeout=3600))
        out["long_done_s"] = time.perf_counter() - t
        done.set()
        follower.join()
        gaps = [b - a for a, b in zip(stamps, stamps[1:]) if a >= t - 1.0]
        out["running_max_gap_s"] = max(gaps) if gaps else None
        out["running_median_gap_s"] = statistics.median(gaps) if gaps else None
        return out
    finally:
        eng.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--prompt", type=int, default=2048, help="long prompt length in tokens")
    ap.add_argument("--chunks", default="512,2048", help="prefill chunk sizes to compare")
    args = ap.parse_args()

    cfg = PRESETS[args.preset]
    params = block_wide_weights(init_params(cfg, jax.random.PRNGKey(0), jnp.dtype(args.dtype)))
    jax.block_until_ready(params)
    prompt = [int(x) for x in np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt)]
    max_len = 1 << (args.prompt + 64).bit_length()
    rec = {"preset": args.preset, "dtype": args.dtype, "prompt": args.prompt,
           "max_len": max_len, "device": str(jax.devices()[0].device_kind), "runs": []}
    for chunk in (int(c) for c in args.chunks.split(",")):
        r = measure(params, cfg, prompt, chunk, max_len)
        rec["runs"].append(r)
        print(f"chunk {chunk:5d}: prefill {r['prefill_s']:.2f} s "
              f"({args.prompt / r['prefill_s']:.1f} tok/s), peak RSS +{r['peak_rss_rise_gib']:.2f} "
              f"GiB; under load: short request's first token after {r['short_ttft_s']:.2f} s, "
              f"long prompt done after {r['long_done_s']:.2f} s, running chat's longest gap "
              f"{r['running_max_gap_s']:.2f} s (median {r['running_median_gap_s']:.3f} s)",
              flush=True)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
