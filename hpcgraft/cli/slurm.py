"""Write the SLURM scripts out of an installed package, ready for ``bash DIR/graft_cifar.sh`` or sbatch.

    python -m hpcgraft.slurm DIR [--force]        (also: hpcgraft-slurm DIR)

Written out, the scripts run this Python (the one that wrote them) unless ``HPCGRAFT_PYTHON`` says
otherwise, and run the job in the directory they are submitted from, where relative paths (run
directories, data) are then taken; configs can be given by name (``HPCGRAFT_CONFIG=cifar10_resnet32``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpcgraft.errors import EXIT_USAGE, report
from hpcgraft.slurm import write_scripts

PROG = "hpcgraft.slurm"


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
