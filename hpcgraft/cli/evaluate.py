"""Top-1 and top-5 of a run's peers and of their ensemble, offline (no MPI).

    python -m hpcgraft.evaluate RUN_OR_CHECKPOINT_OR_PT [--peer I] [--best] [--data NAME --data-root DIR]
                                [--config YAML] [--json PATH] [key=value ...]

The evaluation is :func:`hpcgraft.training.evaluation.evaluate_saved`, scored as training's ``test_acc`` and
``ensemble_acc`` (the arg-max of the peers' mean softmax); this module is its command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpcgraft.cli import add_overrides
from hpcgraft.errors import EXIT_USAGE, UserError, report
from hpcgraft.storage.atomic import write_text
from hpcgraft.storage.outputs import check_output_file
from hpcgraft.training.evaluation import evaluate_saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcgraft.evaluate",
                                description="Top-1 and top-5 accuracy of a run's peers and of their ensemble "
                                "(mean softmax), on the run's test set or another data set. No MPI.")
    p.add_argument("path", type=Path, help="a run directory (its newest checkpoint), a checkpoint directory, a "
                   "peer .h5 file, or a .pt state dict (needs --config)")
    p.add_argument("--peer", type=int, help="evaluate only this peer")
    p.add_argument("--best", action="store_true", help="each peer's best checkpoint instead of the newest")
    p.add_argument("--config", help="YAML config that builds the model (needed for a .pt file)")
    p.add_argument("--data", help="evaluate on this data set (data.name) instead of the run's")
    p.add_argument("--data-root", help="its folder (data.root)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    add_overrides(p, "config overrides, e.g. data.test_batch_size=512")
    args = p.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    overrides += [f"data.name={args.data}"] if args.data else []
    overrides += [f"data.root={args.data_root}"] if args.data_root else []
    try:
        if args.json:
            check_output_file(args.json, "--json")
        record = evaluate_saved(args.path, peer=args.peer, best=args.best, config=args.config, overrides=overrides,
                          device=args.device)
    except UserError as exc:
        return report("hpcgraft", exc, EXIT_USAGE)
    table = record.pop("table")
    print(f"{record['source']}: {record['model']} on the {record['data']} test set "
          f"({record['images']} images, {record['classes']} classes)")
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)  # checked at start: nothing but folders in the way
        write_text(args.json, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
