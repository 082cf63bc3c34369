# Two commands do all the set-up: `make run` (the proxy on the bundled CPU models) and
# `make test`. `make sim` runs the proxy on the simulated pair (no model weights).
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin
# llama.cpp's native build may use CPU features the kernel does not enable (AMX tiles
# crash with SIGILL on some VMs); build for a portable x86-64 AVX2 baseline instead.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

$(BIN)/nudging-proxy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -e '.[dev,demo,eval]'
	touch $@

.PHONY: run sim test bench
run: $(BIN)/nudging-proxy
	$(BIN)/nudging-proxy demo --config configs/demo.yaml

sim: $(BIN)/nudging-proxy
	$(BIN)/nudging-proxy sim-stack --config configs/sim.yaml

test: $(BIN)/nudging-proxy
	$(BIN)/python -m pytest -q

bench: $(BIN)/nudging-proxy
	$(BIN)/python benchmarks/strategies.py
