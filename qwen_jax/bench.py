"""`qwen-jax bench`: prefill, time to first token, decode speed, memory and compile time.

Everything is measured through the Engine (what the server runs). Unless --no-reference is
given (and if transformers is importable), the same weights are saved as a Hugging Face checkpoint
and the same figures are measured for transformers in a child process, so the two runs do not
share threads or memory; the child runs on the GPU when JAX does (and torch sees one). Prints a
table and writes a JSON record (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPEATS = 3


# ---------------------------------------------------------------------------------------------
# process facts


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (e.g. "VmRSS") in bytes; None where it is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """This process's current resident set size (VmRSS); 0 where /proc is missing."""
    return _proc_status_bytes("VmRSS") or 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def device_memory() -> dict[str, int] | None:
    """The accelerator allocator's figures (bytes in use, peak, limit); None on the CPU, whose
    buffers the process's RSS already counts."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats} or None


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "loadavg": _loadavg()}


def copy_bandwidth(nbytes: int, repeats: int = 5, calls: int = 8) -> float:
    """Bytes per second read and written by a jitted `x + 1` over a float32 array of `nbytes`:
    the best of `repeats` timings of `calls` calls dispatched back to back and waited for once,
    after one untimed call. A bound wants the device's rate, so neither the host's dispatch and
    wait per call nor a slow repeat counts: on an H200, timing each call of 1 GiB alone (the
    median of 5) gave 2.8 TB/s, of 2-4 GiB 3.2-3.8 TB/s, and torch's device copy 4.3."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    add = jax.jit(lambda x: x + 1)
    add(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            y = add(x)
        y.block_until_ready()
        best = min(best, (time.perf_counter() - t) / calls)
    return 2 * x.nbytes / best


def read_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """The device's memory bandwidth in GB/s over a float32 array of `nbytes` (larger than the
    caches): on the CPU the median of `repeats` runs, on an accelerator the best of them. The
    decode bound divides it by the bytes a step reads.

    On the CPU a jitted sum (bytes read). On an accelerator `copy_bandwidth` (bytes read and
    written), as benchmarks/decode_bound.py measures it: XLA's sum reads slower there than a
    decode step does (H200: the sum 2.5 TB/s, the decode step's weight products 3.0-4.4 TB/s,
    `x + 1` 3.2-3.8 TB/s timed a call at a time, torch's device copy 4.3 TB/s). XLA's copy may
    still fall short of the card's: `--bandwidth-gbs` sets the figure instead."""
    import jax
    import jax.numpy as jnp

    if jax.devices()[0].platform != "cpu":  # the buffer is never in this process's RSS
        return copy_bandwidth(nbytes, repeats) / 1e9
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - t)
    held = rss_bytes()
    del x
    # The CPU client frees the buffer a moment after the last call returned (1 in 4 runs still
    # held it when the bench read the RSS before the weights next): wait, at most a second.
    deadline = time.monotonic() + 1.0
    while rss_bytes() > held - nbytes + (64 << 20) and time.monotonic() < deadline:
        time.sleep(0.01)
    return nbytes / statistics.median(times) / 1e9


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--prompt-lengths: integers separated by commas, not {text!r}") from None
    if not lengths or lengths[0] < 2:
        raise SystemExit("--prompt-lengths must be integers >= 2")
    return lengths


# ---------------------------------------------------------------------------------------------
# qwen-jax


def _decode_rate(engine, prompts: list[list[int]], max_tokens: int) -> float:
    """Aggregate decode tokens/s while all `prompts` are in the batch together: between the
    moment the last of them has its first token and the last token of the first to finish
    (requests sent together join a few per engine iteration, so the first ones are a few tokens
    ahead), every decode step carries all of them, so the rate is the rows times the steps the
    first to finish took in that window, over its length.

    One thread per stream blocks on its events, stamping each token as it arrives; with two
    cores, a polling loop would take CPU time from XLA's threads (batch-1 decode measured 22
    instead of 27 tok/s)."""
    import threading

    from qwen_jax.engine import GenerationRequest
    from qwen_jax.sampler import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    handles = [engine.submit(GenerationRequest(tuple(p), greedy, max_tokens)) for p in prompts]
    stamps: list[list[float]] = [[] for _ in handles]

    def read(k: int) -> None:
        for ev in handles[k].events(timeout=600.0):
            if ev.token is not None:
                stamps[k].append(time.perf_counter())

    threads = [threading.Thread(target=read, args=(k,)) for k in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = max(s[0] for s in stamps)
    first_done = min(stamps, key=lambda s: s[-1])
    steps = sum(1 for t in first_done if t > start)
    if steps == 0:
        raise ValueError(f"{max_tokens} decode tokens are too few for {len(prompts)} rows to "
                         "decode together (the first ended before the last joined)")
    return len(prompts) * steps / (first_done[-1] - start)


def bench_jax(params, cfg, lengths: list[int], decode_tokens: int, batch: int,
              steps_per_call: int, prefill_chunk: int | None = None) -> dict[str, Any]:
    import jax

    from qwen_jax.engine import Engine, GenerationRequest, pow2_bucket
    from qwen_jax.sampler import SamplingParams

    rng = np.random.default_rng(0)
    max_len = pow2_bucket(max(lengths) + decode_tokens + 1, 16, 1 << 30)
    out: dict[str, Any] = {"max_len": max_len, "steps_per_call": steps_per_call}

    engine = Engine(params, cfg, max_slots=batch, max_len=max_len, queue_size=batch,
                    steps_per_call=steps_per_call, prefill_chunk=prefill_chunk)
    try:
        t = time.perf_counter()
        # The cache lengths decode reaches (the decode runs start from the shortest prompt; the
        # time-to-first-token requests stop at their first token, sampled after prefill):
        # warmup maps them to its kv_len buckets, so an accelerator compiles only those.
        first = min(lengths)
        reach = range(first, first + decode_tokens + steps_per_call + 1)
        engine.warmup(prompt_lengths=lengths, kv_lens=reach, rows=[1, batch])
        out["compile_s"] = time.perf_counter() - t
        out["compiles"] = engine.stats.compiles
        weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
        kv_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.cache))
        out.update(weight_bytes=weights, kv_cache_bytes=kv_bytes)
        out["rss_after_load_bytes"] = peak_rss_bytes()
        out["peak_rss_reset"] = reset_peak_rss()
        out["device_memory_after_warmup"] = device_memory()

        # Prefill alone: the engine's prefill programs on exactly L tokens (in chunks of
        # engine.prefill_chunk).
        out["prefill"] = {}
        out["prefill_chunk"] = engine.prefill_chunk
        for n in lengths:
            ids = rng.integers(0, cfg.vocab_size, n, dtype=np.int32)
            times = []
            for _ in range(REPEATS):
                t = time.perf_counter()
                engine._prefill_tokens(ids, 0)
                jax.block_until_ready(engine.cache)
                times.append(time.perf_counter() - t)
            s = statistics.median(times)
            out["prefill"][n] = {"seconds": s, "tokens_per_s": n / s}

        # Time to first token through submit -> first event (idle engine).
        out["ttft_s"] = {}
        for n in lengths:
            times = []
            for _ in range(REPEATS):
                prompt = tuple(int(x) for x in rng.integers(0, cfg.vocab_size, n))
                t = time.perf_counter()
                h = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0.0), 1))
                next(h.events())
                times.append(time.perf_counter() - t)
                list(h.events())
            out["ttft_s"][n] = statistics.median(times)

        prompt_len = min(lengths)
        prompts = [[int(x) for x in rng.integers(0, cfg.vocab_size, prompt_len)]
                   for _ in range(batch)]
        for b in sorted({1, batch}):
            rates = [_decode_rate(engine, prompts[:b], decode_tokens) for _ in range(REPEATS)]
            out[f"decode_b{b}_tok_s"] = statistics.median(rates)
            out[f"decode_b{b}_runs_tok_s"] = rates
        out["peak_rss_bytes"] = peak_rss_bytes()
        out["device_memory"] = device_memory()
        out["compiles_after_warmup"] = engine.stats.compiles_after_warmup
    finally:
        engine.close()
    return out


# ---------------------------------------------------------------------------------------------
# transformers (child process)


def bench_transformers(model_dir: str, dtype: str, lengths: list[int], decode_tokens: int,
                       batch: int, threads: int, device: str = "cpu") -> dict[str, Any]:
    """Same figures for transformers: greedy decode with its KV cache, no sampling overhead.
    `device` is "cpu" or "cuda"; on a GPU each timing waits for the GPU to finish."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"  # a CPU-only torch beside JAX on a GPU: still a reference, on the CPU
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    out: dict[str, Any] = {"load_s": time.perf_counter() - t, "threads": threads,
                           "torch": torch.__version__, "device": device}
    if device == "cuda":
        out["device_name"] = torch.cuda.get_device_name()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def randint(shape: tuple[int, int]):
        return torch.randint(0, vocab, shape, generator=g).to(device)

    with torch.inference_mode():
        model(randint((1, 16)))  # first-call overheads
        out["prefill"], out["ttft_s"] = {}, {}
        for n in lengths:
            # Not timed: this shape's first call (a GPU picks its kernels then), as qwen-jax's
            # warm-up ran each of its programs once.
            model(randint((1, n)), use_cache=True, logits_to_keep=1).logits.tolist()
            times = []
            for _ in range(REPEATS):
                ids = randint((1, n))
                t = time.perf_counter()
                logits = model(ids, use_cache=True, logits_to_keep=1).logits
                logits[:, -1].argmax(-1).tolist()  # the first token on the host
                times.append(time.perf_counter() - t)
            s = statistics.median(times)
            out["prefill"][n] = {"seconds": s, "tokens_per_s": n / s}
            out["ttft_s"][n] = s  # prefill + argmax: what its first token costs

        def decode(b: int) -> float:
            ids = randint((b, min(lengths)))
            res = model(ids, use_cache=True, logits_to_keep=1)
            past, tok = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
            tok.tolist()
            t = time.perf_counter()
            for _ in range(decode_tokens - 1):
                res = model(tok, past_key_values=past, use_cache=True)
                past, tok = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
            tok.tolist()  # waits for the last step (a GPU runs ahead of the host)
            return b * (decode_tokens - 1) / (time.perf_counter() - t)

        for b in sorted({1, batch}):
            decode(b)  # not timed: the first decode of b rows (an H200's ran at 1/4-1/3 speed)
            rates = [decode(b) for _ in range(REPEATS)]
            out[f"decode_b{b}_tok_s"] = statistics.median(rates)
            out[f"decode_b{b}_runs_tok_s"] = rates
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def _run_reference(model_dir: str, args: argparse.Namespace, lengths: list[int],
                   device: str) -> dict:
    cmd = [sys.executable, "-m", "qwen_jax.bench", "--reference-child", json.dumps({
        "model_dir": model_dir, "dtype": args.dtype, "lengths": lengths,
        "decode_tokens": args.decode_tokens, "batch": args.batch,
        "threads": os.cpu_count() or 1, "device": device})]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def _build(args: argparse.Namespace):
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if args.model:  # a directory, a hub id in the local cache, or "demo", as for `serve`
        from qwen_jax.hub import ModelNotFoundError
        from qwen_jax.launch import resolve_model
        from qwen_jax.quantize import quantize_option
        from qwen_jax.weights import load_checkpoint

        try:
            path = str(resolve_model(args.model).path)
            cfg, params = load_checkpoint(path, dtype, quantize=quantize_option(args.quantize))
        except (ModelNotFoundError, OSError, ValueError) as e:
            raise SystemExit(f"cannot load --model {args.model}: {e}") from None
        return cfg, params, path
    from qwen_jax.config import PRESETS
    from qwen_jax.model import init_params

    if args.preset not in PRESETS:
        raise SystemExit(f"unknown --preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    cfg = PRESETS[args.preset]
    return cfg, init_params(cfg, jax.random.PRNGKey(0), dtype), None


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:,.2f}{unit}"


def _table(rec: dict[str, Any]) -> str:
    j, r = rec["qwen_jax"], rec.get("transformers") or {}
    batch = rec["batch"]
    rows = []
    for n in rec["prompt_lengths"]:
        rows.append((f"prefill {n} tok (tok/s)", j["prefill"][n]["tokens_per_s"],
                     r.get("prefill", {}).get(str(n), {}).get("tokens_per_s")))
        rows.append((f"time to first token, {n} tok (s)", j["ttft_s"][n],
                     r.get("ttft_s", {}).get(str(n))))
    rows.append(("decode batch 1 (tok/s)", j["decode_b1_tok_s"], r.get("decode_b1_tok_s")))
    if batch != 1:
        rows.append((f"decode batch {batch} (tok/s)", j[f"decode_b{batch}_tok_s"],
                     r.get(f"decode_b{batch}_tok_s")))
    rows.append(("peak RSS (GiB)", j["peak_rss_bytes"] / 2**30,
                 r["peak_rss_bytes"] / 2**30 if "peak_rss_bytes" in r else None))
    weights = f"int8 weights, {rec['dtype']} activations" if rec.get("quantize") else rec["dtype"]
    lines = [f"qwen-jax: {weights}; transformers: {rec['dtype']}",
             f"{'':38s} {'qwen-jax':>12s} {'transformers':>13s} {'ratio':>7s}"]
    for name, a, b in rows:
        ratio = None if not b else (a / b)
        lines.append(f"{name:38s} {_fmt(a):>12s} {_fmt(b):>13s} {_fmt(ratio):>7s}")
    lines.append(f"compile (warm-up) {j['compile_s']:.1f} s, {j['compiles']} programs; "
                 f"compiles after warm-up: {j['compiles_after_warmup']}")
    lines.append(f"batch-1 decode = {rec['bandwidth_fraction_b1']:.0%} of the bandwidth bound "
                 f"({rec['bandwidth_bound_tok_s']:.1f} tok/s at {rec['bandwidth_gbs']:.1f} GB/s, "
                 f"{'measured' if rec['bandwidth_measured'] else 'given'}); "
                 f"batch {batch} / batch 1 = {rec['batch_speedup']:.2f}x")
    if "device_memory_ratio" in rec:  # the weights and the cache live on the accelerator
        peak = j["device_memory"]["peak_bytes_in_use"] / 2**30
        lines.append(f"device memory: peak {peak:.2f} GiB since the process started (making or "
                     f"loading the weights included) = {rec['device_memory_ratio']:.2f}x "
                     f"weights ({j['weight_bytes'] / 2**30:.2f} GiB) + KV cache "
                     f"({j['kv_cache_bytes'] / 2**30:.2f} GiB)")
    else:
        lines.append(f"peak RSS while serving {j['peak_rss_bytes'] / 2**30:.2f} GiB = "
                     f"{rec['memory_ratio']:.2f}x weights ({j['weight_bytes'] / 2**30:.2f} GiB) "
                     f"+ KV cache ({j['kv_cache_bytes'] / 2**30:.2f} GiB); without the "
                     f"{rec['rss_before_weights_bytes'] / 2**30:.2f} GiB the process held before "
                     f"any weights: {rec['memory_ratio_beyond_runtime']:.2f}x")
    if "error" in r:
        lines.append(f"transformers failed: {r['error'][-300:]}")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    lengths = _parse_lengths(args.prompt_lengths)
    if args.json and not Path(args.json).resolve().parent.is_dir():  # before minutes of work
        raise SystemExit(f"--json {args.json}: its directory does not exist")
    if args.decode_tokens < 2 or args.batch < 1:
        raise SystemExit("--decode-tokens must be >= 2 and --batch >= 1")
    steps = getattr(args, "steps_per_call", None)
    if steps is not None and steps < 1:
        raise SystemExit("--steps-per-call must be >= 1")
    if getattr(args, "prefill_chunk", None) is not None:
        from qwen_jax.engine import check_prefill_chunk

        try:
            check_prefill_chunk(args.prefill_chunk)
        except ValueError as e:
            raise SystemExit(f"--{e}".replace("_", "-", 1)) from None
    rec: dict[str, Any] = {"machine": machine(), "preset": None if args.model else args.preset,
                           "model": args.model, "dtype": args.dtype, "prompt_lengths": lengths,
                           "decode_tokens": args.decode_tokens, "batch": args.batch,
                           "time": time.time()}
    # On a GPU the transformers child needs device memory too: JAX takes its buffers as it needs
    # them instead of 75% of the card up front (read when the backend starts, just below).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from qwen_jax.cpu_matmul import cpu_plan
    from qwen_jax.engine import default_steps_per_call
    from qwen_jax.layout import block_wide_weights
    from qwen_jax.quantize import quantize_option, quantize_params

    if steps is None:  # what `serve` takes
        steps = default_steps_per_call()

    rec["machine"]["jax"] = jax.__version__
    rec["machine"]["device"] = jax.devices()[0].device_kind
    if jax.default_backend() == "cpu":
        rec["machine"]["cpu_matmul_plan"] = cpu_plan().name
    # Measured before any weights exist, so its buffer is gone before the memory figures.
    rec["bandwidth_measured"] = args.bandwidth_gbs is None
    rec["bandwidth_gbs"] = (read_bandwidth_gbs() if args.bandwidth_gbs is None
                            else args.bandwidth_gbs)
    rec["quantize"] = quantize_option(args.quantize)
    reference = not args.no_reference
    if reference:
        try:
            import transformers  # noqa: F401
        except ImportError:
            rec["transformers"] = {"error": "transformers is not installed"}
            reference = False
    # What the process holds before any weight (Python, JAX, numpy and their libraries): a cost
    # that does not grow with the model, part of the peak below.
    rec["rss_before_weights_bytes"] = rss_bytes()
    cfg, params, model_dir = _build(args)
    with tempfile.TemporaryDirectory() as tmp:
        if reference and model_dir is None:
            from qwen_jax.weights import save_checkpoint

            # Random weights: transformers gets the same ones, unquantized, in --dtype.
            model_dir = str(save_checkpoint(params, cfg, tmp))
        if not args.model:  # random weights: laid out as load_checkpoint lays out a checkpoint
            params = quantize_params(params) if rec["quantize"] else block_wide_weights(params)
        rec["qwen_jax"] = j = bench_jax(params, cfg, lengths, args.decode_tokens, args.batch,
                                         steps,
                                         getattr(args, "prefill_chunk", None))
        # The child needs the memory more than we do (host memory: JAX's GPU allocator keeps
        # what it took pooled).
        del params
        if reference:
            gpu = jax.default_backend() == "gpu"
            rec["transformers"] = _run_reference(model_dir, args, lengths,
                                                 "cuda" if gpu else "cpu")
    rec["bandwidth_bound_tok_s"] = rec["bandwidth_gbs"] * 1e9 / j["weight_bytes"]
    rec["bandwidth_fraction_b1"] = j["decode_b1_tok_s"] / rec["bandwidth_bound_tok_s"]
    rec["batch_speedup"] = j[f"decode_b{args.batch}_tok_s"] / j["decode_b1_tok_s"]
    rec["memory_ratio"] = j["peak_rss_bytes"] / (j["weight_bytes"] + j["kv_cache_bytes"])
    rec["memory_ratio_beyond_runtime"] = (j["peak_rss_bytes"] - rec["rss_before_weights_bytes"]) / (
        j["weight_bytes"] + j["kv_cache_bytes"])
    if (j.get("device_memory") or {}).get("peak_bytes_in_use"):
        rec["device_memory_ratio"] = j["device_memory"]["peak_bytes_in_use"] / (
            j["weight_bytes"] + j["kv_cache_bytes"])
    rec["machine"]["loadavg_after"] = _loadavg()
    print(_table(rec))
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--reference-child":
        a = json.loads(sys.argv[2])
        print(json.dumps(bench_transformers(a["model_dir"], a["dtype"], a["lengths"],
                                            a["decode_tokens"], a["batch"], a["threads"],
                                            a.get("device", "cpu"))))
    else:
        sys.exit("use `qwen-jax bench`")
