"""Invalid filters of a trained network, per conv layer: by l1 norm (the papers' criterion) and by entropy.

    python -m hpcgraft.analyze CHECKPOINT_OR_STATE [--peer I] [--thresholds 0.1 0.01] [--entropy-below 0.5]
    python -m hpcgraft.analyze RUN_OR_CHECKPOINT --criterion lean,bn [--keep 0.5]

The input is a plain PyTorch file holding a state dict (also one nested under "state_dict", "model" or
"net"), read so that it cannot run code, or an hpcgraft checkpoint (a run directory, one of its
``checkpoints/step-*`` directories, or a ``peer-*.h5`` file): :mod:`hpcgraft.storage.statefile`. The
criteria are :mod:`hpcgraft.method.validity`. Offline: no MPI.

With ``--criterion`` (a run or checkpoint: the model is rebuilt from the run's config), per conv layer
the filters each pruning criterion of :mod:`hpcgraft.method.pruning` calls invalid at ``--keep`` (a filter
it prunes; for a kernel criterion one with every kernel pruned; for bn the conv feeding a pruned BatchNorm
channel), and how many of them the l1 criterion at the same keep calls invalid too ("&l1"); then the
kernels each criterion keeps, "chosen>left": chosen by the criterion, left after removing the redundant
kernels (on no path from the image to the end of the network; ``--keep-redundant`` keeps them).
The peers are read and the tables drawn by :mod:`hpcgraft.reporting.filters`; this module is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from hpcgraft.errors import EXIT_USAGE, InputError, UserError, report
from hpcgraft.method.pruning import CRITERIA
from hpcgraft.method.validity import DEFAULT_ENTROPY_BELOW, totals
from hpcgraft.reporting.filters import criteria_overlap, filter_stats, format_overlap, format_table

PROG = "hpcgraft.analyze"


def criteria_main(args: argparse.Namespace) -> int:
    """``--criterion``: which filters each pruning criterion calls invalid, against the l1 set."""
    criteria = [c for c in args.criterion.split(",") if c]
    bad = [c for c in criteria if c not in CRITERIA]
    if bad or not criteria:
        return report(PROG, f"unknown criterion {bad[0] if bad else ''!r}; use one or several of {','.join(CRITERIA)}")
    if not 0 < args.keep <= 1:
        return report(PROG, f"--keep {args.keep} must lie in (0, 1]")
    try:
        results = criteria_overlap(Path(args.path), criteria, args.keep, args.peer, args.keep_redundant)
    except UserError as exc:
        return report(PROG, exc)
    if args.json:
        print(json.dumps({label: [asdict(s) for s in layers] for label, layers in results.items()}, indent=1))
    else:
        print("\n\n".join(format_overlap(label, layers, args.keep) for label, layers in results.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcgraft.analyze", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", metavar="CHECKPOINT_OR_STATE",
                    help="a state dict file (.pt) or an hpcgraft checkpoint (run dir, step dir or peer-*.h5)")
    ap.add_argument("--peer", type=int, help="only this peer of an hpcgraft checkpoint (default: all)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.01], metavar="T",
                    help="l1-norm thresholds (default: the papers' 0.1 0.01)")
    ap.add_argument("--entropy-below", type=float, default=DEFAULT_ENTROPY_BELOW, metavar="H",
                    help=f"count filters whose entropy (nats) is below H (default {DEFAULT_ENTROPY_BELOW})")
    ap.add_argument("--bins", type=int, default=10, help="histogram bins of the entropy (default 10, as grafting)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--criterion", help=f"pruning criteria to compare with l1, comma-separated: {','.join(CRITERIA)}")
    ap.add_argument("--keep", type=float, default=0.5, help="the criteria's kept fraction (default 0.5)")
    ap.add_argument("--keep-redundant", action="store_true",
                    help="with --criterion: keep the kernels on no path from the image to the end (default: removed)")
    args = ap.parse_args(argv)
    if args.criterion is not None:
        return criteria_main(args)
    if args.bins < 2:
        ap.error(f"--bins {args.bins} must be at least 2")
    try:
        results = filter_stats(Path(args.path), args.peer, args.thresholds, args.entropy_below, args.bins)
    except InputError as exc:
        return report(PROG, exc)
    empty = [label for label, stats in results.items() if not stats]
    if empty:
        return report(PROG, f"{empty[0]} has no conv layer (4-D weight); nothing to count", EXIT_USAGE)
    if args.json:
        print(json.dumps({label: {"layers": [asdict(s) for s in stats], "total": totals(stats)}
                          for label, stats in results.items()}, indent=1))
    else:
        print("\n\n".join(format_table(label, stats, args.thresholds, args.entropy_below)
                          for label, stats in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
