# Two commands do all set-up on a fresh machine (Python 3.10+):
#   make grade   grade exercises/ (your work) with the visible and hidden tests
#   make test    the course's own test suite (instructors, CI)
#   make lab     open the course in JupyterLab (the notebooks run with .venv as their kernel)
# Both create .venv and install what is missing.  TORCH_SPEC pins the torch build: the default
# takes the CPU build where one is on disk and PyPI's (CUDA) build elsewhere; any torch >= 2.4 works:
#   make grade TORCH_SPEC="torch>=2.4"

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: grade test setup build check bench lab clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[oracles,notebooks,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

grade: $(STAMP)
	$(VENV)/bin/course grade exercises

test: $(STAMP)
	$(PY) -m pytest tests -q -n 2 --dist loadfile

build: $(STAMP)
	$(VENV)/bin/course build

check: $(STAMP)
	$(VENV)/bin/course build --check

bench: $(STAMP)
	$(PY) -m benchmarks.grading

# The venv's jupyter: its python3 kernel is the venv's python.  LAB_ARGS: e.g. --no-browser --port 8890
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/exercises $(LAB_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
