# Two entry points, each installing what it needs into .venv first:
#   make run    train the CNN + Transformer hybrid on synthetic smears (recipe demo-cpu, under 3 minutes
#               on 2 cores), evaluate it, print the report
#   make test   the default (fast) test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# On a CPU-only machine the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build),
# then jaxcell with the torch side (parity, twins, benchmark), oneDNN's CPU convolutions and the tests.
TORCH  ?= torch==2.13.0
# The release paired with it: the model zoo's oracle (tests/test_models_zoo.py), installed without
# its dependencies so that it never replaces the torch build chosen above.
TORCHVISION ?= torchvision==0.28.0
WORKDIR ?= runs/demo

.PHONY: install run test test-all clean chromium

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet --no-deps "$(TORCHVISION)"
	$(BIN)/pip install --quiet -e ".[torch,cpu,serve,edge,test]"
	touch $@

# The settings (model, size, smears, epochs, augmentation) are the recipe's: `jaxcell recipes`.
run: install
	$(BIN)/jaxcell train --recipe demo-cpu --workdir $(WORKDIR) --overwrite
	$(BIN)/jaxcell evaluate --workdir $(WORKDIR) --split test --out $(WORKDIR)/report.json

# The HTML-report test renders in headless Chromium (Debian's package); installed when missing and
# possible (root with apt), otherwise that one test skips and says why.
chromium:
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Two workers, one test file each at a time (a file's module fixtures, such as a trained run, are
# made once); TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

test: install chromium
	$(BIN)/pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=15

test-all: install chromium
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
