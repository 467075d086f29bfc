# kdkit: `make run` (set up + default experiment), `make test` (set up + test suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kdkit-installed

.PHONY: setup run test test-slow lint mnist clean setup-vision test-vision

# The vision lane (torchvision and timm models): its own environment, since PyPI's
# torchvision does not import beside the CPU torch 2.13.0; torch 2.14.1 and torchvision
# 0.29.1 come from local disk together (a CUDA build that runs on the CPU, ~5.5 GB).
VVENV  := .venv-vision
VBIN   := $(VVENV)/bin
VSTAMP := $(VVENV)/.kdkit-installed

# torch is installed first and pinned to the CPU build that ships on this machine's
# disk; pyproject's range is then already satisfied, so nothing pulls a CUDA build.
# The optional extras (ONNX export, figures, TensorBoard, Hugging Face) come too: the tests use them.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,deploy,report,tensorboard,hf]'
	touch $(STAMP)

setup: $(STAMP)

$(VSTAMP): pyproject.toml
	$(PYTHON) -m venv $(VVENV)
	$(VBIN)/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(VBIN)/pip install --quiet --disable-pip-version-check timm -e '.[dev,deploy,report]'
	touch $(VSTAMP)

setup-vision: $(VSTAMP)

# the tests that need torchvision or timm (they skip, with the reason, elsewhere)
test-vision: setup-vision
	$(VBIN)/python -m pytest -q -m vision -p no:cacheprovider

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
	rm -rf $(VENV) $(VVENV) runs
