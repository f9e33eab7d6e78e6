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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from hpcgraft.config import authors_reference_conflict
from hpcgraft.errors import EXIT_USAGE, InputError, report
from hpcgraft.method.authors import CODES
from hpcgraft.method.grafting import REFERENCES, GraftMath, GraftReport, graft_state
from hpcgraft.storage import atomic
from hpcgraft.storage.outputs import check_output_file
from hpcgraft.storage.run import model_weights

PROG = "hpcgraft-graft"


# ----------------------------------------------------------------------------------------- output
def format_table(result: GraftReport) -> str:
    """One line per layer: name, both entropies, alpha (and its range over filters at filter level)."""
    width = max([len("layer")] + [len(r.name) for r in result.layers])
    by_filter = result.level == "filter"
    head = f"{'layer':<{width}}  {'H self':>8}  {'H source':>8}  {'alpha':>7}"
    head += f"  {'min':>7}  {'max':>7}  {'filters':>7}" if by_filter else ""
    lines = [head]
    for r in result.layers:
        line = f"{r.name:<{width}}  {r.h_self:8.4f}  {r.h_source:8.4f}  {r.alpha:7.4f}"
        lines.append(line + (f"  {r.alpha_min:7.4f}  {r.alpha_max:7.4f}  {r.filters:7d}" if by_filter else ""))
    lines.append(f"{len(result.layers)} layers, mean alpha {result.alpha_mean:.4f} ({result.level} level)")
    return "\n".join(lines)


def _save_atomic(obj: object, path: Path, write: Any) -> None:
    """Write under a temporary name, then rename: an interrupted run leaves no half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.replace(path, lambda tmp: write(obj, tmp))


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
        check_output_file(args.out, "--out")
        if args.report:
            check_output_file(args.report, "--report")
        own, source = model_weights(args.self_path), model_weights(args.source_path)
        try:
            grafted, result = graft_state(own, source, GraftMath(args.reference, args.level, args.a, args.c, args.bins,
                                                                 args.round_alpha, args.authors_code))
        except ValueError as exc:
            raise InputError(f"{args.self_path} and {args.source_path} cannot be grafted: {exc}") from exc
        _save_atomic(grafted, Path(args.out), torch.save)
        if args.report:
            doc = {"self": str(args.self_path), "source": str(args.source_path), "out": str(args.out),
                   "a": args.a, "c": args.c, "bins": args.bins, "round_alpha": args.round_alpha,
                   "reference": args.reference, "authors_code": args.authors_code, **result.to_dict()}
            _save_atomic(doc, Path(args.report), lambda d, p: p.write_text(json.dumps(d, indent=1) + "\n"))
    except (InputError, OSError) as exc:
        return report(PROG, exc, EXIT_USAGE)
    print(format_table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
