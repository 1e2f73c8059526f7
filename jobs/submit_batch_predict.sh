#!/usr/bin/env bash
# Submit a batch prediction (python -m unet_dist.batch_predict) to a running Ray cluster:
# jobs/submit_ray.sh with MODULE=batch_predict. The driver only lists the inputs and counts the
# results, so by default it reserves one CPU and lands on a worker node instead of a 0-CPU head.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    cat <<'HELP'
Usage: jobs/submit_batch_predict.sh [--no-wait] [--submission-id ID] [--] --model M --input SRC --out DST [ARG...]

Submits `python -m unet_dist.batch_predict ARG...` with `ray job submit` and, by default, waits
for it: exits 0 only if the job SUCCEEDED. SRC and DST must be storage every Ray node can read
and write (a shared volume or s3://, gs://, az://). Resubmitting the same command after a failure
predicts only the photos whose masks are not all written (docs/batch_prediction.md).

Same options and environment as jobs/submit_ray.sh (see its --help), with these defaults:
  ENTRYPOINT_NUM_CPUS  1
  SUBMISSION_ID        unet-batch_predict-<timestamp>
HELP
    exit 0
fi
export MODULE=batch_predict
export ENTRYPOINT_NUM_CPUS="${ENTRYPOINT_NUM_CPUS:-1}"
exec "$here/submit_ray.sh" "$@"
