# Two entry points for a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/segpipe: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[dev,bench]'
	touch $@

demo: $(BIN)/segpipe
	$(BIN)/segpipe demo

test: $(BIN)/segpipe
	$(BIN)/python -m pytest

lint: $(BIN)/segpipe
	$(BIN)/ruff check pipeline flows tests bench

bench: $(BIN)/segpipe
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) segpipe-demo
