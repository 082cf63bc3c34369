# Two commands do all the set-up: `make run` (the proxy on the simulator pair) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN = $(VENV)/bin

$(BIN)/nudging-proxy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

.PHONY: run test bench
run: $(BIN)/nudging-proxy
	$(BIN)/nudging-proxy sim-stack --config configs/sim.yaml

test: $(BIN)/nudging-proxy
	$(BIN)/python -m pytest -q

bench: $(BIN)/nudging-proxy
	$(BIN)/python benchmarks/strategies.py
