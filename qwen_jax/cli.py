"""The `qwen-jax` command: serve the API, run the benchmark, or generate once."""

from __future__ import annotations

import argparse
import signal
import sys

QUANTIZE_HELP = ("int8: weight-only int8 with per-row scales (half the bytes of bf16 per token: "
                 "faster decode, slightly different logits); activations and the KV cache keep "
                 "--dtype (auto: bfloat16)")


def build_parser() -> argparse.ArgumentParser:
    from qwen_jax import __version__

    parser = argparse.ArgumentParser(prog="qwen-jax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI Chat Completions API")
    serve.add_argument(
        "--model",
        default=None,
        help="a local Hugging Face snapshot directory, a hub id found in the local HF cache "
        "(e.g. Qwen/Qwen2.5-7B-Instruct), or 'demo' (random weights, real tokenizer)",
    )
    serve.add_argument("--host", type=_non_empty, default="127.0.0.1",
                       help="the address to listen on (default: %(default)s, this machine "
                       "only; 0.0.0.0: every interface)")
    serve.add_argument("--port", type=_port, default=8000, help="0: any free port")
    serve.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="auto: bfloat16 (batch-invariant decode). float32: twice the memory, slower for "
        "one stream; on CPUs without AVX512-BF16 faster for many streams at once (XLA "
        "converts bf16 weights for their products); a request's tokens can depend on its batch",
    )
    serve.add_argument("--quantize", choices=["none", "int8"], default="none",
                       help=QUANTIZE_HELP)
    serve.add_argument("--served-model-name", type=_non_empty, default=None,
                       help="the model id clients send and /v1/models lists (default: the hub "
                       "id or directory name)")
    serve.add_argument("--api-key", type=_non_empty, default=None,
                       help="require `Authorization: Bearer KEY` (or env QWEN_JAX_API_KEY)")
    serve.add_argument(
        "--allowed-origins", default="local",
        help="web pages that may call the API from a browser (CORS), comma-separated: "
        "'local' (default: localhost, 127.0.0.1, [::1], any port), origins such as "
        "http://192.168.1.5:3000, or '*' for any (vLLM's default)",
    )
    serve.add_argument("--max-model-len", type=_int_at_least(2), default=None,
                       help="tokens per sequence, prompt and reply (default: the model's "
                       "context, at most 8192; 4096 for the demo model)")
    serve.add_argument("--max-num-seqs", type=_positive_int, default=8,
                       help="rows in the running batch (default: %(default)s)")
    serve.add_argument("--max-queue", type=_int_at_least(0), default=64,
                       help="waiting requests before 429 (default: %(default)s)")
    serve.add_argument(
        "--steps-per-call", type=int, default=None,
        help="decode steps per device call (default: 8 on an accelerator, where it saves host "
        "round trips, 1 on the CPU, where only int8 weights under the AVX512-BF16 matmul plan "
        "gain from more, at the cost of memory and warm-up); grammar-constrained rows always "
        "take one step per call",
    )
    serve.add_argument(
        "--compilation-cache", default=None, metavar="DIR|off",
        help="where compiled programs are kept, so that a restart loads them instead of "
        "compiling (default: $QWEN_JAX_XLA_CACHE or ~/.cache/qwen-jax/xla); 'off' compiles at "
        "every start: programs loaded from the cache hold more memory (0.5B shape on a CPU: "
        "2.76 instead of 2.51 GiB after a warm-up of 18 instead of 40 s)",
    )
    serve.add_argument(
        "--prefix-caching", action="store_true",
        help="a free row keeps its last chat's keys and values, and a request that continues "
        "that chat (the next turn) prefills only what is new (usage reports the reused "
        "tokens as prompt_tokens_details.cached_tokens); off by default, as a reused prefix "
        "can change a seeded reply's last bits of logits and so its tokens",
    )
    serve.add_argument(
        "--generation-config", choices=["auto", "off"], default="auto",
        help="auto (default, as vLLM): the sampling fields a request omits (temperature, top_p, "
        "top_k, min_p, repetition_penalty, max_tokens) take the values of the model's "
        "generation_config.json (Qwen2.5-Instruct: temperature 0.7, top_p 0.8, top_k 20, "
        "repetition_penalty 1.05); off: the API's defaults (temperature 1, no top_k, ...)",
    )
    serve.add_argument(
        "--chat-template", default="auto", metavar="auto|builtin|PATH",
        help="how prompts are written: auto (default) renders Qwen2.5-Instruct's template in "
        "Python (chat_template.py) unless the snapshot carries a different one (Qwen2-Instruct, "
        "Qwen2.5-Math, a fine-tune), which is then rendered with Jinja as transformers and vLLM "
        "do; builtin: always Qwen2.5-Instruct's; PATH: a Jinja template file",
    )
    serve.add_argument(
        "--prefill-chunk", type=int, default=None,
        help="prompt tokens per prefill call, a power of two >= 16 (default: 512 on the CPU, "
        "2048 on an accelerator): longer prompts are prefilled in chunks, with decode steps "
        "for other requests in between",
    )

    bench = sub.add_parser("bench", help="measure prefill, time to first token and decode speed")
    bench.add_argument("--model", default=None,
                       help="a checkpoint dir, a hub id in the local HF cache, or demo (default: "
                       "random weights of --preset)")
    bench.add_argument("--preset", default="0.5b", help="config preset for random weights")
    bench.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    bench.add_argument("--quantize", choices=["none", "int8"], default="none",
                       help="int8 weights for qwen-jax; transformers keeps --dtype")
    bench.add_argument("--prompt-lengths", default="128,512")
    bench.add_argument("--decode-tokens", type=int, default=64)
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--no-reference", action="store_true", help="skip transformers")
    bench.add_argument("--json", default=None, help="write the JSON record here")
    bench.add_argument("--bandwidth-gbs", type=_positive_float, default=None,
                       help="memory bandwidth for the decode bound (default: measured, a jitted "
                       "sum over 1 GiB on the CPU, a jitted x + 1 on an accelerator)")
    bench.add_argument("--steps-per-call", type=int, default=None,
                       help="decode steps per compiled call in the engine (default: what "
                       "serve takes)")
    bench.add_argument("--prefill-chunk", type=int, default=None,
                       help="prompt tokens per prefill call in the engine (default: the "
                       "engine's, 512 on the CPU)")

    gen = sub.add_parser("generate", help="render one chat message and generate a reply",
                         description="Render PROMPT as one user message with the chat template "
                         "and stream the model's greedy reply (temperature 0) to stdout.")
    gen.add_argument("prompt", help="the user message")
    gen.add_argument("--model", default=None,
                     help="as serve's --model (default: a cached Qwen2.5-7B-Instruct, else the "
                     "demo model)")
    gen.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                     help="auto: bfloat16")
    gen.add_argument("--quantize", choices=["none", "int8"], default="none", help=QUANTIZE_HELP)
    gen.add_argument("--max-tokens", type=_positive_int, default=64,
                     help="at most this many tokens (default: %(default)s)")
    return parser


def _int_at_least(low: int):
    """An argparse type: an integer >= low (checked before the model loads)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its "invalid ... value" message
    return parse


_positive_int = _int_at_least(1)


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_empty(text: str) -> str:
    """An argparse type refusing "": an unset shell variable (`--api-key "$KEY"`) would
    otherwise turn authentication off, or `--host ""` listen on every interface."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# argparse names a type in its "invalid ... value" message.
_port.__name__ = "port"
_positive_float.__name__ = "number"
_non_empty.__name__ = "value"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (docker stop, systemd, Kubernetes) takes Ctrl-C's way out: `serve` ends the
    # requests it is running with a 503 and exits 0, instead of dying mid-stream.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C while loading or compiling: no traceback
        print("interrupted", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from qwen_jax.launch import serve

        return serve(args) or 0
    if args.command == "bench":
        from qwen_jax.bench import run_bench

        try:
            return run_bench(args) or 0
        except SystemExit as e:  # its checks of the arguments: worded as argparse's errors
            if not isinstance(e.code, str):
                raise
            print(f"qwen-jax bench: error: {e.code}", file=sys.stderr)
            return 2
    from qwen_jax.launch import generate_once

    return generate_once(args) or 0


if __name__ == "__main__":
    sys.exit(main())
