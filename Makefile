# Two entry points, each installing what it needs into .venv first:
#   make run    train LightNetCell briefly on synthetic smears, evaluate it, print the report
#   make test   the default (fast) test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# On a CPU-only machine the CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
WORKDIR ?= runs/demo

.PHONY: install run test test-all clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

run: install
	$(BIN)/jaxcell train --model lightnetcell --image-size 64 --synthetic-examples 1200 \
	    --epochs 6 --batch-size 32 --workdir $(WORKDIR) --overwrite
	$(BIN)/jaxcell evaluate --workdir $(WORKDIR) --split test --out $(WORKDIR)/report.json

test: install
	$(BIN)/pytest -q -m "not slow"

test-all: install
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
