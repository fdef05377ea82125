"""The `qwen-jax serve` and `qwen-jax generate` commands: find and load a model (hub.py,
weights.py, tokenizer.py), build and warm up its engine, then serve the API (server.py's app on
httpd.py's server) until Ctrl-C or SIGTERM, or answer one prompt.

Side effects live here, at the edge: files, the listening socket, stdout and stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_jax.cors import LOCAL, CorsPolicy, parse_origins
from qwen_jax.httpd import connection_limit, make_server
from qwen_jax.quantize import is_quantized, quantize_option
from qwen_jax.server import make_app

log = logging.getLogger("qwen_jax.server")  # one log for the server, app and HTTP alike

DEMO_MAX_MODEL_LEN = 4096
REAL_MAX_MODEL_LEN = 8192
# How long `serve` waits, when it stops, for the replies of the requests it ended to be written.
SHUTDOWN_WRITE_S = 2.0
# JAX's warning for each compilation cache entry it cannot read (_report_warnings).
_UNREADABLE_ENTRY = "Error reading persistent compilation cache"


@dataclass
class LoadedModel:
    path: Path
    served_name: str
    is_demo: bool


def _fail(message: str) -> int:
    print(f"qwen-jax: error: {message}", file=sys.stderr)
    return 2


def resolve_model(model: str | None) -> LoadedModel:
    """--model -> a checkpoint dir (raises hub.ModelNotFoundError with the download command)."""
    from qwen_jax import hub

    if model is None:
        found = hub.find_in_cache(hub.DEFAULT_MODEL_ID)
        if found is not None:
            return LoadedModel(found, hub.DEFAULT_MODEL_ID, False)
        model = "demo"
    if model == "demo":
        from qwen_jax.demo import ensure_demo_checkpoint

        return LoadedModel(ensure_demo_checkpoint(), "demo", True)
    path = hub.resolve_model_dir(model)
    return LoadedModel(path, hub.served_name_for(path), False)


def _demo_banner(model_arg: str | None, serving: bool = True) -> str:
    from qwen_jax import hub

    why = "no --model given and Qwen2.5-7B-Instruct is not in the local HF cache; " if (
        model_arg is None) else ""
    what = "serving random weights" if serving else "random weights"
    return (
        "=" * 78 + "\n"
        f"  DEMO MODEL: {why}{what}.\n"
        "  Its output is NOISE (the tokenizer and chat template are real).\n"
        "  To serve real weights:\n"
        f"      {hub.download_command(hub.DEFAULT_MODEL_ID)}\n"
        f"      qwen-jax serve --model {hub.DEFAULT_MODEL_ID}\n" + "=" * 78
    )


def kv_cache_bytes(cfg: Any, max_len: int, slots: int, itemsize: int) -> int:
    """Bytes of the static KV cache: keys and values for every layer, slot and position."""
    return 2 * cfg.num_hidden_layers * slots * max_len * cfg.num_key_value_heads * (
        cfg.head_dim * itemsize
    )


def _cpu_plan_note() -> str:
    """For the start-up line on the CPU: which matmul plan serves (speed depends on it)."""
    import jax

    from qwen_jax.cpu_matmul import cpu_plan

    if jax.default_backend() != "cpu":
        return ""
    return f"; CPU matmul plan {cpu_plan().name} (QWEN_JAX_CPU_MATMUL overrides)"


def batch_invariance_note(dtype: str, quantized: bool, max_slots: int,
                          backend: str | None = None) -> str:
    """A warning for the start-up output when a seeded request may decode differently alone
    than in a busy batch with these settings ("" when it may not): float32 weights on the CPU,
    more rows than the CPU plan keeps invariant (cpu_matmul.py), and on an accelerator any
    decode program with fewer rows than max_slots (engine.default_row_buckets: int8's one-row
    program), since its products round differently by row count."""
    import jax

    from qwen_jax.cpu_matmul import cpu_plan
    from qwen_jax.engine import default_row_buckets

    backend = backend or jax.default_backend()
    why = ""
    if backend != "cpu":
        fewer = default_row_buckets(max_slots, quantized, backend)
        if fewer:
            why = (f"decode calls of {fewer} rows as well as {max_slots}"
                   + (" (int8 weights' one-row product)" if quantized else ""))
    elif dtype == "float32" and not quantized:
        why = "float32 weights: XLA multiplies one row and several by different products " \
              "(--dtype bfloat16 keeps them invariant)"
    else:
        rows = cpu_plan().invariant_rows(quantized)
        if rows is not None and max_slots > rows:
            why = (f"--max-num-seqs {max_slots} is over the {rows} rows that the "
                   f"{cpu_plan().name} CPU matmul plan multiplies alike")
    if not why:
        return ""
    return f"note: a seeded request's tokens can depend on the other requests in its batch: {why}"


def choose_dtype(requested: str) -> str:
    """Resolve `--dtype auto`: bfloat16 everywhere, the dtype Qwen2.5 checkpoints ship in and
    the one whose CPU decode is batch-invariant (float32's is not: batch_invariance_note). It
    was float32 on AVX2-only CPUs, for a faster prefill that a same-session measurement no
    longer showed (benchmarks/README.md: float32 is faster there only for many streams)."""
    return "bfloat16" if requested == "auto" else requested


def _load(args: Any):
    import jax.numpy as jnp

    from qwen_jax.config import load_config
    from qwen_jax.generation_config import load_generation_defaults
    from qwen_jax.jinja_template import choose_renderer
    from qwen_jax.tokenizer import load_tokenizer
    from qwen_jax.weights import load_checkpoint

    model = resolve_model(args.model)
    quantize = quantize_option(getattr(args, "quantize", None))
    cfg = load_config(model.path)
    if getattr(args, "generation_config", "off") != "off":  # read before the weights: fail fast
        args.sampling_defaults = load_generation_defaults(model.path)
    args.render_prompt, args.chat_template_note = choose_renderer(
        model.path, getattr(args, "chat_template", "auto"))
    args.dtype = choose_dtype(args.dtype)
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    tokenizer = load_tokenizer(model.path)  # before the weights: a missing one fails at once
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{model.path}: the tokenizer has {tokenizer.vocab_size} tokens, more "
                         f"than the model's vocab_size {cfg.vocab_size}: not its tokenizer")
    cfg, params = load_checkpoint(model.path, dtype, quantize=quantize)
    return model, cfg, params, tokenizer, dtype


def _load_or_report(args: Any):
    """_load, with a one-line error on stderr (no traceback) and None when loading fails."""
    from qwen_jax import hub

    try:
        return _load(args)
    except hub.ModelNotFoundError as e:
        _fail(str(e))
    except (OSError, ValueError) as e:
        hint = ""
        if args.model is None and hub.find_in_cache(hub.DEFAULT_MODEL_ID) is not None:
            # Picked without being asked for: say where it came from and what else to do.
            hint = (f"\n(no --model given: this is {hub.DEFAULT_MODEL_ID} from the local Hugging "
                    "Face cache, perhaps an incomplete download; complete it with: "
                    f"{hub.download_command(hub.DEFAULT_MODEL_ID)}; or pass --model demo)")
        _fail(f"cannot load the model: {e}{hint}")
    return None


def serve(args: Any) -> int:
    """`qwen-jax serve`: load, build the engine, run the threaded WSGI server until Ctrl-C or
    SIGTERM (cli.py turns it into KeyboardInterrupt)."""
    import jax

    from qwen_jax.engine import (
        check_prefill_chunk,
        default_prefill_chunk,
        default_steps_per_call,
        enable_compilation_cache,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("jax").setLevel(logging.WARNING)  # backend probing is not news
    api_key = args.api_key or os.environ.get("QWEN_JAX_API_KEY") or None
    # Flags that need no model are checked before loading one (which can take minutes).
    steps = getattr(args, "steps_per_call", None)
    steps = default_steps_per_call() if steps is None else steps
    if steps < 1:
        return _fail("--steps-per-call must be at least 1")
    chunk = getattr(args, "prefill_chunk", None)
    try:
        chunk = check_prefill_chunk(default_prefill_chunk() if chunk is None else chunk)
    except ValueError as e:
        return _fail(f"--{e}".replace("_", "-", 1))
    try:
        cors = parse_origins(getattr(args, "allowed_origins", None) or LOCAL)
    except ValueError as e:
        return _fail(str(e))
    cache_dir = getattr(args, "compilation_cache", None)
    if cache_dir == "off":
        jax.config.update("jax_compilation_cache_dir", None)  # also one set by the environment
    else:
        try:
            cache_dir = enable_compilation_cache(cache_dir)
        except OSError as e:
            return _fail(f"--compilation-cache: cannot use {cache_dir or 'the default'}: {e}")
    # The address is taken before loading, which takes minutes at 7B: a bad host or a port in
    # use fails now, and so does a second server started on the same port meanwhile (as vLLM
    # does, clients that connect while it loads wait in the listen queue).
    try:
        server = make_server(_not_ready, args.host, args.port,
                             max_connections=connection_limit())
    except OSError as e:
        return _fail(f"cannot listen on {args.host}:{args.port}: {e}")
    try:
        return _serve_on(server, args, cors, cache_dir, steps, chunk, api_key)
    finally:
        server.server_close()


def _serve_on(server: Any, args: Any, cors: CorsPolicy, cache_dir: Any, steps: int, chunk: int,
              api_key: str | None) -> int:
    """serve, on its bound (not yet serving) socket: load, warm up, serve until Ctrl-C or
    SIGTERM."""
    with warnings.catch_warnings(record=True) as caught:
        # Every unreadable entry counted; other warnings filtered as the process filters them.
        warnings.filterwarnings("always", message=_UNREADABLE_ENTRY)
        started = _start(args, cache_dir, steps, chunk)
    _report_warnings(caught, cache_dir)
    if isinstance(started, int):
        return started
    model, engine, tokenizer, max_len = started
    app = None
    try:  # from here a Ctrl-C or SIGTERM, however early, ends in the same clean stop
        name = args.served_model_name or model.served_name
        defaults = getattr(args, "sampling_defaults", {})
        if defaults:  # as vLLM says it: omitted fields will not mean the API's defaults
            print("default sampling for fields a request omits, from the model's "
                  f"generation_config.json: {_format_defaults(defaults)} (--generation-config off: "
                  "the API's defaults)", flush=True)
        print(f"chat template: {args.chat_template_note}", flush=True)
        app = make_app(engine, tokenizer, name, max_len, api_key, cors=cors,
                       sampling_defaults=defaults, render_prompt=args.render_prompt)
        server.set_app(app)
        host, port = server.server_address[:2]
        print(f"serving {name} on http://{host}:{port}/v1  (auth: "
              f"{'API key required' if api_key else 'none'}; browser pages allowed from: "
              f"{', '.join(cors.origins)})", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        # No new connections; requests still running or waiting end with a 503 (a stream:
        # an error event), which clients can retry, and get a moment to be written.
        log.info("shutting down")
        server.server_close()
        engine.close()
        if app is not None:
            app.wait_idle(SHUTDOWN_WRITE_S)
    return 0


def _start(args: Any, cache_dir: Any, steps: int, chunk: int) -> tuple | int:
    """Load the model and warm up its engine: (model, engine, tokenizer, max_len), or the exit
    status after a one-line error."""
    import jax

    from qwen_jax.engine import Engine, backend_compile_count, cache_hit_count

    loaded = _load_or_report(args)
    if loaded is None:
        return 2
    model, cfg, params, tokenizer, dtype = loaded
    if model.is_demo:
        print(_demo_banner(args.model), flush=True)
    cap = DEMO_MAX_MODEL_LEN if model.is_demo else REAL_MAX_MODEL_LEN
    max_len = args.max_model_len or min(cfg.context_length, cap)
    if max_len < 2:
        return _fail("--max-model-len must be at least 2")
    if max_len > cfg.context_length:  # as vLLM: positions past it were never trained
        return _fail(f"--max-model-len {max_len} is over the model's context of "
                     f"{cfg.context_length} tokens (max_position_embeddings, or with YaRN "
                     "rope_scaling in config.json its original length times its factor)")
    itemsize = 4 if args.dtype == "float32" else 2
    kv = kv_cache_bytes(cfg, max_len, args.max_num_seqs, itemsize)
    print(f"max_model_len {max_len} x {args.max_num_seqs} sequences: KV cache "
          f"{kv / 2**30:.2f} GiB ({args.dtype})"
          + (", int8 weights" if is_quantized(params) else "")
          + f", {steps} decode step{'s' if steps > 1 else ''} per call"
          + (", prefix caching" if getattr(args, "prefix_caching", False) else "")
          + _cpu_plan_note(), flush=True)
    note = batch_invariance_note(args.dtype, is_quantized(params), args.max_num_seqs)
    if note:
        print(note, flush=True)
    print(f"compilation cache: {cache_dir}", flush=True)
    t = time.perf_counter()
    try:
        engine = Engine(params, cfg, max_slots=args.max_num_seqs, max_len=max_len,
                        vocab_limit=tokenizer.vocab_size, queue_size=args.max_queue,
                        steps_per_call=steps, prefill_chunk=chunk,
                        prefix_caching=getattr(args, "prefix_caching", False))
        programs, hits = backend_compile_count(), cache_hit_count()
        engine.warmup()
        programs, hits = backend_compile_count() - programs, cache_hit_count() - hits
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return _fail(f"out of memory for the KV cache ({kv / 2**30:.2f} GiB) and the compiled "
                     "programs: lower --max-model-len or --max-num-seqs")
    print(f"compiled in {time.perf_counter() - t:.1f} s ({programs} programs, {hits} of them "
          "loaded from the compilation cache)", flush=True)
    return model, engine, tokenizer, max_len


def _report_warnings(caught: list[warnings.WarningMessage], cache_dir: Any) -> None:
    """The warnings of loading and warm-up, as they were, but JAX's about unreadable
    compilation cache entries (one per program: a truncated file, a disk error) as one line: JAX
    compiles those programs again but never replaces their entries, so every start pays again."""
    unreadable = 0
    for w in caught:
        if _UNREADABLE_ENTRY in str(w.message):
            unreadable += 1
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if unreadable:
        print(f"warning: {unreadable} entries of the compilation cache {cache_dir} could not be "
              "read (compiled again; they are not replaced): delete that directory to rebuild "
              "it", file=sys.stderr, flush=True)


def _format_defaults(defaults: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in defaults.items())


def _not_ready(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """The app of the socket `serve` binds before loading, until the real one replaces it
    (never called: nothing is served before)."""
    raise AssertionError("not serving yet")


def generate_once(args: Any) -> int:
    """`qwen-jax generate PROMPT`: render one user message, stream a greedy reply to stdout."""
    from qwen_jax.engine import Engine, GenerationRequest
    from qwen_jax.sampler import SamplingParams

    loaded = _load_or_report(args)
    if loaded is None:
        return 2
    model, cfg, params, tokenizer, dtype = loaded
    if model.is_demo:
        print(_demo_banner(args.model, serving=False), file=sys.stderr)
    ids = tokenizer.encode(args.render_prompt([{"role": "user", "content": args.prompt}]))
    context = cfg.context_length
    if len(ids) >= context:
        return _fail(f"the prompt is {len(ids)} tokens; the model's context is {context}, "
                     "which leaves no room for a reply")
    max_tokens = min(args.max_tokens, context - len(ids))  # as the server clamps it
    max_len = min(context, len(ids) + max_tokens + 1)
    engine = Engine(params, cfg, max_slots=1, max_len=max_len, vocab_limit=tokenizer.vocab_size)
    try:
        handle = engine.submit(GenerationRequest(
            prompt_ids=tuple(ids), sampling=SamplingParams(temperature=0.0),
            max_tokens=max_tokens, stop_token_ids=tuple(tokenizer.eos_token_ids)))
        detok = tokenizer.detokenizer(skip_special_tokens=True)
        for ev in handle.events():
            if ev.token is not None and ev.token not in tokenizer.eos_token_ids:
                sys.stdout.write(detok.feed(ev.token))
                sys.stdout.flush()
        sys.stdout.write(detok.finish() + "\n")
    finally:
        engine.close()
    return 0
