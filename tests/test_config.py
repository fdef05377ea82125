"""Config parsing: released Qwen2.5 config.json files, transformers-5 `rope_parameters`, presets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen_jax.config import PRESETS, ConfigError, QwenConfig, YarnScaling, load_config

# The released Qwen/Qwen2.5-7B-Instruct config.json (transformers 4.x form).
QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
}
YARN_4X = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}

# Parameter counts Qwen publishes for the Qwen2.5 sizes (billions): an independent check of the
# preset numbers.
PUBLISHED_BILLIONS = {"0.5b": 0.49, "1.5b": 1.54, "3b": 3.09, "7b": 7.61, "14b": 14.7,
                      "32b": 32.5, "72b": 72.7}


def test_released_7b_config_parses_to_the_preset():
    cfg = QwenConfig.from_hf_dict(QWEN25_7B_INSTRUCT)
    assert cfg == PRESETS["7b"]
    assert cfg.head_dim == 128 and cfg.num_groups == 7 and cfg.rope_scaling is None


def test_yarn_in_rope_scaling_form():
    cfg = QwenConfig.from_hf_dict({**QWEN25_7B_INSTRUCT, "rope_scaling": YARN_4X})
    assert cfg.rope_scaling == YarnScaling(factor=4.0, original_max_position_embeddings=32768)
    # The context YaRN opens, as vLLM derives it (Qwen2.5's documented 131,072 tokens).
    assert cfg.context_length == 131072 and cfg.max_position_embeddings == 32768
    assert QwenConfig.from_hf_dict(QWEN25_7B_INSTRUCT).context_length == 32768
    assert cfg.rope_theta == 1e6


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
     "rope_theta": 1e6},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
     "rope_theta": 1e4, "beta_fast": 16, "beta_slow": 2, "truncate": False},
])
def test_transformers5_rope_parameters_form(tmp_path, rope):
    """What transformers 5 writes with save_pretrained (`rope_parameters`) is read back the same."""
    from transformers import Qwen2Config

    hf = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(rope),
                     max_position_embeddings=256)
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_theta" not in written
    cfg = load_config(tmp_path)
    assert cfg.rope_theta == rope["rope_theta"]
    if rope["rope_type"] == "default":
        assert cfg.rope_scaling is None
    else:
        s = cfg.rope_scaling
        assert (s.factor, s.original_max_position_embeddings) == (
            rope["factor"], rope["original_max_position_embeddings"])
        assert (s.beta_fast, s.beta_slow) == (rope.get("beta_fast", 32), rope.get("beta_slow", 1))
        assert s.truncate == rope.get("truncate", True)
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (64, 2, 100)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_hf_dict_and_transformers(name):
    from transformers import Qwen2Config

    cfg = PRESETS[name]
    assert QwenConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    hash(cfg)  # a static jit argument must be hashable
    hf = Qwen2Config.from_dict(cfg.to_hf_dict())  # transformers reads what we write
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_key_value_heads, hf.vocab_size) == (
        cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size)
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta


def test_absent_keys_take_qwen2config_defaults():
    """A config.json may leave these out: rope_theta 10000 (with or without YaRN) and untied
    embeddings, as transformers' Qwen2Config reads the same file."""
    from transformers import Qwen2Config

    d = {k: v for k, v in QWEN25_7B_INSTRUCT.items()
         if k not in ("rope_theta", "tie_word_embeddings")}
    cfg = QwenConfig.from_hf_dict(d)
    hf = Qwen2Config.from_dict(d)
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] == 10000.0
    assert cfg.tie_word_embeddings is hf.tie_word_embeddings is False
    yarn = QwenConfig.from_hf_dict({**d, "rope_scaling": YARN_4X})
    assert yarn.rope_theta == 10000.0 and yarn.rope_scaling.factor == 4.0


@pytest.mark.parametrize("kv", ["absent", None])
def test_no_num_key_value_heads_means_multi_head_attention(kv):
    """Without a key/value head count every query head has its own (Qwen2Config's documented
    fallback, which transformers applies to a null; an absent key there takes its class default
    32, which 28 query heads could not use)."""
    d = {k: v for k, v in QWEN25_7B_INSTRUCT.items() if k != "num_key_value_heads"}
    if kv is None:
        d["num_key_value_heads"] = None
    cfg = QwenConfig.from_hf_dict(d)
    assert cfg.num_key_value_heads == cfg.num_attention_heads == 28 and cfg.num_groups == 1


@pytest.mark.parametrize("beta", [0, None])
def test_yarn_zero_or_null_betas_take_the_defaults(beta):
    """transformers reads `beta_fast or 32`, `beta_slow or 1`: a 0 or null is the default."""
    rope = {**YARN_4X, "beta_fast": beta, "beta_slow": beta}
    s = QwenConfig.from_hf_dict({**QWEN25_7B_INSTRUCT, "rope_scaling": rope}).rope_scaling
    assert (s.beta_fast, s.beta_slow) == (32.0, 1.0)


def test_yarn_round_trip():
    cfg = PRESETS["7b"].replace(
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32768))
    assert QwenConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def _param_count(cfg: QwenConfig) -> int:
    d, f, q = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = 2 * d + (d * q + q) + 2 * (d * kv + kv) + q * d + 3 * d * f
    heads = 1 if cfg.tie_word_embeddings else 2
    return heads * cfg.vocab_size * d + cfg.num_hidden_layers * per_layer + d


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_preset_sizes_match_published_parameter_counts(name):
    billions = _param_count(PRESETS[name]) / 1e9
    assert billions == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.01)


def test_demo_preset_is_small_with_the_real_vocab():
    demo = PRESETS["demo"]
    assert demo.vocab_size == 151936 and demo.tie_word_embeddings
    assert _param_count(demo) < 25e6


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type is 'llama': qwen-jax runs dense Qwen2 / Qwen2.5"),
    ({"model_type": "qwen3"}, "model_type is 'qwen3'"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures is .* dense Qwen2 / Qwen2.5"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "awq-quantized checkpoints"),
    ({"quantization_config": {"quant_method": "gptq"}}, "gptq-quantized .* --quantize int8"),
    ({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 20},
     "use_sliding_window=true: layers 20.. attend through a window of 4096 tokens"),
    ({"use_sliding_window": True, "sliding_window": 64,
      "layer_types": ["full_attention", "sliding_attention"] * 14}, "layers 1.. .* of 64"),
    ({"use_sliding_window": True, "max_window_layers": "x"}, "max_window_layers must be an int"),
    ({"use_sliding_window": True, "sliding_window": 4.5}, "sliding_window must be an integer"),
    ({"use_sliding_window": True, "layer_types": 3}, "layer_types must be a list, got 3"),
    # Two rope blocks that disagree (a 5.x-saved config with Qwen's YaRN block added):
    # transformers would take rope_scaling with rope_theta 10000, silently.
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "rope_scaling": YARN_4X},
     "both rope_parameters .* and rope_scaling .* disagree"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
    ({"rope_scaling": {"type": "yarn"}}, "factor"),
    ({"num_key_value_heads": 5}, "divisible"),
    ({"hidden_size": 84}, "head_dim 3 must be even"),  # 28 heads of 3: half-split RoPE cannot
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": -4}, "hidden_size"),
    ({"vocab_size": None}, "vocab_size"),
    ({"quantization_config": "fp8"}, "^pre-quantized checkpoints"),
    # Nulls and strings name their key (they were TypeErrors and float()'s ValueErrors).
    ({"rms_norm_eps": None}, "rms_norm_eps must be a positive number, got None"),
    ({"rope_theta": "x"}, "rope_theta must be a positive number, got 'x'"),
    ({"rope_scaling": {"type": "yarn", "factor": 0}}, "yarn factor must be a positive number"),
    ({"rope_scaling": {"type": "yarn", "factor": float("nan")}}, "yarn factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": -2, "rope_theta": 1e6}},
     "yarn factor"),
])
def test_rejects_unsupported_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        QwenConfig.from_hf_dict({**QWEN25_7B_INSTRUCT, **change})


def test_rejects_missing_keys_and_bad_files(tmp_path):
    broken = dict(QWEN25_7B_INSTRUCT)
    del broken["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        QwenConfig.from_hf_dict(broken)
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff{}")
    with pytest.raises(ConfigError, match="cannot read .*config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**QWEN25_7B_INSTRUCT, "rope_theta": None}))
    with pytest.raises(ConfigError, match="config.json: rope_theta must be a positive number"):
        load_config(tmp_path)


@pytest.mark.parametrize("change", [
    {"hidden_act": "swish"},  # transformers' ACT2FN["swish"] is SiLU
    {"use_sliding_window": True, "max_window_layers": None},  # null: transformers' 28 layers
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "rope_scaling": None},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
     "rope_scaling": {"type": "default"}},
])
def test_equivalent_spellings_are_the_same_model(change):
    assert QwenConfig.from_hf_dict({**QWEN25_7B_INSTRUCT, **change}) == PRESETS["7b"]


@given(use=st.booleans(), window=st.sampled_from([None, 16, 4096, 32768, 131072]),
       first=st.sampled_from([None, 0, 1, 27, 28, 40]), explicit=st.booleans(),
       yarn=st.booleans())
def test_a_sliding_window_is_refused_exactly_where_transformers_would_slide(use, window, first,
                                                                          explicit, yarn):
    """Accepted configs are the ones in which transformers' Qwen2Config gives no layer a window
    shorter than the context (the model then computes full attention); the others are refused."""
    from transformers import Qwen2Config

    d = {**QWEN25_7B_INSTRUCT, "use_sliding_window": use, "sliding_window": window}
    if first is None:
        del d["max_window_layers"]  # transformers' default: 28
    else:
        d["max_window_layers"] = first
    if explicit:
        d["layer_types"] = ["sliding_attention" if i % 2 else "full_attention"
                            for i in range(28)]
    if yarn:
        d["rope_scaling"] = YARN_4X
    hf = Qwen2Config(**{k: v for k, v in d.items() if k != "layer_types"},
                     **({"layer_types": d["layer_types"]} if explicit and use else {}))
    context = 131072 if yarn else 32768
    slides = hf.sliding_window is not None and hf.sliding_window < context and (
        "sliding_attention" in hf.layer_types)
    if slides:
        with pytest.raises(ConfigError, match="sliding-window attention is not supported"):
            QwenConfig.from_hf_dict(d)
    else:
        assert QwenConfig.from_hf_dict(d).num_hidden_layers == 28


def test_sliding_window_false_is_ignored():
    cfg = QwenConfig.from_hf_dict({**QWEN25_7B_INSTRUCT, "sliding_window": 4096,
                                   "use_sliding_window": False})
    assert cfg == PRESETS["7b"]


@given(heads=st.integers(1, 16), groups=st.integers(1, 8), head_half=st.integers(1, 64),
       layers=st.integers(1, 4), tied=st.booleans())
def test_valid_shapes_round_trip(heads, groups, head_half, layers, tied):
    cfg = QwenConfig(vocab_size=1000, hidden_size=heads * groups * head_half * 2,
                     intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=heads * groups, num_key_value_heads=heads,
                     tie_word_embeddings=tied)
    assert cfg.head_dim == head_half * 2 and cfg.num_groups == groups
    assert QwenConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg
