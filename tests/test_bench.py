"""`qwen-jax bench` end to end on the demo shape: both sides measured, the JSON record complete."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from qwen_jax.cpu_matmul import PLANS


def test_bench_measures_qwen_jax_and_transformers_on_the_demo(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "qwen_jax.cli", "bench", "--preset", "demo",
         "--prompt-lengths", "16,40", "--prefill-chunk", "16", "--decode-tokens", "4",
         "--batch", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "compiles after warm-up: 0" in res.stdout
    rec = json.loads(out.read_text())
    assert "error" not in rec["transformers"], rec["transformers"]["error"]
    for side in (rec["qwen_jax"], rec["transformers"]):
        for b in (1, 2):
            runs = side[f"decode_b{b}_runs_tok_s"]
            assert len(runs) == 3 and all(r > 0 for r in runs)
            assert side[f"decode_b{b}_tok_s"] == statistics.median(runs)
        assert side["prefill"]["16"]["tokens_per_s"] > 0 and side["peak_rss_bytes"] > 0
        assert side["prefill"]["40"]["tokens_per_s"] > 0
    j = rec["qwen_jax"]
    assert j["prefill_chunk"] == 16  # 40 tokens: three prefill calls, all warmed up
    assert j["compiles_after_warmup"] == 0
    assert rec["batch_speedup"] == j["decode_b2_tok_s"] / j["decode_b1_tok_s"]
    assert rec["memory_ratio"] == j["peak_rss_bytes"] / (j["weight_bytes"] + j["kv_cache_bytes"])
    # The runtime held before any weight is part of the peak, and the second ratio leaves it out.
    before = rec["rss_before_weights_bytes"]
    assert 0 < before < j["peak_rss_bytes"]
    assert rec["memory_ratio_beyond_runtime"] == (j["peak_rss_bytes"] - before) / (
        j["weight_bytes"] + j["kv_cache_bytes"])
    assert "before any weights" in res.stdout
    # The decode bound uses the bandwidth measured in the run (no figure was given).
    assert rec["bandwidth_measured"] is True and 0.5 < rec["bandwidth_gbs"] < 50_000
    assert rec["bandwidth_bound_tok_s"] == rec["bandwidth_gbs"] * 1e9 / j["weight_bytes"]
    assert f"{rec['bandwidth_gbs']:.1f} GB/s, measured" in res.stdout
    assert rec["machine"]["cpu_matmul_plan"] in PLANS
    # JAX runs on the CPU here, so transformers does too, and the process RSS holds the buffers
    # (an accelerator's allocator figures are recorded only where there is one).
    assert rec["transformers"]["device"] == "cpu" and rec["machine"]["device"] == "cpu"
    assert j["device_memory"] is None and "device_memory_ratio" not in rec


def test_read_bandwidth_is_measured():
    from qwen_jax.bench import read_bandwidth_gbs

    assert 0.5 < read_bandwidth_gbs(64 << 20, repeats=3) < 50_000


def test_copy_bandwidth_is_measured():
    """What the bound uses on an accelerator and decode_bound.py everywhere (bytes/s)."""
    from qwen_jax.bench import copy_bandwidth

    assert 0.5e9 < copy_bandwidth(64 << 20, repeats=3) < 50_000e9


def test_read_bandwidth_frees_its_buffer():
    """The bench records the RSS before any weights right after this measurement: its buffer
    must be gone by then (the CPU client frees it a moment after the last call returns)."""
    from qwen_jax.bench import read_bandwidth_gbs, rss_bytes

    read_bandwidth_gbs(16 << 20, repeats=1)  # compile and warm up the allocator first
    before = rss_bytes()
    read_bandwidth_gbs(512 << 20, repeats=1)
    assert rss_bytes() - before < 128 << 20, (before, rss_bytes())


@pytest.mark.parametrize("flags, message", [
    (["--prefill-chunk", "24"], "--prefill-chunk must be a power of two >= 16, got 24"),
    (["--bandwidth-gbs", "0"], "--bandwidth-gbs: must be a positive number, got 0"),
    (["--json", "no/such/dir/out.json"], "its directory does not exist"),
    (["--model", "no-such-dir"], "cannot load --model no-such-dir: "),
    (["--batch", "0"], "--decode-tokens must be >= 2 and --batch >= 1"),
])
def test_bench_rejects_bad_arguments_before_measuring(flags, message):
    """As argparse's own errors: exit status 2, `qwen-jax bench: error: ...`."""
    res = subprocess.run(
        [sys.executable, "-m", "qwen_jax.cli", "bench", "--preset", "demo", "--no-reference",
         *flags], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "qwen-jax bench: error: " in res.stderr and message in res.stderr
    assert "Traceback" not in res.stderr


def _serving_benchmark():
    """benchmarks/serving.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "serving.py"
    spec = importlib.util.spec_from_file_location("serving_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_serving_benchmark_measures_streams_through_the_api(live_server):
    """benchmarks/serving.py against the live test server: each reply runs to max_tokens (the
    end-of-turn ban holds), one stamp per streamed token, and its figures are consistent."""
    sv = _serving_benchmark()
    target = sv.Target(live_server.base_url, api_key=live_server.api_key)
    assert target.model == live_server.model  # the server's first model, from GET /models
    one = sv.stream_chat(target, 0, 5, 6)
    assert one["tokens"] == 6 and 1 <= len(one["stamps"]) <= 6
    assert one["sent"] < one["stamps"][0] <= one["stamps"][-1]
    res = sv.run(target, [1, 2], words=5, max_tokens=4, rounds=1)
    assert [r["concurrency"] for r in res["burst"]] == [1, 2]
    for r in res["burst"]:
        assert r["output_tok_s"] > 0 and 0 < r["ttft_mean_s"] <= r["ttft_max_s"]
    (both,) = res["running_plus_burst"]
    assert both["concurrency"] == 2 and 0 < both["ttft_mean_s"] <= both["ttft_max_s"]


def test_the_table_gives_device_memory_where_the_weights_live_on_an_accelerator():
    """On an accelerator the memory line is the allocator's peak against weights + KV (the
    process RSS holds none of them); on the CPU it is the RSS."""
    from qwen_jax.bench import _table

    side = {"prefill": {16: {"tokens_per_s": 100.0}}, "ttft_s": {16: 0.1},
            "decode_b1_tok_s": 10.0, "decode_b2_tok_s": 18.0, "peak_rss_bytes": 3 << 30,
            "weight_bytes": 1 << 30, "kv_cache_bytes": 1 << 29, "compile_s": 1.0,
            "compiles": 3, "compiles_after_warmup": 0}
    rec = {"prompt_lengths": [16], "batch": 2, "dtype": "bfloat16", "quantize": None,
           "qwen_jax": side, "bandwidth_fraction_b1": 0.5, "bandwidth_bound_tok_s": 20.0,
           "bandwidth_gbs": 30.0, "bandwidth_measured": True, "batch_speedup": 1.8,
           "memory_ratio": 2.0, "rss_before_weights_bytes": 1 << 29,
           "memory_ratio_beyond_runtime": 1.67}
    cpu = _table(rec)
    assert "peak RSS while serving 3.00 GiB = 2.00x" in cpu and "device memory" not in cpu
    side["device_memory"] = {"peak_bytes_in_use": 2 << 30}
    rec["device_memory_ratio"] = 2 / 1.5
    gpu = _table(rec)
    assert "device memory: peak 2.00 GiB" in gpu and "= 1.33x weights (1.00 GiB)" in gpu
    assert "peak RSS while serving" not in gpu
    # One decode line when the batch is 1 (it was printed twice).
    rec["batch"] = 1
    assert "decode batch 1 (tok/s)" in cpu and _table(rec).count("decode batch 1 (tok/s)") == 1


def test_decode_profile_times_each_program_and_what_the_sampler_adds():
    """benchmarks/decode_profile.py on the demo model: one record per variant and row count,
    the argmax variant without the sampler's conditionals, and a kernel profile of the rest."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_profile.py"
    res = subprocess.run(
        [sys.executable, str(script), "--preset", "demo", "--rows", "1,2", "--context", "10",
         "--kv-len", "64", "--max-len", "64", "--steps-per-call", "2", "--profile"],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    runs = {(r["variant"], r["rows"]): r for r in rec["runs"]}
    assert set(runs) == {(v, r) for v in ("default", "argmax") for r in (1, 2)}
    assert all(r["step_ms"] > 0 and r["tok_s"] > 0 for r in runs.values())
    assert all(runs[("default", r)]["conditionals"] > 0 == runs[("argmax", r)]["conditionals"]
               for r in (1, 2))
    for r in (1, 2):
        prof = runs[("default", r)]["profile"]
        assert prof["kernel_ms_per_step"] > 0 and prof["top"]
        assert "profile" not in runs[("argmax", r)]
