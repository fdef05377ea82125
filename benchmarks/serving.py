"""Serving benchmark: what streaming clients of the HTTP API see when several chat at once.

    python benchmarks/serving.py                     # serves random weights at --preset 0.5b
    python benchmarks/serving.py --model DIR         # serves a Hugging Face snapshot
    python benchmarks/serving.py --url http://127.0.0.1:8000/v1 --model-name NAME
                                                     # any running OpenAI-compatible server

Without --url it starts `qwen-jax serve` (extra flags after `--`) in a child process, on random
weights with the real Qwen2.5 tokenizer unless --model is given. Two scenarios, --rounds each:

- burst C (each C of --concurrency): C streaming requests sent at once. Per request: time to
  first token (TTFT) and time per output token after it (TPOT); together: output tokens/s from
  the first request sent to the last reply done.
- running + burst C (C > 1): one stream generating, then C - 1 requests at once: the longest gap
  between two tokens of the running stream while the others start, and their TTFT.

Each request is one user message of --prompt-words words drawn from a fixed list (the chat
template adds ~30 tokens), greedy, --max-tokens tokens: Qwen2.5's end-of-text and end-of-turn
tokens get a logit bias of -100 so that random weights run to max_tokens. Token counts come from
the server's usage (stream_options.include_usage). The client is the standard library's
http.client in one thread per request, light next to a server on the same cores. Prints a table
and, with --json, writes the figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()
# <|endoftext|> and <|im_end|>: banned so every reply runs to max_tokens.
NO_EOS = {"151643": -100, "151645": -100}


class Target:
    """A server's base URL, its API key and the model to ask for (default: the first one that
    GET /models lists)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None) -> None:
        parts = urlsplit(url.rstrip("/"))
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path, self.api_key = parts.path, api_key
        self.model = model or self._get("/models")["data"][0]["id"]

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _get(self, path: str) -> dict:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        conn.request("GET", self.path + path, headers=self.headers())
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}: {body[:500]!r}")
        return json.loads(body)


def stream_chat(target: Target, seed: int, words: int, max_tokens: int) -> dict:
    """One streamed chat request: its send time, the arrival time of each chunk with text, and
    the completion tokens the server counted."""
    rnd = random.Random(seed)
    text = " ".join(rnd.choice(WORDS) for _ in range(words))
    body = json.dumps({
        "model": target.model, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens, "temperature": 0, "logit_bias": NO_EOS})
    conn = http.client.HTTPConnection(target.host, target.port, timeout=3600)
    sent = time.perf_counter()
    conn.request("POST", f"{target.path}/chat/completions", body, target.headers())
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    stamps, tokens = [], 0
    for line in resp:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    conn.close()
    return {"sent": sent, "stamps": stamps, "tokens": tokens}


def _run_all(jobs: list) -> list[dict]:
    """Run stream_chat(*job) for every job, each in its own thread, started together."""
    out: list = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = stream_chat(*jobs[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _ttft(r: dict) -> float:
    return r["stamps"][0] - r["sent"]


def _tpot(r: dict) -> float | None:
    s = r["stamps"]
    return (s[-1] - s[0]) / (r["tokens"] - 1) if r["tokens"] > 1 and len(s) > 1 else None


def burst(target: Target, c: int, words: int, max_tokens: int, seed: int) -> dict:
    """c requests at once."""
    t = time.perf_counter()
    rs = _run_all([(target, seed + i, words, max_tokens) for i in range(c)])
    wall = time.perf_counter() - t
    ttft = [_ttft(r) for r in rs]
    tpot = [x for x in map(_tpot, rs) if x is not None]
    return {"concurrency": c, "output_tok_s": sum(r["tokens"] for r in rs) / wall,
            "ttft_mean_s": statistics.mean(ttft), "ttft_max_s": max(ttft),
            "tpot_mean_s": statistics.mean(tpot) if tpot else None}


def running_plus_burst(target: Target, c: int, words: int, max_tokens: int, seed: int,
                       lead_s: float = 2.0) -> dict:
    """One stream generating (3x max_tokens), then c - 1 requests at once after lead_s."""
    first: dict = {}

    def run_first() -> None:
        first.update(stream_chat(target, seed, words, 3 * max_tokens))

    t = threading.Thread(target=run_first)
    t.start()
    time.sleep(lead_s)
    start = time.perf_counter()
    rs = _run_all([(target, seed + i, words, max_tokens) for i in range(1, c)])
    done = time.perf_counter()
    t.join()
    s = [x for x in first["stamps"] if x <= done]
    gaps = [b - a for a, b in zip(s, s[1:]) if b >= start]
    ttft = [_ttft(r) for r in rs]
    return {"concurrency": c, "running_max_gap_s": max(gaps) if gaps else None,
            "ttft_mean_s": statistics.mean(ttft), "ttft_max_s": max(ttft)}


def _random_checkpoint(preset: str, out: Path) -> Path:
    import jax
    import jax.numpy as jnp

    from qwen_jax.config import PRESETS
    from qwen_jax.model import init_params
    from qwen_jax.tokenizer import build_qwen25_tokenizer, save_tokenizer
    from qwen_jax.weights import save_checkpoint

    cfg = PRESETS[preset]
    save_checkpoint(init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16), cfg, out)
    save_tokenizer(build_qwen25_tokenizer(), out)
    return out


def _start_server(model: Path, extra: list[str], timeout: float = 1800.0):
    """`qwen-jax serve` in a child process; (process, base URL) once it listens."""
    import re

    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_jax.cli", "serve", "--model", str(model), "--host",
         "127.0.0.1", "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + timeout
    for line in proc.stdout:  # the server prints its URL once it listens
        m = re.search(r"on (http://\S+/v1)", line)
        if m:
            # Keep draining its output so the pipe never fills.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the server did not start")


def run(target: Target, concurrency: list[int], words: int, max_tokens: int,
        rounds: int) -> dict:
    stream_chat(target, 0, words, 2)  # the server's first request pays no one-time cost here
    out: dict = {"words": words, "max_tokens": max_tokens, "burst": [], "running_plus_burst": []}
    for c in concurrency:
        for k in range(rounds):
            out["burst"].append(burst(target, c, words, max_tokens, seed=1000 * k))
            if c > 1:
                out["running_plus_burst"].append(
                    running_plus_burst(target, c, words, max_tokens, seed=1000 * k + 500))
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_table(res: dict) -> None:
    print(f"{'scenario':<22} {'out tok/s':>9} {'TTFT mean':>9} {'TTFT max':>8} "
          f"{'TPOT ms':>7} {'max gap':>7}")
    for r in res["burst"]:
        tpot = None if r["tpot_mean_s"] is None else 1000 * r["tpot_mean_s"]
        print(f"{'burst ' + str(r['concurrency']):<22} {r['output_tok_s']:9.1f} "
              f"{r['ttft_mean_s']:9.2f} {r['ttft_max_s']:8.2f} {_fmt(tpot):>7} {'-':>7}")
    for r in res["running_plus_burst"]:
        print(f"{'running + burst ' + str(r['concurrency'] - 1):<22} {'-':>9} "
              f"{r['ttft_mean_s']:9.2f} {r['ttft_max_s']:8.2f} {'-':>7} "
              f"{_fmt(r['running_max_gap_s']):>7}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server's base URL (.../v1)")
    ap.add_argument("--model-name", help="the model to ask for (default: the server's first)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--model", help="snapshot directory to serve (default: random weights)")
    ap.add_argument("--preset", default="0.5b", help="shape of the random weights")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("serve_args", nargs="*", help="after --: extra `qwen-jax serve` flags")
    args = ap.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]

    proc, tmp = None, None
    try:
        if args.url:
            target = Target(args.url, args.model_name, args.api_key)
        else:
            model = Path(args.model) if args.model else None
            if model is None:
                tmp = tempfile.TemporaryDirectory(prefix="qwen-jax-serving-")
                model = _random_checkpoint(args.preset, Path(tmp.name) / f"random-{args.preset}")
            t = time.perf_counter()
            proc, url = _start_server(model, args.serve_args)
            print(f"server up in {time.perf_counter() - t:.1f} s at {url}", flush=True)
            target = Target(url)
        res = run(target, concurrency, args.prompt_words, args.max_tokens, args.rounds)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if tmp is not None:
            tmp.cleanup()
    print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
