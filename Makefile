# Set-up included: each target creates/uses the virtualenv .venv.
# TORCH_SPEC: the CPU build on local disk; on a GPU machine use `TORCH_SPEC=torch make ...` or keep your own venv.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test test-slow test-all bench install clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/manu-fast demo

# The quick lane (the README's test command): everything but the end-to-end cases marked slow.
test: $(VENV)/.installed
	$(VENV)/bin/pytest tests/ -q -m "not slow"

# The slow end-to-end cases only; test-all runs both lanes.
test-slow: $(VENV)/.installed
	$(VENV)/bin/pytest tests/ -q -m slow

test-all: $(VENV)/.installed
	$(VENV)/bin/pytest tests/ -q

bench: $(VENV)/.installed
	$(VENV)/bin/pytest benchmarks/ -q -s

clean:
	rm -rf $(VENV) build *.egg-info manu_fast/_C*.so
