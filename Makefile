# Two commands on a fresh Linux machine with Python ≥ 3.11 and make:  make demo   /   make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit venv clean contact-sheet

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "inspectd needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision are pinned to the CPU-runnable release on this disk (see README: Machine notes);
	# plc: the PLC bridge's OPC UA and Modbus libraries (its tests run real clients)
	$(PY) -m pip install --quiet -e '.[train,dev,plc]'
	touch $(STAMP)

venv: $(STAMP)

DEMO_ARGS ?=
demo: $(STAMP)
	$(VENV)/bin/inspectd demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

contact-sheet: $(STAMP)
	$(PY) -c 'from tools.synth import contact_sheet; contact_sheet("docs/synthetic-screws.png")'

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
