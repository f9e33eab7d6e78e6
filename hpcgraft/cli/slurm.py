"""Write the SLURM scripts out of an installed package, ready for ``bash DIR/graft_cifar.sh`` or sbatch.

    python -m hpcgraft.slurm DIR [--force]        (also: hpcgraft-slurm DIR)

Written out, the scripts run this Python (the one that wrote them) unless ``HPCGRAFT_PYTHON`` says
otherwise, and run the job in the directory they are submitted from, where relative paths (run
directories, data) are then taken; configs can be given by name (``HPCGRAFT_CONFIG=cifar10_resnet32``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hpcgraft.errors import EXIT_USAGE, report
from hpcgraft.slurm import SCRIPTS, SCRIPTS_DIR

PROG = "hpcgraft.slurm"
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
                                      "  # the python that wrote these scripts (python -m hpcgraft.slurm)")
        path = out / name
        path.write_text(text)
        path.chmod(0o755 if name.endswith(".sh") else 0o644)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcgraft.slurm", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="where to write graft_cifar.sh, graft_imagenet.sh and their helpers")
    p.add_argument("--force", action="store_true", help="overwrite scripts already in DIR")
    a = p.parse_args(argv)
    try:
        written = write_scripts(a.dir, a.force)
    except (FileExistsError, OSError) as exc:
        return report(PROG, exc, EXIT_USAGE)
    print(f"wrote {', '.join(p.name for p in written)} to {Path(a.dir).absolute()}")
    print(f"  submit from the directory the runs should go to: bash {Path(a.dir) / 'graft_cifar.sh'} [key=value ...]")
    print("  (edit the variable block at the top of the scripts, or set HPCGRAFT_<NAME>; see README.md there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
