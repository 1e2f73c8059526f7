#!/usr/bin/env bash
# Turn a raw dataset into WebDataset shards on this machine (the preprocess job, one node).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF2
Usage: jobs/preprocess.sh [KEY=VALUE | --set KEY=VALUE]...

Runs: python -m unet_dist.preprocess --config \$CONFIG [--set ...]
Reads data.root, writes shards and manifest.json to shards.dir. Rerunning it is safe: it
resumes, and gives identical bytes. Put shards.dir on storage the trainers can read.

Environment (default):
  CONFIG     config file (jobs/configs/pairs.yaml)
  PYTHON     interpreter with unet_dist installed (python, else python3)
  DRY_RUN=1  print the command instead of running it
EOF2
}

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }
check_dry_run
CONFIG="${CONFIG:-jobs/configs/pairs.yaml}"
resolve_config
to_set_args "$@"

PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
check_program PYTHON
run "$PYTHON" -m unet_dist.preprocess --config "$CONFIG" "${SET_ARGS[@]}"
