"""Prune a trained run's peers by a criterion, optionally fine-tune them, and measure top-1.

    python -m hpcgraft.prune RUN_OR_CHECKPOINT --criterion lean,l1,bn --keep 0.1,0.3,0.5 \\
        [--finetune-epochs N] [--peer I] --out DIR [key=value ...]
    mpirun -np K python -m hpcgraft.prune ...     # rank r fine-tunes peers r, r+K, ...

Every (criterion, keep) pair is one job per peer: mask (:mod:`hpcgraft.method.pruning`; what keep counts is
defined there), fine-tune N epochs with the run's config (its schedule restarted over N epochs, no grafting,
no cultivation, no monitor; ``key=value`` words override more keys, e.g. train.lr=0.01) re-applying the mask after
every optimizer step, evaluate. Kernels on no path from the image to the end of the network (redundant:
:mod:`hpcgraft.method.redundancy`) are removed after the criterion's choice unless ``--keep-redundant``;
prune.json reports the kernels chosen and those left. Writes DIR/prune.json, one directory per job with each
peer's weights (peer-NNN.pt) and mask (peer-NNN.mask.pt), and prints a table. Every mask is computed before
any fine-tuning, so bad input (criterion, keep, no BatchNorm for bn, a stride LEAN does not support) ends
the command with one line and exit status 2 before any work. The work is :mod:`hpcgraft.training.finetune`;
this module is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpcgraft.cli import add_overrides
from hpcgraft.method import lean
from hpcgraft.method.pruning import CRITERIA
from hpcgraft.training.finetune import PruneRequest, prune_run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcgraft.prune", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="a run directory, a checkpoint step dir or peer-*.h5")
    ap.add_argument("--criterion", required=True, help=f"one or several, comma-separated: {','.join(CRITERIA)}")
    ap.add_argument("--keep", required=True, help="kept fraction(s) in (0, 1], comma-separated, e.g. 0.1,0.3,0.5")
    ap.add_argument("--finetune-epochs", type=int, default=0, metavar="N", help="fine-tune epochs (default 0)")
    ap.add_argument("--peer", type=int, help="only this peer (default: all)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="the older spelling of key=value")
    ap.add_argument("--image-size", type=int, default=lean.DEFAULT_IMAGE_SIZE, help="M of LEAN's operator norms")
    ap.add_argument("--keep-redundant", action="store_true",
                    help="keep the kernels on no path from the image to the end of the network (default: removed)")
    ap.add_argument("--out", required=True, type=Path, help="directory for prune.json, weights and masks")
    add_overrides(ap, "config overrides for fine-tuning")
    args = ap.parse_intermixed_args(argv)
    args.set = [*args.set, *args.overrides]
    return prune_run(PruneRequest(args.path, args.criterion, args.keep, args.out, args.finetune_epochs, args.peer,
                                  args.set, args.image_size, args.keep_redundant))


if __name__ == "__main__":
    sys.exit(main())
