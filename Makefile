# Two entry points for a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# make test runs the test files in this many processes (pytest-xdist, a file per process at a time):
# the slow tests mostly wait on process start-up, so 2 processes fit the 40-minute CI on 2 cores.
TEST_PROCS ?= 2

.PHONY: setup demo test test-fast bench clean

# Azurite (the Azure Storage emulator the tests run) comes from npm, into ./.emulators.
AZURITE_VERSION ?= 3.37.0
AZURITE := .emulators/node_modules/.bin/azurite-blob

setup: $(VENV)/.installed $(AZURITE)

$(AZURITE):
	npm install --silent --no-audit --no-fund --prefix .emulators azurite@$(AZURITE_VERSION)

# torch is installed first, pinned, so pip takes the CPU wheel on disk (/opt/wheels here) rather
# than resolving a multi-GB CUDA build for the other packages.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	$(BIN)/python -m unet_dist.demo $(ARGS)

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_PROCS) --dist loadfile --no-loadscope-reorder $(ARGS)

test-fast: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m "not slow" $(ARGS)

bench: setup
	$(BIN)/python benchmarks/run_all.py $(ARGS)

clean:
	rm -rf demo-work runs .pytest_cache
