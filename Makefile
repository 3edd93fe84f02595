# demo / test / bench. Uses the active virtual environment, or creates .venv here and installs
# into it (torch==2.13.0 first so that pip does not pull a CUDA build).
SHELL := /bin/bash
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
BIN := $(VIRTUAL_ENV)/bin
STAMP := $(VIRTUAL_ENV)/.megatron_ru_installed
else
PY := .venv/bin/python
BIN := .venv/bin
STAMP := .venv/.megatron_ru_installed
endif
TORCH ?= torch==2.13.0
NP ?= 2

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[test]" --config-settings editable_mode=compat  # a path entry: a same-named folder in the CWD cannot shadow it
	@touch $(STAMP)

# The main job: train a tiny alternating-sparse ruGPT-3 on generated Russian stories (mpirun,
# TP=2, a few minutes on a laptop CPU), sample from the checkpoint it wrote, then score held-out
# text before and after training (bits per byte, tools/evaluate.py).
demo: $(STAMP)
	PATH="$(BIN):$$PATH" PYTHON=$(PY) MPIRUN=$(BIN)/mpirun NP=$(NP) TP=$(NP) bash examples/pretrain_tiny.sh
	PATH="$(BIN):$$PATH" PYTHON=$(PY) bash examples/generate_tiny.sh
	PATH="$(BIN):$$PATH" PYTHON=$(PY) bash examples/evaluate_tiny.sh

test: $(STAMP)
	PATH="$(BIN):$$PATH" $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/model_step.py
	$(PY) bench/attention.py
	$(PY) bench/train.py
	$(PY) bench/generate.py
	$(PY) bench/serve.py
	$(PY) bench/data.py
	$(PY) bench/evaluate.py

clean:
	rm -rf .venv *.egg-info
