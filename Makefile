# MedLSAM Label. `make test` is what CI runs (.ci/run); `make serve` starts the app on the sample datastore.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(abspath ../shared/data)
PORT ?= 8000

.PHONY: setup test serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed  ## create .venv when missing (reused when present) and install everything

test: setup  ## run the test suite (CPU only, no network)
	MEDLSAM_DATA=$(DATA) $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
