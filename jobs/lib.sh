# Shared helpers for the launch scripts in jobs/ (sourced, not run).
#
# Every script takes its knobs from environment variables with defaults, and passes extra
# arguments on to the entry point: a bare `dotted.key=value` becomes `--set dotted.key=value`,
# anything else (`--set k=v`, `--config F`) goes through as written.

# Repository root: the folder holding jobs/ (the scripts may be called from anywhere).
UNET_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# die MESSAGE: one line on stderr, exit 2 (the project's exit code for user errors).
die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

# to_set_args ARG...: fills the array SET_ARGS with the arguments, `key=value` -> `--set key=value`.
to_set_args() {
    SET_ARGS=()
    while (($#)); do
        case "$1" in
            --set)
                (($# >= 2)) || die "--set needs a KEY=VALUE after it"
                SET_ARGS+=("$1" "$2")
                shift 2
                continue
                ;;
            -*) SET_ARGS+=("$1") ;;
            *=*) SET_ARGS+=(--set "$1") ;;
            *) SET_ARGS+=("$1") ;;
        esac
        shift
    done
}

# run CMD...: runs the command, or with DRY_RUN=1 prints it (shell-quoted, one line) instead.
run() {
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
        local out
        printf -v out '%q ' "$@"
        printf '%s\n' "${out% }"
    else
        "$@"
    fi
}

# resolve_config: sets CONFIG to an existing file, read relative to the caller's folder first,
# then to the repository root (so `CONFIG=jobs/configs/x.yaml` works from anywhere).
resolve_config() {
    if [[ -f "$CONFIG" ]]; then
        return
    fi
    if [[ "$CONFIG" != /* && -f "$UNET_REPO_ROOT/$CONFIG" ]]; then
        CONFIG="$UNET_REPO_ROOT/$CONFIG"
        return
    fi
    die "CONFIG=$CONFIG: config file not found"
}

# run_torchrun CMD...: like run, for a torchrun command. SIGTERM/SIGINT to this script go on to
# torchrun, whose agent forwards them to every rank; the ranks checkpoint at the next step boundary
# and stop. torchrun itself then exits 1 (it was signalled); when the ranks stopped for a preemption
# (a rank wrote $UNET_DIST_PREEMPTED_FILE) this exits 75 instead, so a scheduler can tell a
# preemption with a checkpoint from a failure (docs: Reliability, preemption).
run_torchrun() {
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
        run "$@"
        return
    fi
    local marker pid rc=0
    marker="$(mktemp)"
    export UNET_DIST_PREEMPTED_FILE="$marker"
    "$@" &
    pid=$!
    trap 'kill -TERM "$pid" 2>/dev/null || true' TERM
    trap 'kill -INT "$pid" 2>/dev/null || true' INT
    while :; do
        wait "$pid" && rc=0 || rc=$?
        kill -0 "$pid" 2>/dev/null || break  # wait was cut short by a trapped signal
    done
    trap - TERM INT
    if ((rc != 0)) && [[ -s "$marker" ]]; then
        rc=75
    fi
    rm -f "$marker"
    return "$rc"
}
