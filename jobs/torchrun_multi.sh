#!/usr/bin/env bash
# Train on several machines with torchrun: run this same command on every node.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF2
Usage: NNODES=N NODE_RANK=I MASTER_ADDR=HOST jobs/torchrun_multi.sh [KEY=VALUE | --set KEY=VALUE]...

Run on each of the NNODES machines (same RUN_ID and MASTER_ADDR everywhere):
  torchrun --nnodes=\$NNODES --node-rank=\$NODE_RANK --nproc-per-node=\$NPROC \\
           --rdzv-backend=c10d --rdzv-endpoint=\$MASTER_ADDR:\$MASTER_PORT --rdzv-id=\$RUN_ID \\
           --max-restarts=\$MAX_RESTARTS -m unet_dist.train --config \$CONFIG [--set ...]
The c10d rendezvous is hosted by NODE_RANK 0 (--rdzv-conf is_host=true there, false elsewhere), so
MASTER_ADDR must be node 0's address: torchrun's own guess (does MASTER_ADDR match this host's name?)
fails on hosts whose name resolves to another NIC or to 127.0.1.1. For the same reason each agent
advertises LOCAL_ADDR (node 0: MASTER_ADDR; the others: their address on the route to MASTER_ADDR)
rather than its host name, and every rendezvous round builds its own bootstrap store
(TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with a shared store, a node that rejoins after a crash waits
for ever for a round that the surviving node never announces). train.checkpoint_dir
must be storage every node sees (NFS, a shared volume) so a restart resumes everywhere.

Environment (default):
  NNODES        number of nodes, or MIN:MAX for elastic membership (required)
  NODE_RANK     this node's rank, 0..NNODES-1 (required; c10d may reassign ranks)
  MASTER_ADDR   host name or address of the rendezvous node (required)
  IS_HOST       whether this node hosts the rendezvous store (true when NODE_RANK is 0)
  LOCAL_ADDR    the address other nodes reach this one at (see above)
  MASTER_PORT   rendezvous port, open between the nodes (29500)
  RUN_ID        rendezvous id shared by all nodes of one run (unet-dist)
  CONFIG        config file (jobs/configs/cityscapes.yaml)
  NPROC         processes per node: auto, gpu, cpu or a number (auto)
  MAX_RESTARTS  worker-group restarts before giving up (3); with NNODES=MIN:MAX a node that joins
                restarts the group without using one up
  RDZV_CONF     more c10d rendezvous settings, KEY=VALUE[,KEY=VALUE], e.g. last_call_timeout=5
                (seconds an elastic rendezvous waits for more nodes once MIN have joined; 30)
  TORCHRUN      torchrun executable (torchrun)
  PYTHON        interpreter with unet_dist installed, for the config check and LOCAL_ADDR
                (the python next to TORCHRUN, else python3)
  DRY_RUN=1     print the command instead of running it
EOF2
}

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }
[[ -n "${NNODES:-}" ]] || die "NNODES is not set (number of nodes, e.g. NNODES=2)"
[[ -n "${NODE_RANK:-}" ]] || die "NODE_RANK is not set (0 on the first node, 1 on the next, ...)"
[[ -n "${MASTER_ADDR:-}" ]] || die "MASTER_ADDR is not set (the rendezvous node's host name or address)"
check_dry_run
check_nnodes NNODES
check_count NODE_RANK 0
((10#$NODE_RANK < 10#${NNODES##*:})) || die "NODE_RANK=$NODE_RANK: expected 0..$((10#${NNODES##*:} - 1)) (NNODES=$NNODES)"
check_host MASTER_ADDR
MASTER_PORT="${MASTER_PORT:-29500}" && check_port MASTER_PORT
RUN_ID="${RUN_ID:-unet-dist}" && check_name RUN_ID
NPROC="${NPROC:-auto}" && check_nproc NPROC
MAX_RESTARTS="${MAX_RESTARTS:-3}" && check_count MAX_RESTARTS 0
[[ -z "${RDZV_CONF:-}" || "$RDZV_CONF" =~ ^[a-z_]+=[A-Za-z0-9_.]+(,[a-z_]+=[A-Za-z0-9_.]+)*$ ]] \
    || die "RDZV_CONF=$RDZV_CONF: expected KEY=VALUE[,KEY=VALUE] (e.g. last_call_timeout=5)"
TORCHRUN="${TORCHRUN:-torchrun}" && check_program TORCHRUN
CONFIG="${CONFIG:-jobs/configs/cityscapes.yaml}"
resolve_config
to_set_args "$@"
check_training
if [[ -z "${IS_HOST:-}" ]]; then
    IS_HOST=false
    [[ "$NODE_RANK" == 0 ]] && IS_HOST=true
fi
check_one_of IS_HOST true false
[[ -z "${LOCAL_ADDR:-}" ]] || check_host LOCAL_ADDR
if [[ -z "${LOCAL_ADDR:-}" ]]; then
    if [[ "$IS_HOST" == true ]]; then
        LOCAL_ADDR="$MASTER_ADDR"
    elif [[ "${DRY_RUN:-0}" != 1 ]]; then
        LOCAL_ADDR="$(cd "$UNET_REPO_ROOT" && "$(training_python)" -m unet_dist.distributed "$MASTER_ADDR" 2>/dev/null || true)"
    fi
fi
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
LOCAL_ADDR_ARGS=()
[[ -n "${LOCAL_ADDR:-}" ]] && LOCAL_ADDR_ARGS=(--local-addr="$LOCAL_ADDR")

run_torchrun "$TORCHRUN" \
    --nnodes="$NNODES" \
    --node-rank="$NODE_RANK" \
    --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id="$RUN_ID" \
    --rdzv-conf="is_host=$IS_HOST${RDZV_CONF:+,$RDZV_CONF}" \
    "${LOCAL_ADDR_ARGS[@]}" \
    --max-restarts="$MAX_RESTARTS" \
    -m unet_dist.train --config "$CONFIG" "${SET_ARGS[@]}"
