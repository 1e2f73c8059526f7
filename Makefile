# Two entry points for a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# make test runs the test files in this many processes (pytest-xdist, a file per process at a time):
# the slow tests mostly wait on process start-up, so 2 processes fit the 40-minute CI on 2 cores.
TEST_PROCS ?= 2

.PHONY: setup demo test test-fast bench peers-setup bench-peers clean

setup: $(VENV)/.installed

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

# The peers benchmark's venv: torch 2.14.1 + torchvision + smp (benchmarks/peers/requirements.txt says
# why), installed without dependencies over this project's venv, whose site-packages a .pth file
# appends after its own (so its torch comes first and everything else is shared). CI makes it too:
# tests/test_peers_smoke.py runs each peer in it.
PEERS_VENV ?= .venv-peers

peers-setup: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed: benchmarks/peers/requirements.txt $(VENV)/.installed
	rm -rf $(PEERS_VENV)
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --no-deps -r benchmarks/peers/requirements.txt
	$(PEERS_VENV)/bin/python -c 'import sys, sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()["purelib"], "zz_unet_dist_venv.pth").write_text(f"import site; site.addsitedir({sys.argv[1]!r})\n")' \
		"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	touch $@

# Every peer against ours, alternating, on the demo data and at the Cityscapes size (~35-40 min on 2 quiet
# cores; docs/performance.md). Not part of `make bench` or CI.
bench-peers: peers-setup
	$(PEERS_VENV)/bin/python benchmarks/bench_peers.py $(ARGS)

clean:
	rm -rf demo-work runs .pytest_cache
