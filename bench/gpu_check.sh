#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py holds the logic; `--help` lists the parts and tiers).
#
#   bench/gpu_check.sh --fetch-wheels .whl [--with-pyav]    # here: cp312 wheels the bare GPU image lacks (< 64 MiB)
#   bench/gpu_check.sh --wheels .whl --out-dir $OUT          # GPU machine, first call: the smoke tier (240 s)
#   bench/gpu_check.sh --wheels .whl --out-dir $OUT --tier bench   # second call: the bench tier (375 s)
#   bench/gpu_check.sh --dry-run [--tier all] [--wheels .whl]       # on CPU: the same logic at tiny shapes
#
# --wheels DIR installs DIR/*.whl into a temporary folder (pip --target, no index, no dependencies) and
# puts it on PYTHONPATH for this run only: the system's packages are never touched.
set -u
# the command's start: the tier's budget counts from here, so installing the wheels is inside it too
export HCUSTOM_GPU_CHECK_START="$(date +%s.%N)"
cd "$(dirname "$0")/.." || exit 2
# the checkout's hcustom_mc and hcustom_kernels (in kernels/), for every part: nothing is installed on the image
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
args=()
wheels=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
        --wheels=*) wheels="${1#--wheels=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ -n "$wheels" ]; then
    ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "error: no wheels in $wheels (was it named in carry?)" >&2; exit 2; }
    site="$(mktemp -d "${TMPDIR:-/tmp}/hcustom_gpu_check_site.XXXXXX")"
    trap 'rm -rf "$site"' EXIT
    echo "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site (this run only)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$site" "$wheels"/*.whl || { echo "error: installing the wheels from $wheels failed" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" bench/gpu_check.py ${args[@]+"${args[@]}"}
