"""Invalid filters of a trained network, per conv layer: by l1 norm (the papers' criterion) and by entropy.

    python -m hpcgraft.analyze CHECKPOINT_OR_STATE [--peer I] [--thresholds 0.1 0.01] [--entropy-below 0.5]

The input is either a plain PyTorch file holding a state dict (``torch.save(model.state_dict(), ...)``,
also one nested under "state_dict", "model" or "net" as other training scripts save it), read with
``weights_only=True`` so that it cannot run code, or an hpcgraft checkpoint (a run directory, one of its
``checkpoints/step-*`` directories, or a ``peer-*.h5`` file) read with :mod:`hpcgraft.checkpoint`.

A filter is one output channel of a conv layer. It is invalid at threshold t when its l1 norm is below t
(method.md, "Reason"); the entropy criterion counts filters whose weights' histogram entropy (10 bins over
the filter's own range, as grafting computes it) is below ``--entropy-below``: a filter with most of its
weights in one bin varies little whatever its scale. For scale: ln 10 = 2.30 is the most 10 bins can
hold, freshly initialised 3x3 filters have about 1.7 to 2.0 (depthwise ones, 9 weights, down to about 1),
and 0.5 is reached when four fifths of the weights share one bin. Only the l1 counts are comparable with
the papers' figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hpcgraft.grafting import State, filter_entropies, filter_l1_norms

DEFAULT_ENTROPY_BELOW = 0.5
NESTED_KEYS = ("state_dict", "model", "net")


class AnalyzeError(ValueError):
    """An input that cannot be analysed; one line naming it and the fix."""


@dataclass
class LayerStats:
    name: str
    shape: tuple[int, ...]
    filters: int
    invalid: dict[str, int]  # threshold (as written) -> filters with l1 norm below it
    low_entropy: int  # filters with entropy below the entropy threshold
    min_l1: float
    mean_entropy: float


# ------------------------------------------------------------------------------------------ inputs
def find_state(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded object: the mapping itself, or one nested under a usual key."""
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                return find_state(obj[key], f"{where}['{key}']")
    raise AnalyzeError(f"{where} holds no state dict (a mapping of names to tensors, possibly under "
                       f"{', '.join(repr(k) for k in NESTED_KEYS)}); save one with torch.save(model.state_dict(), "
                       "PATH)")


def load_torch_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file it cannot read
        why = type(exc).__name__ + (f": {str(exc).strip().splitlines()[0]}" if str(exc).strip() else "")
        raise AnalyzeError(f"{path} cannot be read as a tensor file with weights_only=True ({why}); give a "
                           "state dict saved with torch.save(model.state_dict(), PATH) or an hpcgraft checkpoint"
                           ) from None
    return find_state(obj, str(path))


def load_states(path: str | Path, peer: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Label -> state dict: one for a plain file, one per peer (or only ``peer``) for a checkpoint."""
    p = Path(path)
    if not p.exists():
        raise AnalyzeError(f"{p} does not exist; give a state dict file (.pt) or an hpcgraft checkpoint")
    if p.is_dir() or _is_hdf5(p):
        return load_checkpoint_states(p, peer)
    if peer not in (None, 0):
        raise AnalyzeError(f"{p} is a single state dict; --peer applies to hpcgraft checkpoints only")
    return {p.name: load_torch_state(p)}


def _is_hdf5(p: Path) -> bool:
    import h5py

    return p.is_file() and h5py.is_hdf5(p)


def load_checkpoint_states(path: Path, peer: int | None) -> dict[str, dict[str, torch.Tensor]]:
    """Model weights of the peers of an hpcgraft checkpoint, each file checked against its manifest.

    ``path``: a run directory (its newest intact checkpoint), a ``checkpoints/step-*`` directory, or one
    ``peer-NNN.h5`` file of such a directory.
    """
    import re

    from mpi4py import MPI

    from hpcgraft.checkpoint import MANIFEST, CheckpointError, CheckpointInfo, CheckpointManager, read_manifest

    only = peer
    if path.is_file():
        match = re.fullmatch(r"peer-(\d+)\.h5", path.name)
        if not match:
            raise AnalyzeError(f"{path} is an HDF5 file but not a checkpoint's peer-NNN.h5; give the file of one "
                               "peer, its checkpoint directory or the run directory")
        if only is not None and only != int(match.group(1)):
            raise AnalyzeError(f"{path.name} holds peer {int(match.group(1))}, not --peer {only}")
        only, path = int(match.group(1)), path.parent
    try:
        if (path / MANIFEST).exists():  # one checkpoint directory
            manifest = read_manifest(path)
            info = CheckpointInfo(path, manifest["step"], manifest["epoch"], manifest["peers"])
            manager = CheckpointManager(path.parent.parent, MPI.COMM_SELF, peer=0, peers=1, writer=False)
        else:  # a run directory
            run_dir = path.parent if path.name == "checkpoints" else path
            manager = CheckpointManager(run_dir, MPI.COMM_SELF, peer=0, peers=1, writer=False)
            info = manager.latest()
            if info is None:
                raise AnalyzeError(f"{path} holds no complete checkpoint; give a run directory whose run wrote "
                                   "checkpoints (checkpoint.enabled=true), one of its checkpoints, or a .pt file")
        peers = range(info.peers) if only is None else [only]
        if any(not 0 <= p < info.peers for p in peers):
            raise AnalyzeError(f"{info.path} has peers 0..{info.peers - 1}; --peer {only} does not exist")
        out = {}
        for p in peers:
            label = f"peer {p} ({info.path.name}, epoch {info.epoch})"
            out[label] = find_state(manager.load_peer(info, p).get("model"), f"{label}: model")
        return out
    except CheckpointError as exc:
        raise AnalyzeError(str(exc)) from None


# ------------------------------------------------------------------------------------------ analysis
def analyze_state(state: State, thresholds: list[float], entropy_below: float, bins: int = 10
                  ) -> list[LayerStats]:
    """Per conv layer (4-D weight): filters, invalid counts per l1 threshold, low-entropy count."""
    out = []
    for name, norms in filter_l1_norms(state).items():
        w = state[name]
        ent = filter_entropies(w.reshape(w.shape[0], -1), bins)
        out.append(LayerStats(
            name=name, shape=tuple(w.shape), filters=int(norms.numel()),
            invalid={f"{t:g}": int((norms < t).sum()) for t in thresholds},
            low_entropy=int((ent < entropy_below).sum()),
            min_l1=float(norms.min()), mean_entropy=float(ent.mean()),
        ))
    return out


def totals(stats: list[LayerStats]) -> dict[str, Any]:
    keys = stats[0].invalid if stats else {}
    return {"layers": len(stats), "filters": sum(s.filters for s in stats),
            "invalid": {k: sum(s.invalid[k] for s in stats) for k in keys},
            "low_entropy": sum(s.low_entropy for s in stats)}


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
    except AnalyzeError as exc:
        print(f"hpcgraft.analyze: error: {exc}", file=sys.stderr)
        return 2
    results = {label: analyze_state(s, args.thresholds, args.entropy_below, args.bins) for label, s in states.items()}
    empty = [label for label, stats in results.items() if not stats]
    if empty:
        print(f"hpcgraft.analyze: error: {empty[0]} has no conv layer (4-D weight); nothing to count",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({label: {"layers": [asdict(s) for s in stats], "total": totals(stats)}
                          for label, stats in results.items()}, indent=1))
    else:
        print("\n\n".join(format_table(label, stats, args.thresholds, args.entropy_below)
                          for label, stats in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
