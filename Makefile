# Quick start: `make demo` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# On Linux without an NVIDIA GPU (no nvidia-smi), torch's CPU build comes first, from PyTorch's
# CPU index: PyPI's Linux wheel of the same version is the CUDA build (several GB). --no-deps:
# only torch itself comes from that index; its dependencies come from PyPI with the package,
# next. Where that index cannot be reached, the default index's torch, with a message. With a
# GPU, or on macOS (whose PyPI wheel is the CPU build), the default index's.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
ifeq ($(shell uname -s)$(shell command -v nvidia-smi 2>/dev/null),Linux)
CPU_ONLY := 1
endif

.PHONY: demo test bench example install dev clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is needed: set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifdef CPU_ONLY
	$(PY) -m pip install --quiet --retries 2 --timeout 15 --no-deps --index-url $(TORCH_CPU_INDEX) "$(TORCH)+cpu" \
	  || { echo "PyTorch's CPU index $(TORCH_CPU_INDEX) could not be reached: installing $(TORCH) from the default index (on Linux, the CUDA build)"; \
	       $(PY) -m pip install --quiet "$(TORCH)"; }
else
	$(PY) -m pip install --quiet "$(TORCH)"
endif
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
	$(PY) -m ruff check partime_async sources sinks
	$(PY) -m mypy
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(VENV)/bin/partime-async bench

# make example NAME=quickstart [ARGS="--frames 50"]: one of examples/, with this environment's Python
example: $(VENV)/.installed
	@test -n "$(NAME)" || { echo "say which: make example NAME=<one of: $(basename $(notdir $(wildcard examples/*.py)))>"; exit 2; }
	$(PY) examples/$(NAME).py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
