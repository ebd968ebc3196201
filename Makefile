# One-command entry points. The first use creates .venv with a Python >= 3.12
# (scripts/find_python.sh; override with PYTHON=/path/to/python3.12).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extras installed into the venv; `make EXTRAS=dev,cuda12 venv` on a GPU machine.
EXTRAS ?= dev

.PHONY: venv train test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || "$$(scripts/find_python.sh)" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

venv: $(STAMP)

## The Lightning docs' FeedForward 8192x8192 example; pass flags with ARGS="--devices 4 ...".
train: $(STAMP)
	$(PY) -m jtp.train $(ARGS)

## The test suite on 8 forced CPU devices.
test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check jtp tests examples
	$(PY) -m ruff format --check jtp tests examples

bench: $(STAMP)
	$(PY) -m jtp.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
