"""Inspect hpcgraft checkpoints or export a peer's model, offline (no MPI).

    python -m hpcgraft.checkpoint inspect PATH [--tree]
    python -m hpcgraft.checkpoint export PATH --peer I [--best] --out model.pt

What is shown is :mod:`hpcgraft.storage.inspection`, what is written :mod:`hpcgraft.storage.export`; the
format itself lives in :mod:`hpcgraft.storage.checkpoints` and :mod:`hpcgraft.storage.tree`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hpcgraft.errors import EXIT_USAGE, UserError, report
from hpcgraft.storage.export import export_peer
from hpcgraft.storage.inspection import describe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcgraft.checkpoint",
                                     description="Inspect hpcgraft checkpoints or export a peer's model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="show what a checkpoint holds")
    p_inspect.add_argument("path", type=Path, help="a checkpoint directory, a peer .h5 file, or a run directory")
    p_inspect.add_argument("--tree", action="store_true", help="list every dataset with its dtype and shape")
    p_export = sub.add_parser("export", help="write a peer's model as a plain PyTorch state_dict")
    p_export.add_argument("path", type=Path, help="a checkpoint directory, a peer .h5 file, or a run directory")
    p_export.add_argument("--peer", type=int, help="which peer's model to export")
    p_export.add_argument("--best", action="store_true", help="the peer's best checkpoint of the run, not the newest")
    p_export.add_argument("--out", type=Path, required=True, help="the .pt file to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            for line in describe(args.path, args.tree):
                print(line)
        else:
            print(export_peer(args.path, args.peer, args.out, args.best))
    except UserError as exc:
        return report("hpcgraft", exc, EXIT_USAGE)
    except BrokenPipeError:  # output piped into head: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        return report("hpcgraft", f"{exc.filename or args.path}: {exc.strerror}", EXIT_USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
