"""Find a Hugging Face hub model in the local cache, offline, without huggingface_hub.

The cache layout (huggingface_hub's): <cache>/models--<org>--<name>/refs/main holds a revision
hash, and <cache>/models--<org>--<name>/snapshots/<revision>/ holds the files. <cache> is
$HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
~/.cache/huggingface/hub.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

DEFAULT_MODEL_ID = "Qwen/Qwen2.5-7B-Instruct"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelNotFoundError(Exception):
    """Neither a local directory nor in the local HF cache (the message says what to do)."""


def hf_hub_cache(env: Mapping[str, str] | None = None) -> Path:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, else the legacy
    HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub; `~` and `$VAR` expanded, as huggingface_hub does."""
    env = os.environ if env is None else env
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return _expand(env[key], env)
    if env.get("HF_HOME"):
        return _expand(env["HF_HOME"], env) / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    base = _expand(xdg, env) if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _expand(value: str, env: Mapping[str, str]) -> Path:
    """os.path.expandvars (unknown variables left as they are) over `env`, then expanduser."""
    text = re.sub(r"\$(\w+)|\$\{(\w+)\}",
                  lambda m: env.get(m.group(1) or m.group(2), m.group(0)), value)
    return Path(text).expanduser()


def download_command(repo_id: str) -> str:
    return f"huggingface-cli download {repo_id}   (or: hf download {repo_id})"


def find_in_cache(repo_id: str, cache: Path | None = None) -> Path | None:
    """The snapshot directory of `repo_id` (via refs/main), or None when it is not cached."""
    cache = hf_hub_cache() if cache is None else cache
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    # No usable refs/main (e.g. downloaded by revision): take the newest complete snapshot.
    if snapshots.is_dir():
        done = [d for d in snapshots.iterdir() if (d / "config.json").is_file()]
        if done:
            return max(done, key=lambda d: d.stat().st_mtime)
    return None


def hub_id_from_path(path: Path) -> str | None:
    """'Org/Name' when `path` is a snapshot inside an HF cache (models--Org--Name/snapshots/rev)."""
    parts = Path(path).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return parts[i][len("models--") :].replace("--", "/", 1)
    return None


def served_name_for(path: Path) -> str:
    """Default served model name: the hub id of a cached snapshot, else the directory name."""
    return hub_id_from_path(path) or Path(path).resolve().name


def resolve_model_dir(model: str, cache: Path | None = None) -> Path:
    """A local model directory, or a hub id resolved from the local cache.

    Raises ModelNotFoundError with the command that downloads the model.
    """
    if not model.strip():  # Path("") is the working directory
        raise ModelNotFoundError(f"--model is empty: give a snapshot directory, a hub id like "
                                 f"{DEFAULT_MODEL_ID} or 'demo'")
    path = Path(model).expanduser()
    if path.is_dir() and path.name.startswith("models--") and not (path / "config.json").exists():
        # A model's folder in the Hugging Face cache (models--Org--Name): its snapshot.
        repo_id = path.name[len("models--"):].replace("--", "/", 1)
        found = find_in_cache(repo_id, path.parent)
        if found is None:
            raise ModelNotFoundError(f"{path} is a Hugging Face cache folder with no complete "
                                     f"snapshot: download it with {download_command(repo_id)}")
        return found
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model dir")
        return path
    if path.exists():
        raise ModelNotFoundError(f"--model {model!r} is a file: give the snapshot directory that "
                                 "holds config.json")
    if _HUB_ID.match(model):
        found = find_in_cache(model, cache)
        if found is not None:
            return found
        where = hf_hub_cache() if cache is None else cache
        raise ModelNotFoundError(
            f"{model} is neither a local directory nor in the local Hugging Face cache "
            f"({where}); nothing is downloaded automatically. Download it with:\n"
            f"    {download_command(model)}"
        )
    raise ModelNotFoundError(
        f"--model {model!r} is neither a directory nor a hub id like {DEFAULT_MODEL_ID}"
    )
