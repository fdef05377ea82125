"""The built-in demo model: built once, deterministic, loadable like any HF snapshot."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_jax import demo


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo.ensure_demo_checkpoint(tmp_path_factory.mktemp("qj-cache") / "demo")


def test_demo_checkpoint_loads_like_a_snapshot(demo_dir):
    import jax
    import jax.numpy as jnp

    from qwen_jax.config import PRESETS
    from qwen_jax.model import init_params
    from qwen_jax.tokenizer import load_tokenizer
    from qwen_jax.weights import load_checkpoint

    cfg, params = load_checkpoint(demo_dir, jnp.float32)
    preset = PRESETS["demo"]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (
        preset.vocab_size, preset.hidden_size, preset.num_hidden_layers)
    tok = load_tokenizer(demo_dir)
    assert tok.vocab_size == 151665 and tok.encode("Hello world") == [9707, 1879]
    assert set(tok.eos_token_ids) == {151645, 151643}
    # Fixed seed: the weights are the ones init_params gives for DEMO_SEED.
    ref = init_params(preset, jax.random.PRNGKey(demo.DEMO_SEED), jnp.float32)
    np.testing.assert_array_equal(np.asarray(params.embed), np.asarray(ref.embed))


def test_demo_is_built_once(demo_dir):
    stamp = (demo_dir / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_demo_checkpoint(demo_dir) == demo_dir
    assert (demo_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_no_model_falls_back_to_demo(demo_dir, tmp_path, monkeypatch):
    from qwen_jax.launch import _demo_banner, resolve_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("QWEN_JAX_CACHE", str(demo_dir.parent))
    model = resolve_model(None)
    assert model.is_demo and model.path == demo_dir
    banner = _demo_banner(None)
    assert "NOISE" in banner and "download Qwen/Qwen2.5-7B-Instruct" in banner


def test_a_broken_cached_default_model_says_where_it_came_from(tmp_path, monkeypatch, capsys):
    """No --model and a Qwen2.5-7B-Instruct snapshot in the HF cache that holds only its
    config (an interrupted download): the error says the model was picked from the cache and
    how to complete it or run the demo instead."""
    import json

    from qwen_jax import cli
    from qwen_jax.config import PRESETS

    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-7B-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text(
        json.dumps(PRESETS["7b"].to_hf_dict()))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cli.main(["generate", "hi", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "no --model given: this is Qwen/Qwen2.5-7B-Instruct from the local Hugging Face" in err
    assert "huggingface-cli download Qwen/Qwen2.5-7B-Instruct" in err and "--model demo" in err
    assert "Traceback" not in err


def test_stale_demo_is_rebuilt(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "build_demo_checkpoint",
                        lambda out: calls.append(out) or (out / demo.MARKER).write_text(
                            __import__("json").dumps(demo._marker())))
    target = tmp_path / "demo"
    target.mkdir()
    (target / demo.MARKER).write_text('{"version": -1}')  # an older build
    assert demo.ensure_demo_checkpoint(target) == target and len(calls) == 1
    assert demo.ensure_demo_checkpoint(target) == target and len(calls) == 1


def test_a_build_finished_by_another_process_first_is_kept(tmp_path, monkeypatch):
    """Two processes building the demo at once (e.g. test workers on a fresh machine): the one
    that finishes second keeps the first build, which may already be in use, and removes its own."""
    target = tmp_path / "demo"

    def build(out):
        (out / demo.MARKER).write_text(__import__("json").dumps(demo._marker()))
        (out / "mine").write_text("")
        target.mkdir()  # meanwhile another process finished its build
        (target / demo.MARKER).write_text((out / demo.MARKER).read_text())
        (target / "theirs").write_text("")

    monkeypatch.setattr(demo, "build_demo_checkpoint", build)
    assert demo.ensure_demo_checkpoint(target) == target
    assert sorted(p.name for p in target.iterdir()) == sorted([demo.MARKER, "theirs"])
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # its own build is removed


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_generate_cli_streams_the_greedy_reply(demo_dir, quantize):
    """`qwen-jax generate` on the demo prints the greedy continuation (computed here with the
    cache-free forward and an argmax over the tokenizer's ids) and the NOISE banner; with
    `--quantize int8`, that of the int8 weights."""
    import os
    import subprocess
    import sys

    import jax
    import jax.numpy as jnp

    from qwen_jax.chat_template import render_chat
    from qwen_jax.model import forward
    from qwen_jax.tokenizer import load_tokenizer
    from qwen_jax.weights import load_checkpoint

    env = {**os.environ, "QWEN_JAX_CACHE": str(demo_dir.parent)}
    out = subprocess.run(
        [sys.executable, "-m", "qwen_jax.cli", "generate", "Hello there", "--model", "demo",
         "--max-tokens", "6", "--dtype", "float32", "--quantize", quantize],
        capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NOISE" in out.stderr

    cfg, params = load_checkpoint(demo_dir, jnp.float32, progress=False,
                                  quantize=None if quantize == "none" else quantize)
    tok = load_tokenizer(demo_dir)
    ids = tok.encode(render_chat([{"role": "user", "content": "Hello there"}]))
    f = jax.jit(forward, static_argnums=1)
    new: list[int] = []
    for _ in range(6):
        seq = np.asarray([ids + new], np.int32)
        logits, _ = f(params, cfg, seq, np.arange(seq.shape[1], dtype=np.int32)[None])
        t = int(np.argmax(np.asarray(logits[0, -1, : tok.vocab_size])))
        if t in tok.eos_token_ids:
            break
        new.append(t)
    assert out.stdout == tok.decode(new, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_serve_and_generate_load_int8_weights_when_asked(demo_dir, monkeypatch, quantize):
    """The loader behind `serve` and `generate` applies --quantize (auto dtype: bf16 with int8)."""
    import argparse

    from qwen_jax.launch import _load
    from qwen_jax.quantize import is_quantized

    monkeypatch.setenv("QWEN_JAX_CACHE", str(demo_dir.parent))
    args = argparse.Namespace(model="demo", dtype="auto", quantize=quantize)
    _, _, params, _, _ = _load(args)
    assert is_quantized(params) == (quantize == "int8")
    if quantize == "int8":
        assert args.dtype == "bfloat16" and params.final_norm.dtype == "bfloat16"


def test_generate_cli_refuses_bad_input_with_one_line(demo_dir, monkeypatch, capsys):
    """No traceback: a max_tokens below 1 is argparse's error, a prompt that fills the
    context is a one-line error; both exit 2."""
    from qwen_jax import cli
    from qwen_jax.config import PRESETS

    monkeypatch.setenv("QWEN_JAX_CACHE", str(demo_dir.parent))
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as e:
            cli.main(["generate", "hi", "--model", "demo", "--max-tokens", bad])
        assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    context = PRESETS["demo"].max_position_embeddings
    code = cli.main(["generate", " a" * context, "--model", "demo", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and f"the model's context is {context}" in err
    assert err.count("\n") <= 12 and "Traceback" not in err  # the banner and one error line


def test_a_tokenizer_larger_than_the_model_is_a_load_error(demo_dir, tiny_checkpoint, tmp_path,
                                                           capsys):
    """Another model's tokenizer beside the weights: refused at load, in one line, before the
    weights are read (it would make every request a 400 blaming the client)."""
    import shutil

    from qwen_jax import cli

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    for f in demo_dir.glob("tokenizer*"):
        shutil.copy(f, model / f.name)
    code = cli.main(["generate", "hi", "--model", str(model), "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "the tokenizer has 151665 tokens, more than the model's vocab_size" in err
    assert "loading weights" not in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["auto", "off"])
def test_serve_reads_the_models_file_before_its_weights_unless_off(
        demo_dir, tmp_path, monkeypatch, flag):
    """`--generation-config auto` puts the file's values in args.sampling_defaults; a broken file
    stops loading before the weights are read; `off` reads nothing."""
    import argparse
    import json
    import shutil

    from qwen_jax import launch
    from qwen_jax.generation_config import GenerationConfigError, load_generation_defaults

    model = tmp_path / "model"
    shutil.copytree(demo_dir, model)
    (model / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [151645, 151643], "temperature": 0.7, "top_p": 0.8, "top_k": 20}))
    args = argparse.Namespace(model=str(model), dtype="auto", quantize="none",
                              generation_config=flag)
    launch._load(args)
    assert getattr(args, "sampling_defaults", {}) == (
        {} if flag == "off" else load_generation_defaults(model))

    (model / "generation_config.json").write_text('{"temperature": 5}')
    loaded = []
    monkeypatch.setattr("qwen_jax.weights.load_checkpoint",
                        lambda *a, **k: loaded.append(1) or (None, None))
    args = argparse.Namespace(model=str(model), dtype="auto", quantize="none",
                              generation_config=flag)
    if flag == "off":
        launch._load(args)
        assert loaded == [1]
    else:
        with pytest.raises(GenerationConfigError, match="temperature"):
            launch._load(args)
        assert loaded == []


def test_serve_renders_a_snapshots_own_template_where_it_differs(demo_dir, tmp_path):
    """The demo snapshot carries Qwen2.5-Instruct's template: the built-in renderer. Given
    Qwen2-Instruct's, `serve` renders that one; `--chat-template builtin` does not."""
    import argparse
    import json
    import shutil

    from qwen_jax import launch
    from qwen_jax.chat_template import render_chat
    from qwen_jax.jinja_template import JinjaChatTemplate

    def load(model, choice):
        args = argparse.Namespace(model=str(model), dtype="auto", quantize="none",
                                  chat_template=choice)
        launch._load(args)
        return args.render_prompt

    assert load(demo_dir, "auto") is render_chat
    model = tmp_path / "model"
    shutil.copytree(demo_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                               "<|im_end|>\n{% endfor %}{{ '<|im_start|>assistant\n' }}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    renderer = load(model, "auto")
    assert isinstance(renderer, JinjaChatTemplate)
    assert renderer([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert load(model, "builtin") is render_chat
