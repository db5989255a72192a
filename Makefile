# The two set-up-and-run commands of the README. Both are idempotent and quick on a re-run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-main test-timm test-deps bench-whitebox clean

FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
# The browser test drives this Chromium (tests/test_report_browser.py reads the same variable).
FLIPBACK_CHROMIUM ?= /usr/bin/chromium

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 (CPU) first: pyproject.toml allows 2.13 and 2.14 (timm's venv needs 2.14), and
# with 2.13.0 installed pip keeps it, so set-up never pulls a multi-GB CUDA build.
# The demo needs only the lean default install; the tests add their extras (Ray, KServe,
# Playwright, foolbox), which would triple the demo's set-up time.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $(STAMP)

# adv-lib (the white-box anchors of benchmarks/advlib_baselines.py, and its test) without its
# declared visdom and torchvision: visdom's sdist no longer builds, torchvision does not load
# beside this torch, and the attacks use neither (advlib_baselines.py says more).
$(TEST_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps adv-lib==0.2.8
	touch $(TEST_STAMP)

$(FMNIST):
	@command -v apt-get >/dev/null || { echo "install Debian's dataset-fashion-mnist, or run: flipback demo --data FOLDER"; exit 1; }
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

## make demo: install, get Fashion-MNIST, train the small CNN once, explain its errors, write the report.
demo: $(STAMP) $(FMNIST)
	$(BIN)/flipback demo

## make test: install with the test extras, Debian's chromium and dataset-fashion-mnist when
## missing (apt-get, as root), then run the test suite; its exit status is pytest's pass or fail.
## Both suites run, and it fails if either fails.
test:
	@status=0; $(MAKE) --no-print-directory test-main || status=1; \
	  $(MAKE) --no-print-directory test-timm || status=1; exit $$status

test-main: $(TEST_STAMP) test-deps
	$(BIN)/python -m pytest

# timm imports torchvision, and PyPI's torchvision does not load beside the CPU torch 2.13.0 of
# .venv: its tests (tests/test_timm.py) run in a venv of their own with torch 2.14.1 and the
# torchvision built for it (a CUDA build, about 5.5 GB; it runs on the CPU).
TIMM_VENV := .venv-timm
$(TIMM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/pip install -q --upgrade pip
	$(TIMM_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(TIMM_VENV)/bin/pip install -q -e '.[timm]' 'pytest>=8'
	touch $@

## make test-timm: the timm tests alone, in .venv-timm.
test-timm: $(TIMM_VENV)/.installed
	$(TIMM_VENV)/bin/python -m pytest tests/test_timm.py

# Without them the browser test and the Fashion-MNIST data tests skip, so say so loudly;
# a machine without apt-get (or without root) still runs everything else.
TEST_MISSING = $(strip $(if $(wildcard $(FMNIST)),,dataset-fashion-mnist) $(if $(wildcard $(FLIPBACK_CHROMIUM)),,chromium))
test-deps:
	@if [ -n "$(TEST_MISSING)" ]; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing Debian's $(TEST_MISSING) for the tests"; \
	    (apt-get update -qq && apt-get install -y -qq $(TEST_MISSING)) || \
	      echo "*** apt-get could not install $(TEST_MISSING) (it needs root, and Debian's archive): the tests that need it skip"; \
	  else \
	    echo "*** apt-get is unavailable: install $(TEST_MISSING) yourself, or the tests that need it skip"; \
	    echo "*** (Chromium at $(FLIPBACK_CHROMIUM), or set FLIPBACK_CHROMIUM; Fashion-MNIST's IDX files in $(dir $(FMNIST)))"; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) $(TIMM_VENV) runs
