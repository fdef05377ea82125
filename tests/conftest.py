"""Shared fixtures: reference files from ../shared and small transformers checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from qwen_jax.cpu_matmul import PLANS, CpuMatmulPlan

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"


def path_rows(plan: CpuMatmulPlan) -> list[int]:
    """Row counts at both ends of each of the plan's paths (emitter, padded and unpadded
    YNNPACK, converting matmul)."""
    top = plan.dot_max_rows or 130
    rows = {1, plan.matvec_max_rows, plan.matvec_max_rows + 1, plan.dot_min_rows - 1,
            plan.dot_min_rows, top, top + 1}
    return sorted(r for r in rows if r >= 1)


def distinct_plans(*fields: str) -> list[str]:
    """One plan name (the first in order) for each distinct value of these plan fields: the
    other plans would repeat a test that reads only those fields."""
    first: dict[tuple, str] = {}
    for name, plan in sorted(PLANS.items()):
        first.setdefault(tuple(getattr(plan, f) for f in fields), name)
    return sorted(first.values())


# Plans that differ in how they multiply int8 weights: what int8 tests run under.
INT8_PLANS = distinct_plans("int8_dot_int8_max_rows", "int8_matvec_max_rows", "int8_dot_bf16",
                            "column_blocks")
# Plans that differ in how they multiply a long (512-row) bf16 prompt and lay out its weights.
PREFILL_PLANS = distinct_plans("dot_max_rows", "column_blocks")

# (plan name, rows) pairs covering every bf16 product path of every CPU plan.
PLAN_ROWS = [(name, rows) for name, plan in PLANS.items() for rows in path_rows(plan)]


# Shapes of the small random checkpoints the tests compare against transformers.
TINY_HF_CONFIG = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    """Path of ../shared/reference; tests that need it are skipped on a clone without it."""
    if not SHARED_REFERENCE.is_dir():
        pytest.skip(f"{SHARED_REFERENCE} is absent (a fresh clone without ../shared)")
    return SHARED_REFERENCE


def build_hf_checkpoint(
    path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides
) -> Path:
    """Write a random-weight Qwen2ForCausalLM (float32) with transformers' save_pretrained."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{**TINY_HF_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.float32).eval()
    # transformers initialises biases to zero and RMSNorm weights to one; random values make the
    # q/k/v-bias path and every norm's scale (input, post-attention, final) testable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def hf_checkpoint_factory(tmp_path_factory) -> Callable[..., Path]:
    """Build (and cache per session) random transformers checkpoints: factory(name, **overrides)."""
    built: dict[str, Path] = {}

    def factory(name: str = "tiny", seed: int = 0, max_shard_size: str | None = None, **overrides):
        key = json.dumps([name, seed, max_shard_size, overrides], sort_keys=True, default=str)
        if key not in built:
            path = tmp_path_factory.mktemp(f"ckpt-{name}")
            built[key] = build_hf_checkpoint(path, seed, max_shard_size, **overrides)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def tiny_checkpoint(hf_checkpoint_factory) -> Path:
    return hf_checkpoint_factory("tiny")


# ------------------------------------------------------------------------------------------------
# The real Qwen2.5 tokenizer and a live `qwen-jax serve` (server engineer's fixtures)

LIVE_API_KEY = "test-key-123"
# Random transformers checkpoint at a tiny shape with the real 151,936-row vocabulary, so the real
# tokenizer, chat template and tool-call tokens all work on it.
SERVED_HF_OVERRIDES = dict(vocab_size=151936, max_position_embeddings=2048)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2.5 tokenizer, built from the base vocabulary (once per session)."""
    from qwen_jax.tokenizer import build_qwen25_tokenizer

    return build_qwen25_tokenizer()


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory, qwen_tokenizer) -> Path:
    """A float32 random Qwen2 checkpoint (transformers-built) + the real tokenizer files."""
    from qwen_jax.tokenizer import save_tokenizer

    path = tmp_path_factory.mktemp("served") / "tiny-qwen"
    build_hf_checkpoint(path, seed=0, **SERVED_HF_OVERRIDES)
    # transformers writes a generation_config.json without the chat stop ids; ours has them.
    (path / "generation_config.json").unlink(missing_ok=True)
    save_tokenizer(qwen_tokenizer, path)
    return path


class LiveServer:
    def __init__(self, proc, base_url: str, api_key: str | None, model: str, log_path: Path):
        self.proc, self.base_url, self.api_key, self.model = proc, base_url, api_key, model
        self.log_path = log_path

    @property
    def host_port(self) -> tuple[str, int]:
        hostport = self.base_url.split("//", 1)[1].split("/", 1)[0]
        host, port = hostport.rsplit(":", 1)
        return host, int(port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(args: list[str], log_path: Path, timeout: float = 300.0):
    """Start `qwen-jax serve ARGS --port 0`; return (process, base URL) once it listens."""
    import os
    import re
    import subprocess
    import sys
    import threading
    import time

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    # One compilation cache per pytest-xdist worker: JAX writes an entry in place, so a server
    # in the other worker could read one half-written.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    env.setdefault("QWEN_JAX_XLA_CACHE",
                   str(Path.home() / ".cache" / "qwen-jax" / f"xla-tests{worker}"))
    log_file = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_jax.cli", "serve", "--host", "127.0.0.1", "--port", "0",
         *args],
        stdout=subprocess.PIPE, stderr=log_file, text=True, env=env, cwd=REPO_ROOT,
    )
    found: dict[str, str] = {}
    ready = threading.Event()

    def pump():  # keep reading stdout so the pipe never fills
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            m = re.search(r"on (http://\S+/v1)", line)
            if m and not ready.is_set():
                found["url"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.5):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start in {timeout} s:\n{log_path.read_text()}")
    if "url" not in found:
        proc.wait(10)
        raise RuntimeError(f"server exited ({proc.returncode}):\n{log_path.read_text()}")
    return proc, found["url"]


@pytest.fixture(scope="session")
def live_server(served_checkpoint, tmp_path_factory):
    """One `qwen-jax serve` subprocess for the whole session (float32, tiny, API key on)."""
    log_path = tmp_path_factory.mktemp("server-log") / "server.log"
    proc, url = start_server(
        # Prompts over 64 tokens (tools, long histories) are prefilled in several chunks.
        ["--model", str(served_checkpoint), "--dtype", "float32", "--max-model-len", "1024",
         "--max-num-seqs", "4", "--max-queue", "2", "--api-key", LIVE_API_KEY,
         "--prefill-chunk", "64"],
        log_path,
    )
    server = LiveServer(proc, url, LIVE_API_KEY, served_checkpoint.name, log_path)
    yield server
    proc.terminate()
    try:
        proc.wait(15)
    except Exception:
        proc.kill()


class ApiTarget:
    def __init__(self, base_url: str, api_key: str | None, model: str):
        self.base_url, self.api_key, self.model = base_url.rstrip("/"), api_key, model


@pytest.fixture(scope="session")
def api_target(request) -> ApiTarget:
    """The server under test: $QWEN_JAX_BASE_URL (+ _API_KEY, _MODEL) or the live test server."""
    import os

    base = os.environ.get("QWEN_JAX_BASE_URL")
    if base:
        return ApiTarget(base, os.environ.get("QWEN_JAX_API_KEY"),
                         os.environ.get("QWEN_JAX_MODEL", "Qwen/Qwen2.5-7B-Instruct"))
    live = request.getfixturevalue("live_server")
    return ApiTarget(live.base_url, live.api_key, live.model)
