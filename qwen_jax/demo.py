"""The built-in demo model: random weights at the small `demo` preset, the real Qwen2.5 tokenizer.

It lets `qwen-jax serve` run with nothing downloaded: the API, chat template, tokenizer, tool
calls and constrained decoding all behave as with real weights, but the text is noise. It is built
once (fixed seed, so every machine gets the same weights) into a cache directory that looks like a
Hugging Face snapshot: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEMO_SEED = 0
DEMO_PRESET = "demo"
# Bump when the demo's contents change so old caches are rebuilt.
DEMO_VERSION = 2  # 2: init_params draws per-layer keys (list-of-layers params)
MARKER = "qwen-jax-demo.json"


def demo_cache_dir() -> Path:
    """$QWEN_JAX_CACHE/demo, else $XDG_CACHE_HOME/qwen-jax/demo, else ~/.cache/qwen-jax/demo."""
    if os.environ.get("QWEN_JAX_CACHE"):
        return Path(os.environ["QWEN_JAX_CACHE"]).expanduser() / "demo"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "qwen-jax" / "demo"


def _marker() -> dict:
    return {"preset": DEMO_PRESET, "seed": DEMO_SEED, "version": DEMO_VERSION}


def _is_complete(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()) == _marker()
    except (OSError, ValueError):
        return False


def build_demo_checkpoint(out: Path) -> Path:
    """Write the demo checkpoint into `out` (float32 on disk; `--dtype` casts at load time)."""
    import jax
    import jax.numpy as jnp

    from qwen_jax.config import PRESETS
    from qwen_jax.model import init_params
    from qwen_jax.tokenizer import build_qwen25_tokenizer, save_tokenizer
    from qwen_jax.weights import save_checkpoint

    cfg = PRESETS[DEMO_PRESET]
    params = init_params(cfg, jax.random.PRNGKey(DEMO_SEED), jnp.float32)
    save_checkpoint(params, cfg, out)
    save_tokenizer(build_qwen25_tokenizer(), out)
    (out / MARKER).write_text(json.dumps(_marker()))
    return out


def ensure_demo_checkpoint(cache_dir: Path | None = None) -> Path:
    """The demo checkpoint's directory, built on first use (atomically: a half-written build
    from an interrupted run is never picked up, and a process that finishes building after
    another one did keeps the first build, which a server may already be reading)."""
    path = demo_cache_dir() if cache_dir is None else Path(cache_dir)
    if _is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=path.parent))
    try:
        build_demo_checkpoint(tmp)
        if _is_complete(path):  # a concurrent builder finished first
            return path
        if path.exists():  # stale (older version) or incomplete
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if not _is_complete(path):  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
