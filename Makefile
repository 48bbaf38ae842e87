# lmforge: `make pipeline` runs the whole pipeline on the bundled data; `make test` runs the tests.
# Both create .venv and install pinned dependencies first (about 2 minutes on a fresh machine).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# CPU wheel by default. On a CUDA machine: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
export PATH := $(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME := $(abspath .lmforge/prefect)
export BENTOML_HOME := $(abspath .lmforge/bentoml)
export HF_DATASETS_OFFLINE ?= 0
export TOKENIZERS_PARALLELISM := false

.PHONY: install pipeline test lint format clean-state

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[pipeline,dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv with pinned dependencies

pipeline: install  ## the whole pipeline on the bundled data (dvc repro under one MLflow parent run)
	lmforge run

test: install  ## the test suite (no tests collected, pytest's exit 5, counts as a failure)
	pytest $(PYTEST_ARGS); code=$$?; if [ $$code -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$code

lint: install
	ruff check .
	ruff format --check src tests flows services benchmarks

clean-state:  ## forget local MLflow/Prefect/BentoML state (not the DVC cache)
	rm -rf .lmforge

PORT ?= 3000
.PHONY: serve
serve: install  ## serve the registered champion with BentoML on 127.0.0.1:$(PORT) (LMFORGE_MODEL_ALIAS=candidate for the candidate)
	bentoml serve services.service:LmforgeService --host 127.0.0.1 --port $(PORT)

UI_PORT ?= 4200
.PHONY: ui
ui: install  ## Prefect UI on 127.0.0.1:$(UI_PORT) serving the lmforge flows (run the pipeline from the browser)
	lmforge ui --port $(UI_PORT)

PLOTS_DIR ?= dvc_plots
.PHONY: plots
plots: install  ## the DVC plots page (loss-curve charts and PNGs) in $(PLOTS_DIR)/, renders offline (plots/vendor/)
	dvc plots show -o $(PLOTS_DIR)
	@echo "plots page: $(abspath $(PLOTS_DIR))/index.html"
