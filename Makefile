# Quick start: `make demo` (train a small model on a generated scene, evaluate it, render a video)
# and `make test`. Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test demo bench clean

# A torch that $(PYTHON) already imports (e.g. a system-wide CUDA build) is kept: a plain venv cannot see it,
# so the venv is then made with --system-site-packages. Otherwise $(TORCH_PIN) is installed into the venv.
$(VENV)/.installed: pyproject.toml
	@torch_version=$$($(PYTHON) -c "import torch; print(torch.__version__)" 2>/dev/null); \
	if [ -n "$$torch_version" ]; then \
	  echo "$(PYTHON) has torch $$torch_version: creating $(VENV) with --system-site-packages to keep it."; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  echo "$(PYTHON) has no torch: creating $(VENV) and installing $(TORCH_PIN) into it."; \
	  $(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,raw]"
	touch $@

venv: $(VENV)/.installed

test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x -n 2 --dist loadfile tests

demo: venv
	$(PY) -m mipnerf360.cli.demo --out demo_out

bench: venv
	$(PY) bench/bench_train.py --malloc_tune
	$(PY) bench/bench_render.py --malloc_tune

clean:
	rm -rf $(VENV) demo_out .pytest_cache
