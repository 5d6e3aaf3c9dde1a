# ViT Lens: `make run` starts the app on the embedded model, `make test` runs the whole suite,
# `make test-fast` the tests that are not marked slow (the loop while editing).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check --quiet

.PHONY: run test test-fast lint format bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The pinned requirements, then the project itself as an editable package (the `vit-lens`
# command; the dependencies are the same pins, so pip has nothing more to fetch).
$(VENV)/.run-installed: requirements.txt pyproject.toml | $(VENV)/bin/python
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -e .
	touch $@

$(VENV)/.dev-installed: requirements.txt requirements-dev.txt requirements-ray.txt pyproject.toml | $(VENV)/bin/python
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps -e .
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(VENV)/bin/vit-lens app

lint: $(VENV)/.dev-installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.dev-installed
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest

test-fast: $(VENV)/.dev-installed
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow" -q

bench: $(VENV)/.dev-installed
	$(PY) -m benchmarks.bench_perf
	$(PY) -m benchmarks.bench_app

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache tests/artifacts build *.egg-info
