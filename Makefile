# One-command entry points. The first use creates .venv with a Python >= 3.12
# (scripts/find_python.sh; override with PYTHON=/path/to/python3.12).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extras installed into the venv; `make EXTRAS=dev,cuda12 venv` on a GPU machine.
EXTRAS ?= dev

.PHONY: venv train test lint lint-check bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || { PYBIN=$$(scripts/find_python.sh) && "$$PYBIN" -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

venv: $(STAMP)

## The Lightning docs' FeedForward 8192x8192 example on 8 forced CPU devices (TP=8).
## On GPUs: make train TRAIN_ARGS=  (all GPUs). Other flags: python -m jtp.train --help.
TRAIN_ARGS ?= --devices 8
train: $(STAMP)
	$(PY) -m jtp.train $(TRAIN_ARGS) $(ARGS)

## The test suite on 8 forced CPU devices.
test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

## Lint and format in place.
lint: $(STAMP)
	$(PY) -m ruff check --fix jtp tests examples
	$(PY) -m ruff format jtp tests examples

## What CI checks: lint errors only (formatting drift across ruff releases is not a failure).
lint-check: $(STAMP)
	$(PY) -m ruff check jtp tests examples

bench: $(STAMP)
	$(PY) -m jtp.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
