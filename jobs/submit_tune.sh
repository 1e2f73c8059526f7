#!/usr/bin/env bash
# Submit a hyperparameter sweep (python -m unet_dist.tune) to a running Ray cluster:
# jobs/submit_ray.sh with MODULE=tune and the sweep file added as --search.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
source "$here/lib.sh"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    cat <<'HELP'
Usage: jobs/submit_tune.sh [--no-wait] [--submission-id ID] [--] [KEY=VALUE | --set KEY=VALUE]...

Submits `python -m unet_dist.tune --config $CONFIG --search $SEARCH [--set ...]` with
`ray job submit` and, by default, waits for it: exits 0 only if the job SUCCEEDED. KEY=VALUE
changes the base config of every trial. Resubmitting the same sweep (same `name` in the sweep
file, same train.checkpoint_dir on shared storage) resumes it.

Same options and environment as jobs/submit_ray.sh (see its --help), with these defaults:
  CONFIG               jobs/configs/demo.yaml
  SEARCH               sweep file, repository-relative or absolute on the cluster
                       (jobs/sweeps/demo.yaml)
  SUBMISSION_ID        unet-tune-<timestamp>
The driver only waits on its trials: it reserves no CPU unless ENTRYPOINT_NUM_CPUS is set.
HELP
    exit 0
fi
SEARCH="${SEARCH:-jobs/sweeps/demo.yaml}"
# A relative sweep file travels inside the uploaded working directory, so it must exist in this repo.
if [[ "$SEARCH" != /* && ! -f "$UNET_REPO_ROOT/$SEARCH" ]]; then
    die "SEARCH=$SEARCH: not found under $UNET_REPO_ROOT (give a repository-relative path, or an absolute path on the cluster)"
fi
export MODULE=tune
export CONFIG="${CONFIG:-jobs/configs/demo.yaml}"
exec "$here/submit_ray.sh" "$@" --search "$SEARCH"
