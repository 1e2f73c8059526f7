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

# Checks of the scripts' variables: each refuses a bad value with one line naming the variable
# (`error: NPROC=abc: expected ...`) and exit code 2, before anything starts. NAME is the
# variable's name; its value is read with ${!NAME}.

# check_count NAME MIN: a whole number >= MIN.
check_count() {
    local value="${!1}"
    [[ "$value" =~ ^[0-9]+$ ]] && ((10#$value >= $2)) || die "$1=$value: expected a whole number >= $2"
}

# check_number NAME: a number >= 0 (CPUs and GPUs may be fractions).
check_number() {
    local value="${!1}"
    [[ "$value" =~ ^([0-9]+([.][0-9]*)?|[.][0-9]+)$ ]] || die "$1=$value: expected a number >= 0"
}

# check_one_of NAME VALUE...: one of the values.
check_one_of() {
    local name="$1" value="${!1}" choice
    shift
    for choice in "$@"; do [[ "$value" == "$choice" ]] && return 0; done
    local IFS="|"
    die "$name=$value: expected one of $*"
}

# check_nproc NAME: processes per node, as torchrun takes them: auto, gpu, cpu or a count >= 1.
check_nproc() {
    local value="${!1}"
    [[ "$value" =~ ^(auto|gpu|cpu)$ ]] && return 0
    [[ "$value" =~ ^[0-9]+$ ]] && ((10#$value >= 1)) && return 0
    die "$1=$value: expected auto (one per GPU, else one per CPU), gpu, cpu or a whole number >= 1"
}

# check_nnodes NAME: a node count N >= 1, or MIN:MAX for elastic membership.
check_nnodes() {
    local value="${!1}"
    if [[ "$value" =~ ^([0-9]+)(:([0-9]+))?$ ]]; then
        local low=$((10#${BASH_REMATCH[1]})) high=$((10#${BASH_REMATCH[3]:-${BASH_REMATCH[1]}}))
        ((low >= 1 && low <= high)) && return 0
    fi
    die "$1=$value: expected a number of nodes >= 1, or MIN:MAX with 1 <= MIN <= MAX"
}

# check_host NAME: a host name or address, without a port (that has its own variable).
check_host() {
    local value="${!1}"
    [[ "$value" =~ ^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$ || "$value" =~ ^\[[0-9A-Fa-f:]+\]$ ]] \
        || die "$1=$value: expected a host name or IP address, without a port"
}

# check_port NAME: a TCP port, 1..65535.
check_port() {
    local value="${!1}"
    [[ "$value" =~ ^[0-9]+$ ]] && ((10#$value >= 1 && 10#$value <= 65535)) \
        || die "$1=$value: expected a TCP port, 1..65535"
}

# check_name NAME: an id that ends up in names and URLs: letters, digits, '.', '_', '-'.
check_name() {
    local value="${!1}"
    [[ "$value" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "$1=$value: expected letters, digits, '.', '_' or '-'"
}

# check_program NAME: an executable on PATH (not checked with DRY_RUN=1, which runs nothing).
check_program() {
    [[ "${DRY_RUN:-0}" == "1" ]] && return 0
    command -v "${!1}" >/dev/null 2>&1 || die "$1=${!1}: no such program on PATH"
}

# check_dry_run: DRY_RUN is 0, 1 or unset (DRY_RUN=yes must not start a real job).
check_dry_run() {
    local DRY_RUN="${DRY_RUN:-0}"
    check_one_of DRY_RUN 0 1
}

# check_training: before torchrun starts N ranks that would each fail alike (and torchrun then print
# its own traceback), check the config and this machine once: `python -m unet_dist.train --check`
# with the interpreter torchrun runs the ranks with. Uses CONFIG, SET_ARGS, NPROC and TORCHRUN.
check_training() {
    [[ "${DRY_RUN:-0}" == "1" ]] && return 0
    local ranks=0
    [[ "$NPROC" =~ ^[0-9]+$ ]] && ranks="$NPROC"
    "$(training_python)" -m unet_dist.train --check --torchrun-ranks "$ranks" --config "$CONFIG" "${SET_ARGS[@]}" \
        >/dev/null || exit "$?"
}

# training_python: $PYTHON, else the python next to $TORCHRUN (torchrun's environment), else python3.
training_python() {
    local python="${PYTHON:-$(dirname "$(command -v "$TORCHRUN")")/python}"
    [[ -x "$python" ]] || command -v "$python" >/dev/null 2>&1 || python="$(command -v python3 || echo python)"
    printf '%s\n' "$python"
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
