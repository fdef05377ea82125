"""Checkpoint loading and saving: single or sharded files, tied or untied heads, dtypes, errors."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qwen_jax.config import QwenConfig
from qwen_jax.model import forward, init_params
from qwen_jax.weights import CheckpointError, load_checkpoint, save_checkpoint


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb)
    )


def test_loaded_tensors_are_the_checkpoint_tensors(tiny_checkpoint, capsys):
    cfg, params = load_checkpoint(tiny_checkpoint, jnp.float32)
    assert "loading weights" in capsys.readouterr().err  # a progress line on stderr
    raw = load_file(tiny_checkpoint / "model.safetensors")
    assert params.lm_head is None and "lm_head.weight" not in raw
    np.testing.assert_array_equal(params.embed, raw["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params.final_norm, raw["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        np.testing.assert_array_equal(params.layers[i].q_bias,
                                      raw[f"model.layers.{i}.self_attn.q_proj.bias"])
        np.testing.assert_array_equal(params.layers[i].down_proj,
                                      raw[f"model.layers.{i}.mlp.down_proj.weight"])


def test_sharded_checkpoint_equals_unsharded(hf_checkpoint_factory):
    single = hf_checkpoint_factory("untied", tie_word_embeddings=False)
    sharded = hf_checkpoint_factory("untied", tie_word_embeddings=False, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    cfg_a, a = load_checkpoint(single, jnp.float32, progress=False)
    cfg_b, b = load_checkpoint(sharded, jnp.float32, progress=False)
    assert cfg_a == cfg_b and a.lm_head is not None
    assert _leaves_equal(a, b)


def test_bfloat16_load_rounds_each_tensor(tiny_checkpoint):
    _, f32 = load_checkpoint(tiny_checkpoint, jnp.float32, progress=False)
    _, bf16 = load_checkpoint(tiny_checkpoint, jnp.bfloat16, progress=False)
    assert _leaves_equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32), bf16)


@pytest.mark.parametrize("tied", [True, False])
def test_save_then_transformers_loads_the_same_model(tmp_path, tied):
    import torch
    from transformers import Qwen2ForCausalLM

    cfg = QwenConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    params = init_params(cfg, jax.random.PRNGKey(1), jnp.float32)
    save_checkpoint(params, cfg, tmp_path)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 10)).astype(np.int32)
    ours, _ = forward(params, cfg, tokens, np.broadcast_to(np.arange(10), (2, 10)))
    model = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max() < 1e-4
    cfg2, params2 = load_checkpoint(tmp_path, jnp.float32, progress=False)
    assert cfg2 == cfg and _leaves_equal(params, params2)


def test_save_sharded_round_trip(tmp_path):
    cfg = QwenConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2)
    params = init_params(cfg, jax.random.PRNGKey(2), jnp.bfloat16)
    save_checkpoint(params, cfg, tmp_path, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    cfg2, params2 = load_checkpoint(tmp_path, jnp.bfloat16, progress=False)
    assert cfg2 == cfg and _leaves_equal(params, params2)


@pytest.mark.parametrize("first_sharded", [True, False])
def test_saving_again_replaces_the_earlier_weights_for_both_loaders(tmp_path, first_sharded):
    """An earlier save's weight files are removed: left beside the new ones, the index (or the
    single file) of the old save was what one loader or the other read."""
    from transformers import Qwen2ForCausalLM

    cfg = QwenConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    old = init_params(cfg, jax.random.PRNGKey(1), jnp.float32)
    new = init_params(cfg, jax.random.PRNGKey(2), jnp.float32)
    save_checkpoint(old, cfg, tmp_path, max_shard_bytes=50_000 if first_sharded else 4 << 30)
    save_checkpoint(new, cfg, tmp_path, max_shard_bytes=4 << 30 if first_sharded else 50_000)
    files = sorted(p.name for p in tmp_path.glob("model*"))
    assert files == (["model.safetensors"] if first_sharded
                     else [f for f in files if f.startswith("model-")]
                     + ["model.safetensors.index.json"])
    assert _leaves_equal(load_checkpoint(tmp_path, jnp.float32, progress=False)[1], new)
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path)
    np.testing.assert_array_equal(hf.model.embed_tokens.weight.detach().numpy(),
                                  np.asarray(new.embed))


def test_a_single_file_wins_over_an_index_as_in_transformers(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}}))
    cfg, params = load_checkpoint(ckpt, jnp.float32, progress=False)
    assert params.final_norm.shape == (cfg.hidden_size,)


# ---- error cases: a CheckpointError naming the path or tensor, never a bare traceback ----


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_missing_config_and_weights(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path)
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path)


def test_not_qwen2(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "llama",
                                                  "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen2Model"]}))
    with pytest.raises(CheckpointError, match="architectures is"):
        load_checkpoint(ckpt)


def test_missing_tensor(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.1\.self_attn"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("extra", [
    "model.layers.2.mlp.up_proj.weight",  # a layer past num_hidden_layers (2 in the fixture)
    "model.layers.0.self_attn.o_proj.bias",  # a bias Qwen2's o_proj does not have
    "model.layers.1.self_attn.q_norm.weight",  # Qwen3's
])
def test_a_layer_tensor_the_config_does_not_describe_is_refused(tmp_path, tiny_checkpoint,
                                                                extra):
    """The model it belongs to is not the one the config builds (transformers loads it and
    lists it as unexpected): refused, named, rather than run without it."""
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    tensors = load_file(ckpt / "model.safetensors")
    save_file({**tensors, extra: np.ones(4, np.float32)}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"does not describe: {re.escape(extra)}"):
        load_checkpoint(ckpt, progress=False)


def test_other_unexpected_tensors_are_logged_and_rotary_buffers_ignored(tmp_path,
                                                                        tiny_checkpoint, caplog):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    tensors = load_file(ckpt / "model.safetensors")
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
             "score.weight": np.ones(4, np.float32)}
    save_file({**tensors, **extra}, ckpt / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="qwen_jax.weights"):
        cfg, _ = load_checkpoint(ckpt, progress=False)
    warned = [r.getMessage() for r in caplog.records if "does not describe" in r.getMessage()]
    assert len(warned) == 1 and "score.weight" in warned[0] and "inv_freq" not in warned[0]


def test_untied_config_without_lm_head(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_checkpoint(ckpt)


def test_a_tied_config_with_its_own_lm_head_uses_it_as_transformers_does(tmp_path,
                                                                          tiny_checkpoint,
                                                                          caplog):
    """A tied config whose file also holds an lm_head: if it equals the embedding the model
    stays tied; if not, it is the output layer (transformers warns and does not tie them)."""
    import torch
    from transformers import Qwen2ForCausalLM

    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    tensors = load_file(ckpt / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    save_file({**tensors, "lm_head.weight": embed.copy()}, ckpt / "model.safetensors")
    cfg, params = load_checkpoint(ckpt, jnp.float32, progress=False)
    assert cfg.tie_word_embeddings and params.lm_head is None

    head = (np.random.default_rng(0).normal(size=embed.shape) * 0.02).astype(embed.dtype)
    save_file({**tensors, "lm_head.weight": head}, ckpt / "model.safetensors")
    cfg, params = load_checkpoint(ckpt, jnp.float32, progress=False)
    assert not cfg.tie_word_embeddings and np.array_equal(params.lm_head, head)
    assert any("differs from the embedding" in r.getMessage() for r in caplog.records)
    ids = np.array([[1, 5, 9, 3, 7]], np.int32)
    ours = np.asarray(forward(params, cfg, ids, np.arange(5, dtype=np.int32)[None])[0])
    ref = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stored", [np.int32, np.int8])
def test_weights_stored_as_integers_are_refused(tmp_path, tiny_checkpoint, stored):
    """Integer (or 8-bit float) tensors are packed or quantized data, not weights to cast."""
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].astype(stored)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj\.weight is stored as I(32|8); only F32"):
        load_checkpoint(ckpt)


def test_shape_mismatch(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight has shape \(160, 64\)"):
        load_checkpoint(ckpt)


def test_a_weight_file_linked_to_nothing_says_so(tmp_path, tiny_checkpoint,
                                                hf_checkpoint_factory):
    """The HF cache links a snapshot's files to blobs; a dangling link (interrupted download,
    cleaned cache) was reported as no weights at all, or as a missing shard."""
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(tmp_path / "blobs" / "0123abcd")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a link to .*0123abcd, "
                                              "which does not exist: an incomplete download"):
        load_checkpoint(ckpt, progress=False)
    sharded = _copy(hf_checkpoint_factory("untied", tie_word_embeddings=False,
                                          max_shard_size="200KB"), tmp_path / "s")
    shard = sorted(sharded.glob("model-*-of-*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to(tmp_path / "blobs" / "4567")
    with pytest.raises(CheckpointError, match=f"{re.escape(shard.name)} is a link to .*4567"):
        load_checkpoint(sharded, progress=False)
    # A dangling index beside a whole model.safetensors is not read (transformers' order).
    whole = _copy(tiny_checkpoint, tmp_path / "w")
    (whole / "model.safetensors.index.json").symlink_to(tmp_path / "blobs" / "89ab")
    load_checkpoint(whole, progress=False)


def test_index_naming_a_missing_shard(tmp_path, hf_checkpoint_factory):
    sharded = hf_checkpoint_factory("untied", tie_word_embeddings=False, max_shard_size="200KB")
    ckpt = _copy(sharded, tmp_path / "c")
    victim = sorted(ckpt.glob("model-*-of-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("weight_map", [[1, 2], "model.safetensors", {"model.norm.weight": 5}])
def test_a_malformed_index_is_a_checkpoint_error(tmp_path, tiny_checkpoint, weight_map):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_checkpoint(ckpt)


def test_corrupt_safetensors(tmp_path, tiny_checkpoint):
    ckpt = _copy(tiny_checkpoint, tmp_path / "c")
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt)


def test_unsupported_dtype(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="dtype"):
        load_checkpoint(tiny_checkpoint, jnp.int8)


def test_a_device_error_while_loading_is_not_reported_as_a_bad_checkpoint(tiny_checkpoint,
                                                                          monkeypatch):
    """Running out of device memory mid-load says so; it is not the checkpoint's fault."""
    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")

    monkeypatch.setattr(jnp, "asarray", out_of_memory)
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        load_checkpoint(tiny_checkpoint, jnp.float32, progress=False)


_LOAD_PEAK = """
import json, sys
import jax, jax.numpy as jnp
from qwen_jax.bench import peak_rss_bytes, reset_peak_rss, rss_bytes
from qwen_jax.weights import load_checkpoint
jnp.zeros(1).block_until_ready()  # the CPU client's own memory, before the baseline
start = rss_bytes()
assert reset_peak_rss()
_, params = load_checkpoint(sys.argv[1], jnp.bfloat16, progress=False)
weights = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps([start, peak_rss_bytes(), weights]))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="measures peak RSS through Linux's /proc")
def test_loading_holds_the_weights_once(tmp_path):
    """On the CPU the device is host memory: loading must not hold a host copy of the weights
    besides the device one. Each tensor is read, copied and its host copy and file pages let go
    before the next. (Before: 2.05x the weights at the 0.5B shape, the host copies kept alive by
    jaxlib's deferred release until a garbage collection, the file mapped throughout.)"""
    # Intermediate 3584: no weight wider than the AVX2 plan stores as blocks (a compile mid-load).
    cfg = QwenConfig(vocab_size=32768, hidden_size=1024, intermediate_size=3584,
                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                     tie_word_embeddings=False)
    save_checkpoint(init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16), cfg, tmp_path)
    out = subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    start, peak, weights = json.loads(out.stdout.strip().splitlines()[-1])
    assert weights > 200e6
    assert peak - start < 1.3 * weights, (peak - start) / weights
