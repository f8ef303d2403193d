# The README's two commands: `make demo` (the main job) and `make test`.
# Both create .venv on first use. torch is pinned here, not in pyproject.toml:
# torch==2.13.0 is a CPU build already on our machines; an unpinned torch pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
RUN := runs/digits

.PHONY: venv demo test lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $@

demo: venv
	@echo "demo: training, export and sampling land with the training, export and runtime issues;"
	@echo "demo: for now it installs the environment and checks the schedule and samplers."
	$(PY) -m pytest -q tests/test_schedule.py tests/test_samplers.py

test: venv lint
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
