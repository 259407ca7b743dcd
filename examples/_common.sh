# Sourced by the example scripts: the repository root, a new run folder per invocation, and torchrun with a
# short console (hcustom_mc.launch). Nothing an earlier run wrote is ever deleted or overwritten.
HC_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HC_RUNS=${HC_RUNS:-$HC_REPO/runs}  # where the default run folders go
export PYTHONPATH="$HC_REPO:$HC_REPO/kernels${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's hcustom_mc and hcustom_kernels (in kernels/), from any directory
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# new_root GIVEN BASE: print a new, empty, absolute folder and create it (atomically: mkdir fails if it exists).
# GIVEN (resolved against the caller's directory) must not exist or be empty; without it, BASE/<time>[-N]
# (BASE relative to HC_RUNS, or absolute). BASE/latest then points at it (a symlink: runs are never touched).
new_root() {
    local given=$1 base=$2 dir stamp n=1 parent
    if [ -n "$given" ]; then
        dir=$(realpath -m "$given")
        if [ -e "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
            echo "error: $dir exists and is not empty; give a new folder, or none for a new $base/<time> folder" >&2
            return 2
        fi
        mkdir -p "$dir" || return 2
    else
        case $base in /*) parent=$base ;; *) parent=$HC_RUNS/$base ;; esac
        mkdir -p "$parent" || return 2
        stamp=$(date +%Y%m%d-%H%M%S)
        dir="$parent/$stamp"
        until mkdir "$dir" 2>/dev/null; do n=$((n + 1)); dir="$parent/$stamp-$n"; done
        ln -sfn "$(basename "$dir")" "$parent/latest"
    fi
    echo "$dir"
}

# hc_torchrun NPROC ARGS...: torchrun's flags and behaviour, a one-line failure instead of its traceback
hc_torchrun() {
    local nproc=$1
    shift
    python -m hcustom_mc.launch --nproc-per-node "$nproc" --master-addr 127.0.0.1 \
        --master-port "${MASTER_PORT:-29500}" "$@"
}
