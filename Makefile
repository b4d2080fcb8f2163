# Two set-up commands (see README):
#   make demo   create .venv, install everything, run the quickstart simulation
#   make test   create .venv, install everything, run the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/quickstart

.PHONY: demo test install lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[live,serve,ray,dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/dlora simulate scenarios/quickstart.yaml --out $(OUT)

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check dlora tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) out
