"""Model configuration: a frozen, hashable `QwenConfig` read from a Hugging Face `config.json`.

`QwenConfig` is passed to jitted functions as a static argument, so it must be immutable and
hashable (no dicts or lists inside). Field names follow the Hugging Face Qwen2 config.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that is not a Qwen2 config or that qwen-jax cannot run."""


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rope scaling parameters (names as in transformers' `rope_parameters`)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class QwenConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    rope_scaling: YarnScaling | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ConfigError("rope_theta and rms_norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def context_length(self) -> int:
        """Tokens the model attends over: max_position_embeddings, or with YaRN the original
        context times its factor (as vLLM derives it: Qwen2.5's 32768 x 4 = 131072)."""
        s = self.rope_scaling
        if s is None:
            return self.max_position_embeddings
        return int(s.original_max_position_embeddings * s.factor)

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> QwenConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> QwenConfig:
        """Parse a transformers Qwen2 config dict (released 4.x form or transformers-5 form)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        supported = ("qwen-jax runs dense Qwen2 / Qwen2.5 models (model_type 'qwen2', "
                     "Qwen2ForCausalLM)")
        if model_type != "qwen2":
            raise ConfigError(f"model_type is {model_type!r}: {supported}")
        if archs and "Qwen2ForCausalLM" not in archs:
            raise ConfigError(f"architectures is {archs!r}: {supported}")
        quant = d.get("quantization_config")
        if quant:  # AWQ / GPTQ / FP8 files hold packed or 8-bit tensors the loader cannot read
            method = quant.get("quant_method", "pre") if isinstance(quant, dict) else "pre"
            raise ConfigError(
                f"{method}-quantized checkpoints are not supported (config.json has a "
                "quantization_config): use the unquantized model, with --quantize int8 for "
                "int8 weights")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):  # one function, two names
            raise ConfigError(f"hidden_act {d['hidden_act']!r} is not supported, expected 'silu'")
        head_dim = d.get("head_dim")
        if head_dim is not None and head_dim * d.get("num_attention_heads", 0) != d.get(
            "hidden_size"
        ):
            raise ConfigError("head_dim != hidden_size / num_attention_heads is not supported")

        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise ConfigError(f"config is missing required keys: {', '.join(missing)}")

        theta, scaling = _parse_rope(d)
        cfg = cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            rope_theta=_positive("rope_theta", theta),
            rms_norm_eps=_positive("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            rope_scaling=scaling,
        )
        _check_no_sliding_window(d, cfg)
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict in the released Qwen2.5 form, loadable by transformers 4.x and 5.x."""
        d: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if self.rope_scaling is not None:
            s = {k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if v is not None}
            d["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **s}
        return d


def _check_no_sliding_window(d: dict[str, Any], cfg: QwenConfig) -> None:
    """Refuse a config in which some layer attends through a sliding window shorter than the
    context. As transformers' Qwen2Config reads it: without use_sliding_window there is no
    window; with it, the layers from max_window_layers on slide (or those `layer_types` names),
    over `sliding_window` keys (None: none). No released Qwen2.5 slides."""
    if not d.get("use_sliding_window", False):
        return
    window = d.get("sliding_window", 4096)  # transformers' defaults
    first = d.get("max_window_layers")
    first = 28 if first is None else first
    for key, value in (("sliding_window", window), ("max_window_layers", first)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    types = d.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                     for i in range(cfg.num_hidden_layers)]
    if not isinstance(types, list):
        raise ConfigError(f"layer_types must be a list, got {types!r}")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if window is not None and sliding and window < cfg.context_length:
        raise ConfigError(
            f"use_sliding_window=true: layers {sliding[0]}.. attend through a window of {window} "
            f"tokens, shorter than the context ({cfg.context_length}); sliding-window attention "
            "is not supported (no released Qwen2.5 uses it)")


def _parse_rope(d: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    """rope theta and scaling from `rope_theta`/`rope_scaling` (4.x) or `rope_parameters` (5.x)."""
    new, old = d.get("rope_parameters"), d.get("rope_scaling")
    if new and old and not _same_rope(new, old):
        # transformers 5 would take rope_scaling, with rope_theta 10000 unless it names one.
        raise ConfigError(
            f"config.json has both rope_parameters ({new!r}) and rope_scaling ({old!r}), and "
            "they disagree: keep the one meant and remove the other")
    params = new or old or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters/rope_scaling must be an object, got {params!r}")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))  # transformers' default
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise ConfigError(f"rope type {rope_type!r} is not supported (only 'default' and 'yarn')")
    if "factor" not in params:
        raise ConfigError("yarn rope scaling needs a 'factor'")
    # transformers falls back to max_position_embeddings when the original length is absent.
    original = (params.get("original_max_position_embeddings")
                or d.get("original_max_position_embeddings")
                or d.get("max_position_embeddings") or 32768)
    scaling = YarnScaling(
        factor=_positive("yarn factor", params["factor"]),
        original_max_position_embeddings=int(_positive("original_max_position_embeddings",
                                                       original)),
        # transformers uses `or` here, so 0/None both mean the default.
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        attention_factor=_opt_float(params.get("attention_factor")),
        mscale=_opt_float(params.get("mscale")),
        mscale_all_dim=_opt_float(params.get("mscale_all_dim")),
        truncate=bool(params.get("truncate", True)),
    )
    return theta, scaling


def _same_rope(a: Any, b: Any) -> bool:
    """Whether two rope blocks ask for the same rope: the same type, and the same value for
    every other key both give."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return a == b

    def kind(x: dict) -> Any:
        return x.get("rope_type", x.get("type", "default"))

    shared = (a.keys() & b.keys()) - {"type", "rope_type"}
    return kind(a) == kind(b) and all(a[k] == b[k] for k in shared)


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _positive(name: str, value: Any) -> float:
    """A config number that must be finite and above 0 (a null or a string is an error that
    names the key, not a TypeError from float())."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def read_json_object(path: Path, error: type[Exception]) -> dict | None:
    """The JSON object in the file at `path`, or None if there is no file; `error` when it is not
    readable JSON or not an object (a snapshot's generation_config.json, tokenizer_config.json)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # not UTF-8, not JSON
        raise error(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object")
    return data


def token_content(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object
    with its text under "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_config(model_dir: str | Path) -> QwenConfig:
    """Read `<model_dir>/config.json` (or a config.json path)."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # not UTF-8, not JSON
        raise ConfigError(f"cannot read {path}: {e}") from e
    try:
        return QwenConfig.from_hf_dict(d)
    except (ConfigError, TypeError, ValueError) as e:  # e.g. a size given as a list
        raise ConfigError(f"{path}: {e}") from e


def _qwen25(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int,
            tied: bool) -> QwenConfig:
    return QwenConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, tie_word_embeddings=tied)


# Numbers of the released Qwen2.5-*-Instruct config.json files (rope_theta 1e6, eps 1e-6,
# max_position_embeddings 32768 for all of them).
PRESETS: dict[str, QwenConfig] = {
    "demo": _qwen25(151936, 128, 384, 2, 4, 2, tied=True),
    "0.5b": _qwen25(151936, 896, 4864, 24, 14, 2, tied=True),
    "1.5b": _qwen25(151936, 1536, 8960, 28, 12, 2, tied=True),
    "3b": _qwen25(151936, 2048, 11008, 36, 16, 2, tied=True),
    "7b": _qwen25(152064, 3584, 18944, 28, 28, 4, tied=False),
    "14b": _qwen25(152064, 5120, 13824, 48, 40, 8, tied=False),
    "32b": _qwen25(152064, 5120, 27648, 64, 40, 8, tied=False),
    "72b": _qwen25(152064, 8192, 29568, 80, 64, 8, tied=False),
}
