# The two set-up-and-run commands of the README. Both are idempotent and quick on a re-run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench-whitebox clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 (CPU) is pinned in pyproject.toml, so this never pulls a CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz:
	@command -v apt-get >/dev/null || { echo "install Debian's dataset-fashion-mnist, or run: flipback demo --data FOLDER"; exit 1; }
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

## make demo: install, get Fashion-MNIST, train the small CNN once, explain its errors, write the report.
demo: $(STAMP) /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
	$(BIN)/flipback demo

## make test: install with the test extras and run the test suite.
test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs
