# Two commands do all the set-up: `make run` (the proxy on the bundled CPU models) and
# `make test` (the unit and HTTP tests; no llama.cpp build). `make sim` runs the proxy on the
# simulated pair (no model weights); `make check` lints and type-checks; `make test-all` runs
# every test, the real-model (llama.cpp) and real-vLLM suites too, as CI does.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
# llama.cpp's native build uses CPU-specific kernels that crash on some machines (SIGILL
# where a VM hides AMX, SIGSEGV in AMX kernels); build for a portable x86-64 AVX2 baseline
# (upstreams/local/selftest.py names the same flags in its rebuild hint). It is built first
# and without pip's cache, which would otherwise hand back a wheel built with other flags.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# The demo extra's llama-cpp-python requirement, as pyproject.toml states it.
LLAMA_REQUIREMENT = $(shell $(PYTHON) -c "import tomllib; print(next(r for r in tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['demo'] if r.startswith('llama-cpp-python')))")

# Where the code lives, for the linters.
SOURCES = cli nudging_core nudging_eval server upstreams tests benchmarks scripts
# The suites that need llama.cpp and its models, or two real vLLM servers (pytest markers).
SLOW_SUITES = real_model or vllm or browser

# Stamp files, not the console script: both installs create bin/nudging-proxy, so it cannot
# tell whether the demo extra (llama.cpp) is in.
DEMO = $(VENV)/.demo
DEV = $(VENV)/.dev

$(DEMO): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q --no-cache-dir '$(LLAMA_REQUIREMENT)'
	$(BIN)/python -m pip install -q -e '.[dev,demo,eval]'
	touch $@

# The tests and checks without the demo extra (no llama.cpp to build).
$(DEV): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,eval]'
	touch $@

.PHONY: run sim test test-all check bench vllm-cpu vllm-cpu-stop
run: $(DEMO)
	$(BIN)/nudging-proxy demo --config configs/demo.yaml

sim: $(DEV)
	$(BIN)/nudging-proxy sim-stack --config configs/sim.yaml

test: $(DEV)
	$(BIN)/python -m pytest -q -m 'not ($(SLOW_SUITES))'

test-all: $(DEMO)
	$(BIN)/python -m pytest -q

check: $(DEV)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/mypy
	$(BIN)/mypy benchmarks scripts

bench: $(DEV)
	$(BIN)/python benchmarks/strategies.py

# Two real vLLM servers on the CPU (own venv in .vllm-cpu/): SmolLM2-135M-Instruct on 8031,
# Gemma 3 270M on 8032, until Ctrl-C; the proxy in front: nudging-proxy serve --config configs/vllm-cpu.yaml
vllm-cpu:
	scripts/vllm-cpu.sh run

vllm-cpu-stop:
	scripts/vllm-cpu.sh stop
