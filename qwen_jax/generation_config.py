"""The sampling settings a model's makers recommend, from its snapshot's `generation_config.json`.

Qwen2.5-7B-Instruct ships temperature 0.7, top_p 0.8, top_k 20 and repetition_penalty 1.05
there, against the API's defaults of 1, 1, off and 1. vLLM uses the file's values for every
field a request leaves out (its `--generation-config auto`, the default), and so does
`qwen-jax serve` (`--generation-config off`: the API's defaults). As in vLLM, `max_new_tokens`
becomes the default `max_tokens`, and `do_sample` is not read: a file that sets a temperature
means sampling at it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwen_jax.config import read_json_object
from qwen_jax.sampler import SamplingParamError, validate_sampling_params

FILE_NAME = "generation_config.json"
# The file's keys that are request defaults, as vLLM reads them (same names as the API's).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class GenerationConfigError(ValueError):
    """A generation_config.json whose sampling values the server cannot use."""


def load_generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """The request defaults in `<model_dir>/generation_config.json`: the SAMPLING_KEYS it sets
    (not null), checked against the API's ranges, and `max_tokens` from `max_new_tokens`.
    No file: no defaults."""
    path = Path(model_dir) / FILE_NAME
    data = read_json_object(path, GenerationConfigError)
    if data is None:
        return {}
    given = {k: data[k] for k in SAMPLING_KEYS if data.get(k) is not None}
    if isinstance(given.get("top_k"), float) and given["top_k"].is_integer():
        given["top_k"] = int(given["top_k"])  # JSON's 20.0 is the integer 20
    try:
        checked = validate_sampling_params(given)
    except SamplingParamError as e:
        raise GenerationConfigError(f"{path}: {e} (serve --generation-config off ignores "
                                    "the file)") from None
    defaults: dict[str, Any] = {k: getattr(checked, k) for k in given}
    max_new = data.get("max_new_tokens")
    if max_new is not None:
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise GenerationConfigError(f"{path}: max_new_tokens must be a positive integer, "
                                        f"got {max_new!r}")
        defaults["max_tokens"] = max_new
    return defaults
