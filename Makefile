# The README's two commands: `make demo` (the main job) and `make test`.
# Both create .venv on first use. torch is pinned here, not in pyproject.toml:
# torch==2.13.0 is a CPU build already on our machines; an unpinned torch pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
RUN := runs/digits

.PHONY: venv dev demo test test-fast lint clean

# What make demo needs: the runtime and training. The test extras (Ray, the server,
# diffusers as an oracle) are only installed by `make test`, so a new user's first
# command does not wait for them.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[train]'
	touch $@

dev: $(VENV)/.installed-dev

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[train,import,eval,serve,ray,dev]'
	touch $@

# Train on the embedded digits (resuming an interrupted run; a finished one is kept), export
# (ONNX always; a TensorRT engine where TensorRT and a GPU exist: exit code 3 means "not
# here"), then sample a grid with the torch-free runtime.
demo: venv
	$(PY) training/train.py --out $(RUN) $$(test -f $(RUN)/ckpt.pt && echo --resume)
	$(PY) export/to_trt.py $(RUN)/ckpt.pt -o $(RUN)/model.plan || test $$? -eq 3
	$(PY) -m runtime sample $(RUN)/model.onnx -n 64 --seed 0 -o $(RUN)/samples.png
	@echo "demo: samples in $(RUN)/samples.png"

# The whole suite on TEST_WORKERS processes (pytest-xdist; CI has 2 cores). loadgroup keeps
# the tests of a module that starts a service (Ray, the server) on one worker.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadgroup

test: dev lint
	$(PY) -m pytest $(PYTEST_PARALLEL)

# The edit-test loop: the core (math, schedule, samplers, options, pipeline, runtime, server
# logic) without the tests marked slow; under a minute on 2 cores.
test-fast: dev
	$(PY) -m pytest $(PYTEST_PARALLEL) -m "not slow"

lint: dev
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
