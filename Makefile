# kdkit: `make run` (set up + default experiment), `make test` (set up + test suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kdkit-installed

.PHONY: setup run test test-slow lint mnist clean

# torch is installed first and pinned to the CPU build that ships on this machine's
# disk; pyproject's range is then already satisfied, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/kdkit run --out runs/default --force

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/mypy src/kdkit

mnist: setup
	$(BIN)/kdkit data fetch mnist
	$(BIN)/kdkit run examples/mnist_hinton.yaml --force

clean:
	rm -rf $(VENV) runs
