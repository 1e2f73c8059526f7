#!/usr/bin/env bash
# Train on one machine with torchrun: one process per GPU (or per CPU group), restarted on failure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF2
Usage: jobs/torchrun_single.sh [KEY=VALUE | --set KEY=VALUE]...

Runs on this machine:
  torchrun --standalone --nproc-per-node=\$NPROC --max-restarts=\$MAX_RESTARTS \\
           -m unet_dist.train --config \$CONFIG [--set ...]
Each rank runs the same training loop; a restart resumes from the newest checkpoint in
train.checkpoint_dir/train.run_name. First, once, \`python -m unet_dist.train --check\` checks the
config and this machine (CUDA for train.use_gpu): a mistake is one error line, before any rank starts.

Environment (default):
  CONFIG        config file (jobs/configs/pairs.yaml)
  NPROC         processes: auto (one per GPU, else one per CPU), gpu, cpu or a number (auto)
  MAX_RESTARTS  worker-group restarts before giving up (3)
  TORCHRUN      torchrun executable (torchrun)
  PYTHON        interpreter for the check (the python next to TORCHRUN)
  DRY_RUN=1     print the command instead of running it
EOF2
}

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }
check_dry_run
NPROC="${NPROC:-auto}" && check_nproc NPROC
MAX_RESTARTS="${MAX_RESTARTS:-3}" && check_count MAX_RESTARTS 0
TORCHRUN="${TORCHRUN:-torchrun}" && check_program TORCHRUN
CONFIG="${CONFIG:-jobs/configs/pairs.yaml}"
resolve_config
to_set_args "$@"
check_training

run_torchrun "$TORCHRUN" --standalone \
    --nproc-per-node="$NPROC" \
    --max-restarts="$MAX_RESTARTS" \
    -m unet_dist.train --config "$CONFIG" "${SET_ARGS[@]}"
