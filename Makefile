# Two entry points for a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# make test runs the test files in this many processes (pytest-xdist, a file per process at a time):
# the slow tests mostly wait on process start-up, so 2 processes fit the 40-minute CI on 2 cores.
TEST_PROCS ?= 2

# The container image (Dockerfile), built with podman: `make image`, `make image IMAGE=REGISTRY/unet-dist:TAG`.
IMAGE ?= unet-dist:dev
# podman settings for hosts like this project's machines and CI (scripts/containers.conf);
# `make image PODMAN_CONF=` keeps the host's own.
PODMAN_CONF ?= scripts/containers.conf
PODMAN_ENV := $(if $(PODMAN_CONF),CONTAINERS_CONF=$(abspath $(PODMAN_CONF)))
# A local wheel cache (the CPU torch wheel here) is mounted read-only at its own path during the
# build, for a base image whose pip.conf names it (scripts/image_base.sh); absent, nothing is mounted.
WHEELS ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
IMAGE_BUILD_ARGS ?=

.PHONY: setup demo test test-fast test-image image image-base bench peers-setup bench-peers clean

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

# Then the tests marked `alone` (step rates compared across windows of one job) run by themselves.
test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_PROCS) --dist loadfile --no-loadscope-reorder -m "not image and not alone" $(ARGS)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m "alone and not image" $(ARGS) || [ $$? -eq 5 ]

test-fast: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_PROCS) --dist loadfile -m "not slow and not image" $(ARGS)

# Every container of k8s/ run in the built image with podman, as its pod runs it (tests/test_image.py).
# Needs root, podman and the base image (on a machine without a registry: `make image-base`).
test-image: setup image
	PATH="$(abspath $(BIN)):$$PATH" UNET_IMAGE=$(IMAGE) $(PODMAN_ENV) \
		$(BIN)/python -m pytest -q -m image $(ARGS)

image:
	$(PODMAN_ENV) podman build --network host $(if $(wildcard $(WHEELS)),--volume $(WHEELS):$(WHEELS):ro) \
		$(IMAGE_BUILD_ARGS) -t $(IMAGE) .

# A stand-in for the Dockerfile's base image made from Debian packages, for machines that reach no
# container registry (CI). Does nothing when the base exists.
image-base:
	$(PODMAN_ENV) scripts/image_base.sh

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

# Every peer against ours, alternating, on the demo data and at the Cityscapes size (~30 min on 2 quiet
# cores; docs/performance.md). Not part of `make bench` or CI.
bench-peers: peers-setup
	$(PEERS_VENV)/bin/python benchmarks/bench_peers.py $(ARGS)

clean:
	rm -rf demo-work runs .pytest_cache
