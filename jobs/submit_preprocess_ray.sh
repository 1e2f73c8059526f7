#!/usr/bin/env bash
# Submit the preprocess job (raw data -> shards) to a running Ray cluster: jobs/submit_ray.sh with
# MODULE=preprocess. The driver runs the whole job, so by default it reserves a CPU and lands on a
# worker node instead of a 0-CPU head.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    cat <<'HELP'
Usage: jobs/submit_preprocess_ray.sh [--no-wait] [--submission-id ID] [--] [KEY=VALUE | --set KEY=VALUE]...

Submits `python -m unet_dist.preprocess --config $CONFIG [--set ...]` with `ray job submit`
and, by default, waits for it: exits 0 only if the job SUCCEEDED. The shards land in the
config's shards.dir, which must be storage every Ray node (and later the trainers) can read.

Same options and environment as jobs/submit_ray.sh (see its --help), with these defaults:
  CONFIG               jobs/configs/pairs.yaml
  ENTRYPOINT_NUM_CPUS  1
  SUBMISSION_ID        unet-preprocess-<timestamp>
HELP
    exit 0
fi
export MODULE=preprocess
export ENTRYPOINT_NUM_CPUS="${ENTRYPOINT_NUM_CPUS:-1}"
exec "$here/submit_ray.sh" "$@"
