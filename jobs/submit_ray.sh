#!/usr/bin/env bash
# Submit training (or, with MODULE=preprocess, preprocessing; MODULE=batch_predict, batch prediction)
# to a running Ray cluster.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: jobs/submit_ray.sh [--no-wait] [--submission-id ID] [--] [KEY=VALUE | --set KEY=VALUE]...

Submits \`python -m unet_dist.\$MODULE --config \$CONFIG [--set ...]\` with \`ray job submit\`,
uploading this repository as the job's working directory (jobs/ray/runtime_env.yaml). By default
it follows the job's logs until it ends and exits 0 only if the job SUCCEEDED.

Options:
  --no-wait            return once the job is accepted (follow it with \`ray job logs -f ID\`)
  --submission-id ID   job id (default: \$SUBMISSION_ID or unet-\$MODULE-<timestamp>)
  -h, --help           show this help
  KEY=VALUE            passed on as --set KEY=VALUE (e.g. train.steps=2000)
  ARG...               for a module without a config (batch_predict): its own arguments, as they are

Environment (default):
  RAY_ADDRESS          job server (http://127.0.0.1:8265)
  CONFIG               config, relative to the repository root or absolute on the cluster
                       (jobs/configs/pairs.yaml)
  MODULE               entry point under unet_dist (train)
  RUNTIME_ENV          runtime env file (jobs/ray/runtime_env.yaml)
  FORWARD_ENV          variables copied from this shell into the job (MLFLOW_TRACKING_URI); add a
                       store's non-secret settings, e.g. AWS_ENDPOINT_URL AWS_REGION or
                       AZURE_STORAGE_ACCOUNT_NAME (docs/storage.md); credentials are refused
  ENTRYPOINT_NUM_CPUS  CPUs reserved for the driver; >0 keeps it off a 0-CPU head (unset)
  ENTRYPOINT_NUM_GPUS  GPUs reserved for the driver (unset)
  RAY_AUTH_MODE        token | disabled (token): Ray token authentication, on unless disabled
  RAY_AUTH_TOKEN       the cluster's token; or a file: RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.
                       Never forwarded into the job (docs/security.md)
  PYTHON               interpreter that has ray installed (python, else python3)
  DRY_RUN=1            print the submit command instead of running it
EOF
}

MODULE="${MODULE:-train}"
CONFIG="${CONFIG:-jobs/configs/pairs.yaml}"
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
RUNTIME_ENV="${RUNTIME_ENV:-$UNET_REPO_ROOT/jobs/ray/runtime_env.yaml}"
PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
SUBMISSION_ID="${SUBMISSION_ID:-}"
WAIT=1

while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --no-wait) WAIT=0; shift ;;
        --submission-id)
            (($# >= 2)) || die "--submission-id needs a value"
            SUBMISSION_ID="$2"; shift 2 ;;
        --submission-id=*) SUBMISSION_ID="${1#*=}"; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
done
# Modules that take a config get --config and --set; others (batch_predict) their own arguments.
CONFIGURED=0
case "$MODULE" in train | preprocess | tune | demo) CONFIGURED=1 ;; esac
if ((CONFIGURED)); then
    to_set_args "$@"
    ENTRY_ARGS=(--config "$CONFIG" "${SET_ARGS[@]}")
else
    ENTRY_ARGS=("$@")
fi

check_dry_run
[[ "$MODULE" =~ ^[a-z_]+$ ]] || die "MODULE=$MODULE: expected a module name such as train or preprocess"
[[ "$ADDRESS" =~ ^(https?|ray)://[^[:space:]/]+/?$ ]] \
    || die "RAY_ADDRESS=$ADDRESS: expected the job server's address, e.g. http://HEAD:8265 (the dashboard port)"
[[ -z "$SUBMISSION_ID" ]] || check_name SUBMISSION_ID
[[ -z "${ENTRYPOINT_NUM_CPUS:-}" ]] || check_number ENTRYPOINT_NUM_CPUS
[[ -z "${ENTRYPOINT_NUM_GPUS:-}" ]] || check_number ENTRYPOINT_NUM_GPUS
[[ "${FORWARD_ENV:-MLFLOW_TRACKING_URI}" =~ ^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*[[:space:]]*)*$ ]] \
    || die "FORWARD_ENV=$FORWARD_ENV: expected variable names separated by spaces"
check_program PYTHON
[[ -f "$RUNTIME_ENV" ]] || die "RUNTIME_ENV=$RUNTIME_ENV: file not found"
# A relative config travels inside the uploaded working directory, so it must exist in this repo.
if ((CONFIGURED)) && [[ "$CONFIG" != /* && ! -f "$UNET_REPO_ROOT/$CONFIG" ]]; then
    die "CONFIG=$CONFIG: not found under $UNET_REPO_ROOT (give a repository-relative path, or an absolute path on the cluster)"
fi
SUBMISSION_ID="${SUBMISSION_ID:-unet-$MODULE-$(date -u +%Y%m%d-%H%M%S)}"

# Token authentication is on unless explicitly disabled. Ray 2.60 clients send a token only when
# RAY_AUTH_MODE=token, so say it explicitly, and refuse early when there is no token to send.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
case "$RAY_AUTH_MODE" in
    token)
        if [[ -z "${RAY_AUTH_TOKEN:-}" && ! -s "${RAY_AUTH_TOKEN_PATH:-${HOME:-/nonexistent}/.ray/auth_token}" \
              && "${DRY_RUN:-0}" != "1" ]]; then
            die "RAY_AUTH_TOKEN: no Ray token (set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; RAY_AUTH_MODE=disabled only for a cluster without token auth)"
        fi ;;
    disabled) ;;
    *) die "RAY_AUTH_MODE=$RAY_AUTH_MODE: expected token or disabled" ;;
esac

RUNTIME_ENV_JSON="$(FORWARD_ENV="${FORWARD_ENV:-MLFLOW_TRACKING_URI}" \
    "$PYTHON" "$UNET_REPO_ROOT/jobs/ray/job_tool.py" runtime-env "$RUNTIME_ENV")"

SUBMIT=(ray job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID"
    --working-dir "$UNET_REPO_ROOT" --runtime-env-json "$RUNTIME_ENV_JSON")
[[ -n "${ENTRYPOINT_NUM_CPUS:-}" ]] && SUBMIT+=(--entrypoint-num-cpus "$ENTRYPOINT_NUM_CPUS")
[[ -n "${ENTRYPOINT_NUM_GPUS:-}" ]] && SUBMIT+=(--entrypoint-num-gpus "$ENTRYPOINT_NUM_GPUS")
((WAIT)) || SUBMIT+=(--no-wait)
SUBMIT+=(-- python -m "unet_dist.$MODULE" "${ENTRY_ARGS[@]}")

if [[ "${DRY_RUN:-0}" != "1" ]]; then
    # A refused token or an unreachable head: one line, before anything is uploaded.
    "$PYTHON" "$UNET_REPO_ROOT/jobs/ray/job_tool.py" check --address "$ADDRESS"
fi
run "${SUBMIT[@]}"
if ((WAIT)) && [[ "${DRY_RUN:-0}" != "1" ]]; then
    # `ray job submit` exits 0 for a STOPPED job or when the log stream drops: ask for the end state.
    "$PYTHON" "$UNET_REPO_ROOT/jobs/ray/job_tool.py" wait --address "$ADDRESS" "$SUBMISSION_ID"
fi
