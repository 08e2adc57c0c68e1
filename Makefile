# The two set-up commands (README): `make demo` runs the main job, `make test` the tests.
# Both create or reuse .venv and install what they need. torch==2.13.0 comes first: on the
# project's CPU machines it is a local CPU wheel (any other torch pulls GBs of CUDA packages);
# GPU users set TORCH= to keep their own build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Warm-starts a tiny model on 2-digit addition (cached), trains GRPO from it, prints eval
# accuracy before and after, and the command that opens the run in MLflow.
demo: $(STAMP)
	$(BIN)/rlbench train --config configs/grpo_addition.yaml output_dir=runs/demo-$(shell date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
