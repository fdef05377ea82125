"""qwen-jax: a clear, functional JAX reimplementation of Qwen2.5 that serves the OpenAI Chat API."""

import os

__version__ = "0.1.0"

# XLA's CPU backend schedules for concurrency by default, which starts every bf16 -> f32 weight
# conversion of a prefill program up front and keeps them all alive (1.4 GiB of temporaries for
# a 512-token Qwen2.5-0.5B prefill; 48 MiB with the memory-minimising scheduler, at equal speed).
# XLA reads XLA_FLAGS once, when the backend starts, so this must run before any computation;
# an explicit setting of the flag by the user wins. Other backends ignore xla_cpu_* flags.
_CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
_flags = os.environ.get("XLA_FLAGS", "")
if _CPU_SCHEDULER_FLAG not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {_CPU_SCHEDULER_FLAG}=false".strip()
