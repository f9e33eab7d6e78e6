"""The SLURM batch scripts, shipped inside the package so that an installed hpcgraft can submit runs too.

``graft_cifar.sh``, ``graft_imagenet.sh`` (what a user submits), ``common.sh`` (their shared part) and
``clean_mpich_shm.sh`` live next to this file; a checkout reaches them as ``slurm/`` (a link here).
``hpcgraft slurm DIR`` (:func:`write_scripts`) writes them out for an installed package;
:mod:`hpcgraft.slurm.check` is the shape check they and ``hpcgraft submit`` run before submitting.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent
SCRIPTS = ("graft_cifar.sh", "graft_imagenet.sh", "common.sh", "clean_mpich_shm.sh", "README.md")
# The scripts' default interpreter in a checkout; written-out copies name the interpreter that wrote them.
CHECKOUT_PYTHON = "PYTHON=${HPCGRAFT_PYTHON:-.venv/bin/python}"


def write_scripts(out: str | Path, force: bool = False) -> list[Path]:
    """Copy the scripts into ``out`` (made if needed), executable; refuses to overwrite unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; pick another DIR")
    clash = [n for n in SCRIPTS if (out / n).exists()]
    if clash and not force:
        raise FileExistsError(f"{out / clash[0]} already exists; pass --force to overwrite the scripts in {out}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SCRIPTS:
        text = (SCRIPTS_DIR / name).read_text()
        if name.startswith("graft_"):
            if CHECKOUT_PYTHON not in text:
                raise RuntimeError(f"{SCRIPTS_DIR / name} has no '{CHECKOUT_PYTHON}' line to point at this python")
            line = next(x for x in text.splitlines() if x.startswith(CHECKOUT_PYTHON))
            text = text.replace(line, f"PYTHON=${{HPCGRAFT_PYTHON:-{shlex.quote(sys.executable)}}}"
                                      "  # the python that wrote these scripts (hpcgraft slurm)")
        path = out / name
        path.write_text(text)
        path.chmod(0o755 if name.endswith(".sh") else 0o644)
        written.append(path)
    return written
