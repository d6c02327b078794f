# Two entry points (see README): `make repro` and `make test`. Both create the virtual
# environment on first use. torch is pinned in pyproject.toml (torch==2.13.0) so pip takes
# the local CPU wheel instead of several GB of CUDA packages.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

.PHONY: setup repro test test-all
setup: $(VENV)/.installed

repro: setup
	. $(VENV)/bin/activate && dvc repro

test: setup
	. $(VENV)/bin/activate && pytest

test-all: setup
	. $(VENV)/bin/activate && pytest -m ''
