"""Does a seeded request decode the same alone and in a busy batch, on this device?

    python benchmarks/batch_invariance.py --preset 7b --layers 4   # a GPU: 7B widths, 4 layers
    python benchmarks/batch_invariance.py --preset demo            # quick, any machine

The scenario of `tests/test_engine.py::test_batch_invariance_at_real_widths`, at any shape, with
the engine's defaults for the device (steps per call, how attention reads the cache), random
weights: a seeded request (temperature 0.9, logprobs) runs alone, then beside 1, 3 and 7 other
requests, whose decode calls then carry 2, 4 and 8 rows (on the CPU; on an accelerator every
call carries max_slots rows, 1 too for int8 weights, unless --row-buckets says otherwise). For
each case it prints the first token where the tokens, or the logprobs, differ from the lone run,
and the largest logprob difference while the tokens agree. It reports and does not fail: the
tests assert invariance where it holds (the CPU); this script measures it where the tests cannot
run (an accelerator). One JSON line at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import model
from qwen_jax.config import PRESETS
from qwen_jax.engine import Engine, GenerationRequest, default_steps_per_call
from qwen_jax.layout import block_wide_weights
from qwen_jax.quantize import quantize_params
from qwen_jax.sampler import SamplingParams

COMPANIONS = [(1, 30), (3, 300), (7, 700)]  # (other requests, their prompt length)


def first_difference(a: list, b: list) -> int | None:
    """Index of the first differing item (or the shorter length); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _where(index: int | None) -> str:
    return "identical" if index is None else f"differ from token {index}"


def trace(handle) -> tuple[list[int], list[float]]:
    toks, lps = [], []
    for ev in handle.events(timeout=900.0):
        if ev.error:
            raise RuntimeError(ev.error)
        if ev.token is not None:
            toks.append(ev.token)
            lps.append(ev.logprob)
    return toks, lps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.5b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="first N layers (default: all)")
    ap.add_argument("--quantize", choices=["none", "int8"], default="none")
    ap.add_argument("--steps-per-call", type=int, default=None,
                    help="decode steps per device call (default: what `serve` takes here)")
    ap.add_argument("--tokens", type=int, default=40, help="tokens the seeded request decodes")
    ap.add_argument("--seeds", type=int, default=2, help="seeded requests tried, one after another")
    ap.add_argument("--row-buckets", default=None,
                    help="decode batch sizes compiled, e.g. 2,8 (default: the engine's)")
    args = ap.parse_args()

    cfg = PRESETS[args.preset]
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    params = model.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    params = quantize_params(params) if args.quantize == "int8" else block_wide_weights(params)
    kw = {"steps_per_call": args.steps_per_call or default_steps_per_call()}
    if args.row_buckets:
        kw["row_buckets"] = [int(x) for x in args.row_buckets.split(",")]
    longest = COMPANIONS[-1][1] + 10 * COMPANIONS[-1][0] + 2 * args.tokens + 16
    max_len = 1 << (longest - 1).bit_length()
    eng = Engine(params, cfg, max_slots=8, max_len=max_len, queue_size=16, **kw)
    rng = np.random.default_rng(0)
    dev = jax.devices()[0]
    rec: dict = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
                 "preset": args.preset, "layers": cfg.num_hidden_layers,
                 "quantize": args.quantize, "steps_per_call": eng.steps_per_call,
                 "row_buckets": list(eng.row_buckets),
                 "chunked_attention": eng.chunked_attention, "tokens": args.tokens, "cases": []}

    def req(prompt_len: int, seed: int, max_tokens: int) -> GenerationRequest:
        return GenerationRequest(rng.integers(0, cfg.vocab_size, prompt_len).tolist(),
                                 SamplingParams(temperature=0.9, seed=seed), max_tokens,
                                 logprobs=True)

    print(f"{dev.device_kind} ({dev.platform}), preset {args.preset}, {cfg.num_hidden_layers} "
          f"layers, {'int8' if args.quantize == 'int8' else 'bf16'} weights, "
          f"{eng.steps_per_call} steps per call, row buckets {list(eng.row_buckets)}")
    try:
        for s in range(args.seeds):
            target = req(20, 7 + s, args.tokens)
            alone_toks, alone_lps = trace(eng.submit(target))
            for companions, prompt_len in COMPANIONS:
                others = [eng.submit(req(prompt_len + 10 * j, 100 + j, 2 * args.tokens))
                          for j in range(companions)]
                toks, lps = trace(eng.submit(target))
                for h in others:
                    trace(h)
                # Logprobs compared while the tokens agree (after that they are other tokens').
                same = first_difference(toks, alone_toks)
                same = min(len(toks), len(alone_toks)) if same is None else same
                max_diff = max((abs(a - b) for a, b in zip(lps[:same], alone_lps[:same])),
                               default=0.0)
                case = {"seed": 7 + s, "beside": companions,
                        "first_token_difference": first_difference(toks, alone_toks),
                        "first_logprob_difference": first_difference(lps, alone_lps),
                        "max_logprob_difference": max_diff}
                rec["cases"].append(case)
                print(f"  seed {case['seed']}, beside {companions}: tokens "
                      f"{_where(case['first_token_difference'])}, logprobs "
                      f"{_where(case['first_logprob_difference'])} "
                      f"(max |difference| while the tokens agree {max_diff:.3g})")
    finally:
        eng.close()
    rec["invariant"] = all(c["first_token_difference"] is None
                           and c["first_logprob_difference"] is None for c in rec["cases"])
    print(f"batch invariant: {rec['invariant']}")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
