# syntax=docker/dockerfile:1
# One image for every role: preprocess, Ray head and workers (`ray start`), torchrun nodes and the
# MLflow server (`mlflow server`, with psycopg2 for PostgreSQL).
#
# CUDA: the torch wheel pinned in constraints.txt is PyPI's Linux build, which brings its own
# CUDA runtime libraries (nvidia-* wheels); the nodes need only an NVIDIA driver and the device
# plugin. For another CUDA build, pass e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
#
#   docker build -t REGISTRY/unet-dist:0.1.0 .
#   docker run --rm REGISTRY/unet-dist:0.1.0          # the CPU demo, end to end
FROM python:3.11.13-slim-bookworm

ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

# wget: KubeRay's default readiness/liveness probes call it. tini: signal handling for `docker run`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged user: the Kubernetes manifests run every pod as UID/GID 1000.
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/app --shell /bin/bash app

WORKDIR /app

# Dependencies first (a layer that survives code edits): install the project's requirements
# against an empty package, pinned by constraints.txt.
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir unet_dist && touch unet_dist/__init__.py \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c constraints.txt ".[gpu]" "psycopg2-binary==2.9.13" \
    && rm -rf unet_dist build ./*.egg-info

# The code, then the job configs (entry points read /app/jobs/configs/*.yaml).
COPY unet_dist ./unet_dist
RUN pip install --no-deps --force-reinstall . && rm -rf build ./*.egg-info
COPY jobs ./jobs

USER 1000:1000
ENV HOME=/home/app
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "unet_dist.demo", "--workdir", "/tmp/unet-demo"]
