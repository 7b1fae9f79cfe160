# Two entry points for a fresh machine: `make train` and `make test`. Both set up .venv first
# (idempotent: the install re-runs only when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-dev
TORCH  ?= torch==2.13.0
# Two pytest-xdist workers, whole files per worker (module fixtures are built once): the suite's
# heavy tests are multi-process and mostly wait, so two workers halve the wall time on 2 cores.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: setup train test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Install torch first and pinned: an unpinned `torch` resolves to a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(VENV)/bin/rechub fit --config configs/ctr/deepfm.yaml

test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.ctr

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
