# sandbox-runner: every entry point for people and for CI. `make` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
SOAK_ARGS ?=

.PHONY: help setup venv docker image demo test test-unit bench soak lint fmt docs snapshots types check clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP) ## Create .venv with the project and its dev tools

docker: ## Make sure a Docker engine answers (installs and starts one on Debian as root)
	@scripts/ensure-docker.sh

image: venv docker ## Build the task image and the runner image (each only when its inputs changed)
	$(BIN)/sandbox-runner image build
	$(BIN)/sandbox-runner image build-runner

setup: venv docker image ## Prepare this machine completely (idempotent)

demo: setup ## Run the examples in examples/ end to end
	@scripts/demo.sh

test: setup ## Run the whole test suite (unit + Docker integration)
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: venv ## Run only the tests that need no Docker
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

bench: setup ## Benchmark forkserver vs bare Docker vs our cold/warm containers (BENCH_ARGS=--help)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

soak: setup ## Push 1000 mixed tasks through broker + runner: 0 lost, 0 duplicated, 0 leaked (SOAK_ARGS=--help)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

lint: venv ## ruff lint and format check
	$(BIN)/ruff check runner tests sandbox_image scripts bench
	$(BIN)/ruff format --check runner tests sandbox_image scripts bench

fmt: venv ## Format the code with ruff
	$(BIN)/ruff format runner tests sandbox_image scripts bench
	$(BIN)/ruff check --fix runner tests sandbox_image scripts bench

docs: venv ## Regenerate the settings tables (README.md, docs/settings.md) from the settings model
	$(BIN)/python scripts/update_readme.py

snapshots: venv ## Refresh the `policy explain` and `policy diff` snapshots after a reviewed policy change
	UPDATE_SNAPSHOTS=1 $(BIN)/pytest tests/unit/test_policy_cli.py tests/unit/test_policy_tenants.py -q

types: venv ## mypy --strict on runner/ and on the in-container agent (staged as the image stages it)
	$(BIN)/mypy
	$(BIN)/python scripts/typecheck_agent.py

check: lint types test ## Lint, types and the whole test suite

clean: ## Remove the virtualenv and caches (images stay)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
