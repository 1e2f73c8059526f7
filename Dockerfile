# syntax=docker/dockerfile:1
# One image for every role: preprocess, Ray head and workers (`ray start`), torchrun nodes, the
# MLflow server (`mlflow server`, with psycopg for PostgreSQL) and the model server
# (`mlflow models serve`). tests/test_image.py runs each container of k8s/ in it (docs/cluster.md).
#
# CUDA by default: the torch wheel pinned in constraints.txt is PyPI's Linux build, which brings its
# own CUDA runtime libraries (nvidia-* wheels); the nodes need only an NVIDIA driver and the device
# plugin. Another torch build comes from another index, e.g. CPU only (a much smaller image):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t REGISTRY/unet-dist:0.1.0-cpu .
# or another CUDA: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
#
#   docker build -t REGISTRY/unet-dist:0.1.0 .     # or: make image IMAGE=REGISTRY/unet-dist:0.1.0 (podman)
#   docker run --rm REGISTRY/unet-dist:0.1.0          # the CPU demo, end to end
FROM python:3.11.13-slim-bookworm

ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

# wget: KubeRay's exec probes (operators before 1.6) call it. tini: signal handling for `docker run`.
# Unpinned on purpose: Debian drops superseded versions from its mirror, so a pin breaks the build at
# the next security update; the base image's tag fixes the release (bookworm).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget tini ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged user: the Kubernetes manifests run every pod as UID/GID 1000.
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/app --shell /bin/bash app

WORKDIR /app

# Dependencies first (a layer that survives code edits): install the project's requirements
# against an empty package, pinned by constraints.txt. Only the two files that decide them are
# copied here (README.md, which pyproject.toml names, is a stand-in until the code comes).
# In the same layer, what no role runs: the packages' own test suites (pandas, scipy, sympy, ...)
# and torch's C++ test binaries, about 300 MB (docs/cluster.md, "The image"). psycopg (3): the
# driver SQLAlchemy 2.1 takes for the MLflow server's postgresql:// URIs (psycopg2 is no longer it).
COPY pyproject.toml constraints.txt ./
RUN mkdir unet_dist && touch unet_dist/__init__.py README.md \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c constraints.txt ".[gpu]" "psycopg[binary]" \
    && rm -rf unet_dist build ./*.egg-info README.md \
    && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && find "$site" -type d -name tests -prune -exec rm -rf {} + \
    && rm -rf "$site/torch/test" "$site"/torch/bin/test_*

# The code, then the job configs (entry points read /app/jobs/configs/*.yaml).
COPY README.md ./
COPY unet_dist ./unet_dist
RUN pip install --no-deps --force-reinstall . && rm -rf build ./*.egg-info
COPY jobs ./jobs

USER 1000:1000
ENV HOME=/home/app
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "unet_dist.demo", "--workdir", "/tmp/unet-demo"]
