"""Plots and a Markdown summary of finished (or running) runs: the evidence for or against grafting.

    python -m hpcgraft.report RUN_DIR [RUN_DIR ...] [--out DIR]
    python -m hpcgraft.report SWEEP_DIR [--out DIR]     (a sweep's table: sweep.md)

Reads each run directory's config (:mod:`hpcgraft.storage.run`), metrics.jsonl and graft.jsonl (see
:mod:`hpcgraft.storage.runlog`) and writes into ``--out`` (default: ``RUN_DIR/report`` of the first run):

- ``accuracy.png``: test top-1 of every peer and of the ensemble per epoch, one panel per run;
- ``invalid.png``: invalid filters (l1 norm below each threshold) per epoch, every run in the same
  panel, so a baseline run given beside a grafted run shows the "before/after" of the papers;
- ``training.png``: train loss and learning rate per epoch, every peer of every run;
- ``<run>_alpha.png`` and ``<run>_h_self.png`` for grafted runs: heat maps (layer x graft point, one
  panel per peer) of the coefficient alpha each layer kept of itself and of the layer's entropy h_self;
- ``invalid_layers.png`` when the runs wrote checkpoints: invalid filters per conv layer of peer 0 in
  each run's newest checkpoint, a heat map with one row per layer and one column per run (before/after,
  given a baseline and a grafted run);
- ``pruning.png`` when a run directory holds results of ``python -m hpcgraft.prune --out RUN_DIR/SUBDIR``:
  top-1 (mean over peers and over the runs of an arm) vs the kept fraction, one line per criterion and
  arm (baseline or grafted);
- ``summary.md``: the runs, their best and final accuracies and invalid-filter counts and, when one run
  is a baseline (graft.mode=none without cultivation), the side-by-side table the papers show.

Runs that cover different numbers of epochs are compared all the same, with a warning (stderr and summary.md).
The plots need matplotlib (``pip install 'hpcgraft[report]'``); a sweep's table does not. The reading, the
tables and the plots live in :mod:`hpcgraft.reporting` (:func:`~hpcgraft.reporting.summary.report_runs`); this
module parses the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpcgraft.errors import InputError, report
from hpcgraft.reporting.runs import SWEEP_FILE
from hpcgraft.reporting.tables import write_sweep_report
from hpcgraft.storage.outputs import check_output_dir

PROG = "hpcgraft.report"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcgraft.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (--out of hpcgraft.train)")
    ap.add_argument("--out", help="where to write the plots and summary.md (default: RUN_DIR/report of the first)")
    args = ap.parse_args(argv)
    if len(args.runs) == 1 and (Path(args.runs[0]) / SWEEP_FILE).is_file():  # a sweep: its table
        try:
            md = write_sweep_report(Path(args.runs[0]), check_output_dir(args.out or Path(args.runs[0]) / "report",
                                                                         "--out"))
        except InputError as exc:
            return report(PROG, exc)
        print(md.read_text(), end="")
        print(f"hpcgraft.report: wrote {md}")
        return 0
    try:
        from hpcgraft.reporting.summary import report_runs  # the plots: matplotlib, before any run is read

        summary = report_runs(args.runs, args.out,
                              lambda warning: print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True))
    except InputError as exc:
        return report(PROG, exc)
    out = summary.parent
    print(f"hpcgraft.report: wrote {summary} and {len(list(out.glob('*.png')))} plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
