"""Load and save Hugging Face Qwen2 checkpoints (safetensors, single file or sharded).

Loading reads one tensor at a time, converts it to the target dtype, copies it to the device and
frees the host copy before the next, so peak memory stays near the size of the weights plus one
tensor, on the CPU too, where the device is host memory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from qwen_jax.config import ConfigError, QwenConfig, load_config
from qwen_jax.layout import LINEAR_LAYER_WEIGHTS, maybe_blocks, plain
from qwen_jax.model import LayerParams, Params, layer_shapes
from qwen_jax.quantize import is_quantized, quantize_int8

# Our per-layer leaf name -> the Hugging Face tensor name inside `model.layers.{i}.`
_HF_LAYER_NAMES = {
    "input_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_proj": "self_attn.k_proj.weight",
    "k_bias": "self_attn.k_proj.bias",
    "v_proj": "self_attn.v_proj.weight",
    "v_bias": "self_attn.v_proj.bias",
    "o_proj": "self_attn.o_proj.weight",
    "post_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
_EMBED, _NORM, _LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
_FLOAT_DTYPES = ("F32", "F16", "BF16")  # as safetensors names them
log = logging.getLogger(__name__)
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded (the message names the path or tensor)."""


def _numpy_dtype(dtype: jnp.dtype) -> np.dtype:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    if dtype in (jnp.float32, jnp.float16):
        return np.dtype(dtype)
    raise CheckpointError(f"unsupported parameter dtype {dtype} (use bfloat16, float16, float32)")


def expected_tensors(cfg: QwenConfig) -> dict[str, tuple[tuple[str, int | None], tuple[int, ...]]]:
    """HF tensor name -> ((params leaf, layer index or None), shape) for this config."""
    vd = (cfg.vocab_size, cfg.hidden_size)
    out: dict[str, tuple[tuple[str, int | None], tuple[int, ...]]] = {
        _EMBED: (("embed", None), vd),
        _NORM: (("final_norm", None), (cfg.hidden_size,)),
    }
    if not cfg.tie_word_embeddings:
        out[_LM_HEAD] = (("lm_head", None), vd)
    shapes = layer_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        for leaf, hf in _HF_LAYER_NAMES.items():
            out[f"model.layers.{i}.{hf}"] = ((leaf, i), shapes[leaf])
    return out


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it: `model.safetensors` if there is one,
    else the shards of `model.safetensors.index.json` (transformers' order)."""
    index = model_dir / _INDEX
    if index.is_file() and not (model_dir / _SINGLE).is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        if not (isinstance(weight_map, dict)
                and all(isinstance(f, str) and f for f in weight_map.values())):
            raise CheckpointError(f"{index}: not a valid safetensors index (weight_map must map "
                                  "tensor names to file names)")
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            _check_link(path)
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {index} but missing")
        return files
    single = model_dir / _SINGLE
    if single.is_file():
        try:
            with safe_open(single, framework="numpy") as f:
                return {name: single for name in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{single}: cannot read safetensors header ({e})") from e
    _check_link(single)
    _check_link(index)
    raise CheckpointError(f"{model_dir}: no {_SINGLE} or {_INDEX} (only safetensors is supported)")


def _check_unexpected(model_dir: Path, names: list[str]) -> None:
    """Tensors the config does not describe. In a decoder layer (a layer past
    num_hidden_layers, a bias o_proj does not have, Qwen3's q_norm) they are part of a model
    other than the one the config builds, which would run without them: refused. Others are
    logged (transformers loads both kinds and lists them as unexpected). Old checkpoints' rotary
    `inv_freq` buffers are computed, not weights."""
    names = [n for n in names if not n.endswith("rotary_emb.inv_freq")]
    in_layers = [n for n in names if n.startswith("model.layers.")]
    if in_layers:
        more = f" (and {len(in_layers) - 5} more)" if len(in_layers) > 5 else ""
        raise CheckpointError(
            f"{model_dir}: tensors config.json does not describe: {', '.join(in_layers[:5])}"
            f"{more} (a wrong num_hidden_layers, or not a Qwen2 model?)")
    if names:
        log.warning("%s: ignoring tensors config.json does not describe: %s", model_dir,
                    ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5
                                            else ""))


def _check_link(path: Path) -> None:
    """A weight file that is a link to nothing (the Hugging Face cache links a snapshot's files
    to blobs; an interrupted download or a cleaned cache leaves them dangling)."""
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{path} is a link to {os.readlink(path)}, which does not exist: "
                              "an incomplete download? Download the model again")


class _Progress:
    """A one-line progress report on stderr."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total_bytes, 0, enabled
        self.start = self.last = time.monotonic()

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.5 or self.done == self.total):
            self.last = now
            print(f"\rloading weights: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                  f"({now - self.start:.0f} s)", end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


def _read_tensor(f, path: Path, name: str, shape: tuple[int, ...], np_dtype: np.dtype
                 ) -> np.ndarray:
    """Tensor `name` of an open safetensors file as `np_dtype` (a view of the mapped file where
    no conversion is needed), shape and storage checked."""
    stored_slice = f.get_slice(name)
    found = tuple(stored_slice.get_shape())
    if found != shape:
        raise CheckpointError(f"{path}: tensor {name} has shape {found}, expected {shape}")
    stored = stored_slice.get_dtype()
    if stored not in _FLOAT_DTYPES:  # integer or 8-bit float: not plain weights
        raise CheckpointError(f"{path}: tensor {name} is stored as {stored}; only "
                              f"{', '.join(_FLOAT_DTYPES)} weights are supported")
    return np.asarray(f.get_tensor(name), np_dtype)


def load_checkpoint(
    model_dir: str | Path, dtype: jnp.dtype = jnp.bfloat16, *, progress: bool = True,
    quantize: str | None = None,
) -> tuple[QwenConfig, Params]:
    """Load a local Hugging Face Qwen2 snapshot directory into (config, params) of `dtype`.

    `quantize="int8"` stores the projection matrices and the embedding / lm_head as int8 with
    per-row scales (quantize.py), each quantized as it reaches the device. Otherwise, on the CPU,
    bf16 projection matrices wider than 3584 columns are stored as column blocks (layout.py)."""
    if quantize not in (None, "int8"):
        raise CheckpointError(f"unknown quantization {quantize!r} (supported: int8)")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: checkpoint directory does not exist")
    try:
        cfg = load_config(model_dir)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    np_dtype = _numpy_dtype(dtype)
    expected = expected_tensors(cfg)
    files = _weight_files(model_dir)
    # A tied config whose files still hold an lm_head: read it, and use it if it differs from
    # the embedding, as transformers does (it warns and does not tie them).
    stored_head = cfg.tie_word_embeddings and _LM_HEAD in files
    if stored_head:
        expected[_LM_HEAD] = (("lm_head", None), expected[_EMBED][1])
    missing = [name for name in expected if name not in files]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{model_dir}: missing tensors {', '.join(missing[:5])}{more}")
    _check_unexpected(model_dir, [name for name in files if name not in expected])

    quantized = (*LINEAR_LAYER_WEIGHTS, "embed", "lm_head") if quantize else ()
    linear = (*LINEAR_LAYER_WEIGHTS, "lm_head")

    def finish(leaf: str, arr: jax.Array):
        if leaf in quantized:
            return quantize_int8(arr)
        return maybe_blocks(arr) if leaf in linear else arr

    # Device leaves keyed like `expected`: (leaf, None) for top-level weights, (leaf, i) per
    # layer. One tensor at a time: read (converting to `dtype`), copy to the device, quantize or
    # lay out, drop the host copy; so on the CPU, where the device is host memory, the peak is
    # the weights plus one tensor, not twice the weights.
    leaves: dict[tuple[str, int | None], jax.Array] = {}
    raw: dict[str, jax.Array] = {}  # embed and lm_head, compared before `finish` (stored_head)
    total = sum(int(np.prod(shape)) for _, shape in expected.values()) * np_dtype.itemsize
    bar = _Progress(total, progress)
    for name, ((leaf, layer), shape) in expected.items():
        path = files[name]
        try:
            # Opened per tensor: safe_open maps the whole file, and every page read stays
            # resident (in this process's RSS) until it is closed.
            with safe_open(path, framework="numpy") as f:
                host = _read_tensor(f, path, name, shape, np_dtype)
                # Copied while the file is open (`host` may be a view of its mapping), and
                # waited for: jaxlib frees a host array whose copy is still in flight only at
                # the next garbage collection (a loop of such copies held them all).
                arr = jnp.asarray(host, dtype=dtype).block_until_ready()
                del host
        except CheckpointError:
            raise
        except jax.errors.JaxRuntimeError:  # out of device memory: not the checkpoint's fault
            raise
        except Exception as e:  # corrupt file, unknown dtype, ...
            raise CheckpointError(f"{path}: cannot read tensors ({e})") from e
        bar.update(arr.nbytes)
        if stored_head and leaf in ("embed", "lm_head"):
            raw[leaf] = arr
        else:
            leaves[(leaf, layer)] = finish(leaf, arr)
        del arr
    bar.finish()
    if stored_head:
        if bool(jnp.array_equal(raw["lm_head"], raw["embed"])):
            del raw["lm_head"]
        else:
            log.warning("%s: config.json ties the embeddings, but the checkpoint's lm_head.weight "
                        "differs from the embedding: using it as its own output layer, as "
                        "transformers does", model_dir)
            cfg = cfg.replace(tie_word_embeddings=False)
        for leaf in list(raw):
            leaves[(leaf, None)] = finish(leaf, raw.pop(leaf))

    layers = [LayerParams(**{leaf: leaves.pop((leaf, i)) for leaf in _HF_LAYER_NAMES})
              for i in range(cfg.num_hidden_layers)]
    params = Params(
        embed=leaves.pop(("embed", None)),
        layers=layers,
        final_norm=leaves.pop(("final_norm", None)),
        lm_head=None if cfg.tie_word_embeddings else leaves.pop(("lm_head", None)),
    )
    return cfg, params


def _host_tensor(params: Params, leaf: str, layer: int | None) -> np.ndarray:
    arr = getattr(params, leaf) if layer is None else getattr(params.layers[layer], leaf)
    return np.asarray(plain(arr))


def save_checkpoint(
    params: Params, cfg: QwenConfig, model_dir: str | Path, *, max_shard_bytes: int = 4 << 30
) -> Path:
    """Write config.json + safetensors in Hugging Face names and layout (loadable by transformers).

    Writes one `model.safetensors`, or `model-0000x-of-0000y.safetensors` shards plus
    `model.safetensors.index.json` when the weights exceed `max_shard_bytes`. Each shard is
    materialised on the host only while it is written.
    """
    model_dir = Path(model_dir)
    if (params.lm_head is None) != cfg.tie_word_embeddings:
        raise CheckpointError("params.lm_head must be None exactly when tie_word_embeddings")
    if is_quantized(params):
        raise CheckpointError("int8-quantized params cannot be saved as a Hugging Face checkpoint: "
                              "save the original weights and quantize at load time")
    model_dir.mkdir(parents=True, exist_ok=True)
    dtype = jnp.dtype(params.embed.dtype)
    hf_cfg = {**cfg.to_hf_dict(), "torch_dtype": str(dtype)}
    (model_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")

    expected = expected_tensors(cfg)
    shards: list[list[str]] = [[]]
    size = total = 0
    for name, (_, shape) in expected.items():
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
        total += nbytes

    # Weight files of an earlier save that this one does not overwrite would be loaded in its
    # place (by transformers or by this loader, depending on which files remain).
    stale = [model_dir / _INDEX, model_dir / _SINGLE, *model_dir.glob("model-*-of-*.safetensors")]
    for path in stale:
        path.unlink(missing_ok=True)
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        fname = _SINGLE if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _host_tensor(params, *expected[name][0]) for name in names}
        save_file(tensors, model_dir / fname, metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (model_dir / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return model_dir
