#!/usr/bin/env bash
# The GPU check: every CUDA path of hpcgraft, PASS/FAIL per item with its figures, in at most
# 8 minutes on one GPU machine. The items are in tools/gpu_check.py; this script prepares the Python.
#
#   bash tools/gpu_wheels.sh                  here, once: the wheels the GPU machine cannot download
#   bash tools/gpu_check.sh                   there (the device tool: carry .gpu-wheels); summary in
#                                             $OUT/gpu_check.txt when OUT is set
#   bash tools/gpu_check.sh --cpu --fast      a dry run on the CPU with this checkout's .venv (CI runs it)
#
# On the GPU machine the project is installed beside that machine's own PyTorch: the MPI pair (MPICH
# wheel + mpi4py) from .gpu-wheels always, every other wheel there only where the machine lacks the
# package, then `pip install --no-deps -e .`. Options after the first are passed to gpu_check.py
# (--out DIR, --only ITEMS).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${HPCGRAFT_GPU_WHEELS:-.gpu-wheels}
if [ "${1:-}" = "--cpu" ]; then
    py=${PYTHON:-.venv/bin/python}
    [ -x "$py" ] || py=python3
    exec "$py" tools/gpu_check.py "$@"
fi

py=${PYTHON:-python3}
if [ -d "$wheels" ]; then
    pip=("$py" -m pip install --disable-pip-version-check -q --no-index --no-deps --no-cache-dir)
    install=()
    for whl in "$wheels"/*.whl; do
        name=$(basename "$whl" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
        module=$name
        case $name in pyyaml) module=yaml ;; esac
        if [ "$name" = mpich ] || [ "$name" = mpi4py ] || ! "$py" -c "import $module" 2>/dev/null; then
            install+=("$whl")
        fi
    done
    echo "gpu_check: installing ${#install[@]} wheel(s) from $wheels: $(printf '%s ' "${install[@]##*/}")"
    "${pip[@]}" "${install[@]}"
else
    echo "gpu_check: no $wheels here (run tools/gpu_wheels.sh where there is an index); using what is installed"
fi
"$py" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e . >/dev/null
exec "$py" tools/gpu_check.py "$@"
