"""Shared fixtures: reference files from ../shared and small transformers checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"

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
    # transformers initialises biases to zero; random biases make the q/k/v-bias path testable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
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
