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
	$(PY) -m pip install -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	PATH="$(BIN):$$PATH" $(BIN)/mpirun --np $(NP) $(PY) examples/tp_demo.py --preset tiny-gpt3 --tensor-model-parallel-size $(NP)

test: $(STAMP)
	PATH="$(BIN):$$PATH" $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/model_step.py

clean:
	rm -rf .venv *.egg-info
