"""Offline grafting of two saved models, with the same math as a training run's grafting round.

    python -m hpcgraft.graft SELF SOURCE --out OUT.pt [--level layer|filter] [--a 0.4] [--c 500]
                             [--bins 10] [--round-alpha] [--report report.json]

SELF keeps alpha of itself per layer (or filter) and takes 1 - alpha from SOURCE, alpha from the two
weights' entropies (method.md). This grafts networks trained apart (the authors' checkpoints, exported
peers, fine-tuned copies) without MPI. Inputs: a PyTorch state dict (.pt/.pth, read with
``weights_only=True``, so loading cannot run code), a checkpoint dict holding one under 'state_dict',
'model' or 'net' ('module.' prefixes of DataParallel are dropped), or an hpcgraft HDF5 peer file.
The output is a plain state dict; the per-layer table goes to stdout and, with --report, to JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcgraft import atomic
from hpcgraft.grafting import GraftReport, graft_state

STATE_KEYS = ("state_dict", "model", "net")  # where common checkpoint layouts keep the weights
DP_PREFIX = "module."


class GraftInputError(ValueError):
    """A model file that cannot be grafted; the message is one line naming the file and the fix."""


# ---------------------------------------------------------------------------------------- loading
def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside ``path`` (any of the supported layouts), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise GraftInputError(f"{path}: no such file; give a .pt/.pth state dict or an hpcgraft peer .h5 file")
    with path.open("rb") as f:
        is_hdf5 = f.read(8) == b"\x89HDF\r\n\x1a\n"
    obj = _load_hdf5(path) if is_hdf5 else _load_torch(path)
    return _find_state(obj, path)


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types; all mean "cannot read this"
        reason = _reason(exc)
        if "Unsupported global" in reason:
            raise GraftInputError(
                f"{path}: holds pickled objects that weights_only loading refuses ({reason}); re-save the "
                "weights alone with torch.save(model.state_dict(), path)") from exc
        raise GraftInputError(f"{path}: not a readable PyTorch file ({reason})") from exc


def _reason(exc: BaseException) -> str:
    """The informative part of a torch.load error, on one line."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n\n|$)", text, re.S)
    line = found.group(1) if found else next((ln for ln in text.splitlines() if ln.strip()), "")
    line = " ".join(line.split())
    return (line[:200] + "...") if len(line) > 200 else (line or type(exc).__name__)


def _load_hdf5(path: Path) -> Any:
    try:
        from hpcgraft.checkpoint import read_tree  # imported here: only HDF5 inputs need it
    except ImportError as exc:
        raise GraftInputError(f"{path}: reading HDF5 checkpoints needs hpcgraft.checkpoint, which this "
                              "installation lacks; export the peer to a .pt state dict first") from exc
    import h5py

    with h5py.File(path, "r") as f:
        return read_tree(f)


def _is_state(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor | np.ndarray) for v in obj.values()))


def _find_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    seen = []
    while not _is_state(obj):
        if not isinstance(obj, Mapping):
            raise GraftInputError(f"{path}: holds a {type(obj).__name__}, not a state dict; save "
                                  "model.state_dict() (or a dict with it under 'state_dict', 'model' or 'net')")
        key = next((k for k in STATE_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise GraftInputError(f"{path}: found no state dict (a dict of tensors, or one under 'state_dict', "
                                  f"'model' or 'net'{' inside ' + '/'.join(seen) if seen else ''}); keys: {keys}")
        seen.append(key)
        obj = obj[key]
    state = {k: torch.as_tensor(v) for k, v in obj.items()}
    if all(k.startswith(DP_PREFIX) for k in state):
        state = {k[len(DP_PREFIX):]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------------------- output
def format_table(report: GraftReport) -> str:
    """One line per layer: name, both entropies, alpha (and its range over filters at filter level)."""
    width = max([len("layer")] + [len(r.name) for r in report.layers])
    by_filter = report.level == "filter"
    head = f"{'layer':<{width}}  {'H self':>8}  {'H source':>8}  {'alpha':>7}"
    head += f"  {'min':>7}  {'max':>7}  {'filters':>7}" if by_filter else ""
    lines = [head]
    for r in report.layers:
        line = f"{r.name:<{width}}  {r.h_self:8.4f}  {r.h_source:8.4f}  {r.alpha:7.4f}"
        lines.append(line + (f"  {r.alpha_min:7.4f}  {r.alpha_max:7.4f}  {r.filters:7d}" if by_filter else ""))
    lines.append(f"{len(report.layers)} layers, mean alpha {report.alpha_mean:.4f} ({report.level} level)")
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
    p.add_argument("--report", help="also write the per-layer entropies and coefficients to this JSON file")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.a <= 1.0:
        raise GraftInputError(f"--a must lie in [0, 1] so that alpha stays in [0, 1], got {args.a}")
    if not args.c >= 0.0:
        raise GraftInputError(f"--c must be >= 0, got {args.c}")
    if args.bins < 2:
        raise GraftInputError(f"--bins must be >= 2, got {args.bins}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point (hpcgraft-graft); returns the exit status: 0 done, 2 bad input."""
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        own, source = load_state(args.self_path), load_state(args.source_path)
        try:
            grafted, report = graft_state(own, source, a=args.a, c=args.c, bins=args.bins, level=args.level,
                                          round_alpha=args.round_alpha)
        except ValueError as exc:
            raise GraftInputError(f"{args.self_path} and {args.source_path} cannot be grafted: {exc}") from exc
        _save_atomic(grafted, Path(args.out), torch.save)
        if args.report:
            doc = {"self": str(args.self_path), "source": str(args.source_path), "out": str(args.out),
                   "a": args.a, "c": args.c, "bins": args.bins, "round_alpha": args.round_alpha, **report.to_dict()}
            _save_atomic(doc, Path(args.report), lambda d, p: p.write_text(json.dumps(d, indent=1) + "\n"))
    except (GraftInputError, OSError) as exc:
        print(f"hpcgraft-graft: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
