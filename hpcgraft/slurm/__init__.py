"""The SLURM batch scripts, shipped inside the package so that an installed hpcgraft can submit runs too.

``graft_cifar.sh``, ``graft_imagenet.sh`` (what a user submits), ``common.sh`` (their shared part) and
``clean_mpich_shm.sh`` live next to this file; a checkout reaches them as ``slurm/`` (a link here).
``python -m hpcgraft.slurm DIR`` (or ``hpcgraft-slurm DIR``) writes them out for an installed package;
:mod:`hpcgraft.slurm.check` is the shape check they and ``hpcgraft.launch`` run before submitting.
"""

from __future__ import annotations

from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent
SCRIPTS = ("graft_cifar.sh", "graft_imagenet.sh", "common.sh", "clean_mpich_shm.sh", "README.md")
