# Quick start: `make demo` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# On a machine without an NVIDIA GPU install the CPU build of torch first, so that pip never
# pulls the multi-GB CUDA build; with a GPU, the same pin resolves to PyPI's CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test bench install dev clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is needed: set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

demo: $(VENV)/.installed
	$(VENV)/bin/partime-async demo

test: $(VENV)/.dev
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(VENV)/bin/partime-async bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
