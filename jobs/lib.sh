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
