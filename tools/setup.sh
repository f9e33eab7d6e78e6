#!/usr/bin/env bash
# One-command setup of the project's virtual environment (.venv): PyTorch (CPU build unless a CUDA
# build is already installed), MPI (the MPICH wheel, or the site's MPI with HPCGRAFT_SITE_MPI=1),
# mpi4py, h5py, submitit, the test tools, and Horovod built from source (cached after the first time).
#
#   tools/setup.sh            (what `make setup` runs; does nothing more once .venv is complete)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
py=${PYTHON:-python3}
"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "hpcgraft needs Python >= 3.11")'

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip >/dev/null
# This environment's torch, pinned exactly (pyproject allows a tested range): a bare or ranged install can
# pull several GB of CUDA packages here. A torch already in the venv (a cluster's CUDA build) is kept.
"$venv/bin/python" -c 'import torch' 2>/dev/null || "${pip[@]}" "${HPCGRAFT_TORCH:-torch==2.13.0}"
if [ "${HPCGRAFT_SITE_MPI:-0}" = 1 ]; then
    # Cluster: mpi4py compiled against the site's MPI (its mpicc on PATH), no MPICH wheel.
    "${pip[@]}" --no-binary=mpi4py --no-cache-dir mpi4py
    "${pip[@]}" -e ".[dev]"
else
    "${pip[@]}" -e ".[mpich,dev]"
fi
if [ "${HPCGRAFT_NO_HOROVOD:-0}" != 1 ]; then  # HPCGRAFT_NO_HOROVOD=1: no peer spans several GPUs
    bash tools/build_horovod.sh "$venv"
fi
"$venv/bin/python" - <<'PY'
import h5py, mpi4py, torch, submitit
print(f"hpcgraft setup: torch {torch.__version__}, mpi4py {mpi4py.__version__}, h5py {h5py.__version__}, "
      f"submitit {submitit.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}")
PY
touch "$venv/.hpcgraft-complete"
