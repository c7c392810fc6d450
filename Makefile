# Two entry points, each installing what it needs into .venv first:
#   make run    train LightNetCell briefly on synthetic smears, evaluate it, print the report
#   make test   the default (fast) test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# On a CPU-only machine the CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
WORKDIR ?= runs/demo

.PHONY: install run test test-all clean chromium

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,edge]"
	touch $@

# Synthetic smears already draw their stain colours per image from one distribution for every
# class, so the brief demo keeps only the geometric augmentation; on real data keep the stain
# jitter (the default), which is what makes a model survive another lab's stain.
run: install
	$(BIN)/jaxcell train --model lightnetcell --image-size 64 --synthetic-examples 1600 --epochs 10 \
	    --batch-size 32 --stain-jitter 0 --color-jitter 0 --workdir $(WORKDIR) --overwrite
	$(BIN)/jaxcell evaluate --workdir $(WORKDIR) --split test --out $(WORKDIR)/report.json

# The HTML-report test renders in headless Chromium (Debian's package); installed when missing and
# possible (root with apt), otherwise that one test skips and says why.
chromium:
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: install chromium
	$(BIN)/pytest -q -m "not slow"

test-all: install chromium
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
