"""Offline grafting of two saved models, with the same math as a training run's grafting round.

    python -m hpcgraft.graft SELF SOURCE --out OUT.pt [--level layer|filter] [--a 0.4] [--c 500]
                             [--bins 10] [--round-alpha] [--report report.json]
                             [--reference paper|authors] [--authors-code grafting_cifar|grafting_imagenet|filter_level]

SELF keeps alpha of itself per layer (or filter) and takes 1 - alpha from SOURCE, alpha from the two
weights' entropies (docs/method.md). This grafts networks trained apart (the authors' checkpoints, exported
peers, fine-tuned copies) without MPI. Inputs: a PyTorch state dict (.pt/.pth, read with
``weights_only=True``, so loading cannot run code), a checkpoint dict holding one under 'state_dict',
'model' or 'net' ('module.' prefixes of DataParallel are dropped), or an hpcgraft HDF5 peer file.
The output is a plain state dict; the per-layer table goes to stdout and, with --report, to JSON.
The work is :func:`hpcgraft.training.offline.graft_saved`; this module is its command line.
"""

from __future__ import annotations

import argparse
import sys

from hpcgraft.config import authors_reference_conflict
from hpcgraft.errors import EXIT_USAGE, InputError, report
from hpcgraft.method.authors import CODES
from hpcgraft.method.grafting import REFERENCES, GraftMath
from hpcgraft.training.offline import graft_saved

PROG = "hpcgraft-graft"


# ------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcgraft-graft", description="Graft SOURCE into SELF (filter grafting, "
                                "CVPR 2020) and save the result as a state dict.")
    p.add_argument("self_path", metavar="SELF", help="the model that is grafted (.pt/.pth or hpcgraft peer .h5)")
    p.add_argument("source_path", metavar="SOURCE", help="the model that gives weights (same architecture)")
    p.add_argument("--out", required=True, help="where to write the grafted state dict (.pt)")
    p.add_argument("--level", choices=("layer", "filter"), default="layer",
                   help="one coefficient per layer (default) or per output filter")
    p.add_argument("--a", type=float, default=0.4, help="coefficient range: alpha in (1/2 - a/2, 1/2 + a/2)")
    p.add_argument("--c", type=float, default=500.0, help="steepness of alpha in the entropy difference")
    p.add_argument("--bins", type=int, default=10, help="histogram bins of the entropy")
    p.add_argument("--round-alpha", action="store_true", help="round alpha to 2 decimals like the authors' code")
    p.add_argument("--reference", choices=REFERENCES, default="paper",
                   help="paper: the method (default); authors: the authors' code's arithmetic, bit for bit on CPU")
    p.add_argument("--authors-code", choices=CODES, default="grafting_cifar",
                   help="with --reference authors, which of their scripts: grafting_cifar (ResNets, MobileNetV2), "
                        "grafting_imagenet, filter_level (their VGG16 layer level)")
    p.add_argument("--report", help="also write the per-layer entropies and coefficients to this JSON file")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.a <= 1.0:
        raise InputError(f"--a must lie in [0, 1] so that alpha stays in [0, 1], got {args.a}")
    if not args.c >= 0.0:
        raise InputError(f"--c must be >= 0, got {args.c}")
    if args.bins < 2:
        raise InputError(f"--bins must be >= 2, got {args.bins}")
    conflict = authors_reference_conflict(lambda key, value: f"--{key} {value}", level=args.level)
    if args.reference == "authors" and conflict:
        raise InputError(conflict)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (hpcgraft-graft); returns the exit status: 0 done, 2 bad input."""
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        result = graft_saved(args.self_path, args.source_path, GraftMath(
            args.reference, args.level, args.a, args.c, args.bins, args.round_alpha, args.authors_code), args.out,
            args.report)
    except (InputError, OSError) as exc:
        return report(PROG, exc, EXIT_USAGE)
    print(result.table())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
