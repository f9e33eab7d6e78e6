#!/usr/bin/env bash
# Download, here, the wheels that tools/gpu_check.sh installs on a GPU machine that cannot reach a
# package index: what the project needs beside that machine's own PyTorch (and the numpy, scipy,
# scikit-learn, matplotlib and Pillow that PyTorch images carry), built for that machine's Python.
#
#   bash tools/gpu_wheels.sh [PYTHON_VERSION] [DIR]     (default 3.12 .gpu-wheels; DIR is git-ignored)
#
# The MPI pair (the MPICH wheel and mpi4py) always comes from here, so that mpirun and mpi4py match;
# everything else is installed there only where the machine lacks it (gpu_check.sh decides).
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=${1:-3.12}
dir=${2:-.gpu-wheels}
mkdir -p "$dir"
pip=(python3 -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: -d "$dir"
     --python-version "$pyver" --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Versions are the ones this repository's own setup installs (tools/setup.sh resolves them from PyPI).
"${pip[@]}" mpich==5.0.2 mpi4py==4.1.2 submitit==1.5.4 h5py==3.16.0 pyyaml==6.0.4 tqdm==4.70.1
du -sh "$dir"
ls "$dir"
