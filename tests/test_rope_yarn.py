"""YaRN frequencies at the edge of the correction range, against transformers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qwen_jax.config import QwenConfig
from qwen_jax.rope import rope_frequencies


@pytest.mark.parametrize(("theta", "original", "beta_slow", "head_dim", "truncate"), [
    (10.0, 1024, None, 16, True),
    (10.0, 1024, None, 16, False),
    (10_000.0, 32768, 1e-5, 128, True),
])
def test_yarn_correction_range_is_clamped_to_the_last_dimension(theta, original, beta_slow,
                                                                head_dim, truncate):
    """A small rope_theta (or beta_slow) puts YaRN's upper correction dimension past head_dim - 1;
    it is clamped there (transformers' find_correction_range), which changes the ramp."""
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": original,
            "rope_theta": theta, "truncate": truncate}
    if beta_slow is not None:
        rope["beta_slow"] = beta_slow

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    # The case reaches the clamp, and the ramp starts inside the frequencies (so it matters).
    assert correction_dim(beta_slow or 1) > head_dim - 1
    assert correction_dim(32) < head_dim // 2 - 1
    hf = Qwen2Config(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2,
                     rope_parameters=rope)
    ref_freq, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf)
    inv_freq, scale = rope_frequencies(QwenConfig.from_hf_dict(hf.to_dict()))
    np.testing.assert_allclose(inv_freq, ref_freq.numpy(), rtol=1e-6)
    assert scale == pytest.approx(ref_scale, rel=1e-12)
