# MedLSAM Label. `make test` is what CI runs (.ci/run); `make serve` starts the app on the sample datastore.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(abspath ../shared/data)
PORT ?= 8000
HOST ?= 127.0.0.1
SAMPLE ?= sample-datastore
ORTHANC_PORT ?= 8042
RUNTIME ?= runs/dicomweb
CONF ?= --conf models medlsam

.PHONY: help setup system-deps lint test test-quick sample-datastore serve serve-dicomweb demo clean
.DEFAULT_GOAL := help

help:  ## this list (each target and what it does)
	@echo "make <target>, from the repository root:"
	@awk -F':.*## ' '/^[a-z-]+:.*## / {printf "  %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Variables (make VAR=value): DATA=$(DATA) PORT=$(PORT) HOST=$(HOST) SAMPLE=$(SAMPLE) CONF='$(CONF)'"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	@echo "Installing the pinned stack into $(VENV) (torch, MONAI Label, LiteMedSAM...): first run only," \
	      "about 5 minutes; later runs reuse it."
	@start=$$(date +%s); \
	  $(BIN)/pip install -q -r requirements.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" ; \
	  test $${PIPESTATUS[0]} -eq 0 && $(BIN)/pip install -q --no-deps --no-build-isolation -e . && \
	  echo "Installed in $$(( $$(date +%s) - start )) s."
	touch $@

setup: $(VENV)/.installed  ## create .venv when missing (reused when present) and install everything

lint: setup  ## ruff: lint and format check (configured in pyproject.toml)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

system-deps:  ## Orthanc + Chromium (DICOMweb/OHIF tests), dicom3tools + plastimatch (RTSTRUCT tests): apt-installed when missing (root only)
	bash scripts/system_deps.sh

test: setup system-deps lint  ## lint, then the test suite: server + training tests beside data + unit tests (CPU only, no network)
	MEDLSAM_DATA=$(DATA) $(BIN)/python scripts/run_tests.py

test-quick: setup  ## tests/unit: no data folder, no server (about a minute)
	$(BIN)/python -m pytest -q tests/unit

sample-datastore: setup  ## a MONAI Label datastore from $(DATA)/openkbp: 3 templates with final labels + 5 unlabeled scans
	$(BIN)/python scripts/make_sample_datastore.py --data $(DATA) --out $(SAMPLE)

serve: sample-datastore  ## start the app on the sample datastore (http://$(HOST):$(PORT), loopback only unless HOST=0.0.0.0)
	PATH=$(abspath $(BIN)):$$PATH MONAILABEL_PYEXE=$(abspath $(BIN))/python \
	  $(BIN)/monailabel start_server --app apps/medlsam --studies $(SAMPLE) $(CONF) -i $(HOST) -p $(PORT)

serve-dicomweb: sample-datastore  ## Orthanc (loopback) + the sample datastore as DICOM CT/SEG + the app on it; OHIF at http://$(HOST):$(PORT)/ohif/
	$(BIN)/python scripts/orthanc.py start --dir $(RUNTIME)/orthanc --port $(ORTHANC_PORT)
	$(BIN)/python scripts/load_dicomweb.py --studies $(SAMPLE) --url http://127.0.0.1:$(ORTHANC_PORT)/dicom-web \
	  --state $(RUNTIME)/orthanc/loaded.json --ohif http://127.0.0.1:$(PORT)
	trap '$(BIN)/python scripts/orthanc.py stop --dir $(RUNTIME)/orthanc' EXIT; \
	  PATH=$(abspath $(BIN)):$$PATH MONAILABEL_PYEXE=$(abspath $(BIN))/python \
	  MONAI_LABEL_DICOMWEB_CACHE_PATH=$(abspath $(RUNTIME))/cache \
	  $(BIN)/monailabel start_server --app apps/medlsam --studies http://127.0.0.1:$(ORTHANC_PORT)/dicom-web \
	  $(CONF) -i $(HOST) -p $(PORT)

demo: setup  ## ask the running server (make serve) for an auto-segmentation like Slicer; writes runs/demo/
	$(BIN)/python scripts/demo.py --server http://127.0.0.1:$(PORT) --out runs/demo

clean:  ## remove .venv and .pytest_cache
	rm -rf $(VENV) .pytest_cache
