# Quick start: `make demo` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# On Linux without an NVIDIA GPU, torch's CPU build comes first, from PyTorch's CPU index: PyPI's
# Linux wheel is the CUDA build (several GB). --no-deps: only torch itself comes from that index;
# its dependencies come from PyPI with the package, next. With a GPU (or on macOS, whose PyPI
# wheel is the CPU build) the plain pin. Override with e.g. make TORCH=torch==2.13.0.
ifeq ($(shell uname -s)$(shell command -v nvidia-smi 2>/dev/null),Linux)
TORCH  ?= torch==2.13.0+cpu --no-deps --index-url https://download.pytorch.org/whl/cpu
else
TORCH  ?= torch==2.13.0
endif

.PHONY: demo test bench install dev clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is needed: set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
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
