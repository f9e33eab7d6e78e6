"""Train K peer networks with filter grafting: the command every rank runs.

    mpirun -np 2 python -m hpcgraft.train --config configs/digits.yaml --out runs/digits [key=value ...]

The rank's run and its exit statuses are :func:`hpcgraft.training.entry.train_rank`; this module is its command
line and, under a launcher, makes the process the rank's supervisor (:mod:`hpcgraft.supervise`) first.
"""

from __future__ import annotations

if __name__ == "__main__":  # before MPI and torch are imported: under a launcher, become the rank's supervisor
    from hpcgraft.supervise import supervise_module

    supervise_module("hpcgraft.cli.train")

import argparse
import sys

from hpcgraft.cli import add_overrides
from hpcgraft.config import load_config
from hpcgraft.errors import EXIT_OK, EXIT_USAGE, ConfigError, report
from hpcgraft.training.entry import train_rank


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m hpcgraft.train",
        description="Train K peer networks with filter grafting; one MPI rank per peer "
        "(mpirun -np K python -m hpcgraft.train ...).",
        epilog="Every key, its default and its meaning: docs/configuration.md.",
    )
    p.add_argument("--config", help="YAML run config (default: the built-in digits defaults)")
    p.add_argument("--out", help="run directory (default: runs/<config name>); re-running resumes it")
    p.add_argument("--restart", action="store_true", help="start over, discarding the run in --out")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults, --config, overrides) as YAML that --config reads "
                        "back, and exit without training or starting MPI")
    p.add_argument("--extend", action="store_true",
                   help="continue a (finished) run to a larger train.epochs; the schedule is the new length's "
                        "(docs/running.md)")
    p.add_argument("--from-step", type=int, metavar="N",
                   help="resume from the complete checkpoint of step N instead of the newest (later ones are dropped)")
    add_overrides(p)
    # Overrides may come anywhere, also after --out (argparse's plain parsing stops at the first option).
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of every rank; returns the process exit status."""
    args = parse_args(argv)
    if args.print_config:
        return print_config(args.config, args.overrides)
    return train_rank(args.config, args.overrides, args.out, restart=args.restart, extend=args.extend,
                      from_step=args.from_step)


def print_config(config: str | None, overrides: list[str]) -> int:
    """What a run with these arguments would train with, checked as a run checks it: one line and exit 2
    on a bad key or value."""
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        return report("hpcgraft", exc, EXIT_USAGE)
    sys.stdout.write(cfg.to_yaml())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
