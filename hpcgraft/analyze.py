"""Invalid filters of a trained network, per conv layer: by l1 norm (the papers' criterion) and by entropy.

    python -m hpcgraft.analyze CHECKPOINT_OR_STATE [--peer I] [--thresholds 0.1 0.01] [--entropy-below 0.5]

The input is a plain PyTorch file holding a state dict (also one nested under "state_dict", "model" or
"net"), read so that it cannot run code, or an hpcgraft checkpoint (a run directory, one of its
``checkpoints/step-*`` directories, or a ``peer-*.h5`` file): :mod:`hpcgraft.storage.statefile`. The
criteria are :mod:`hpcgraft.method.validity`. Offline: no MPI.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from hpcgraft.errors import EXIT_USAGE, InputError, report
from hpcgraft.method.validity import DEFAULT_ENTROPY_BELOW, LayerStats, analyze_state, totals
from hpcgraft.storage.statefile import load_states

PROG = "hpcgraft.analyze"


def format_table(label: str, stats: list[LayerStats], thresholds: list[float], entropy_below: float) -> str:
    inv = [f"l1<{t:g}" for t in thresholds]
    cols = ["layer", "shape", "filters", *inv, f"H<{entropy_below:g}", "min l1", "mean H"]
    rows = [[s.name, "x".join(map(str, s.shape)), str(s.filters), *[str(s.invalid[f"{t:g}"]) for t in thresholds],
             str(s.low_entropy), f"{s.min_l1:.3g}", f"{s.mean_entropy:.3f}"] for s in stats]
    tot = totals(stats)
    rows.append(["total", f"{tot['layers']} conv layers", str(tot["filters"]),
                 *[str(tot["invalid"][f"{t:g}"]) for t in thresholds], str(tot["low_entropy"]), "", ""])
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                          strict=True)))

    summary = ", ".join(f"{tot['invalid'][f'{t:g}']}/{tot['filters']} below l1 {t:g}" for t in thresholds)
    return "\n".join([f"{label}: {summary}, {tot['low_entropy']}/{tot['filters']} below entropy "
                      f"{entropy_below:g}", line(cols), *[line(r) for r in rows]])


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
    args = ap.parse_args(argv)
    if args.bins < 2:
        ap.error(f"--bins {args.bins} must be at least 2")
    try:
        states = load_states(args.path, args.peer)
    except InputError as exc:
        return report(PROG, exc)
    results = {label: analyze_state(s, args.thresholds, args.entropy_below, args.bins) for label, s in states.items()}
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
