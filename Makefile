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
	$(PY) -m pip install -q -e '.[train,serve,ray,dev]'
	touch $@

# Train on the embedded digits (resuming an interrupted run; a finished one is kept), export
# (ONNX always; a TensorRT engine where TensorRT and a GPU exist: exit code 3 means "not
# here"), then sample a grid with the torch-free runtime.
demo: venv
	$(PY) training/train.py --out $(RUN) $$(test -f $(RUN)/ckpt.pt && echo --resume)
	$(PY) export/to_trt.py $(RUN)/ckpt.pt -o $(RUN)/model.plan || test $$? -eq 3
	$(PY) -m runtime sample $(RUN)/model.onnx -n 64 --seed 0 -o $(RUN)/samples.png
	@echo "demo: samples in $(RUN)/samples.png"

test: venv lint
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
