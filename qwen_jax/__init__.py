"""qwen-jax: a clear, functional JAX reimplementation of Qwen2.5 that serves the OpenAI Chat API."""

__version__ = "0.1.0"
