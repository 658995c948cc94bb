# Quick start: `make demo` (train a small model on a generated scene, evaluate it, render a video)
# and `make test`. Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Keep a torch that is already there (e.g. a CUDA build); otherwise install the pinned CPU-friendly one.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -x tests

demo: venv
	$(PY) -m mipnerf360.cli.demo --out demo_out

bench: venv
	$(PY) bench/bench_train.py --malloc_tune
	$(PY) bench/bench_render.py --malloc_tune

clean:
	rm -rf $(VENV) demo_out .pytest_cache
