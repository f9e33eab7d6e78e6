"""Inspect hpcgraft checkpoints or export a peer's model, offline (no MPI).

    python -m hpcgraft.checkpoint inspect PATH [--tree]
    python -m hpcgraft.checkpoint export PATH --peer I [--best] --out model.pt

The format lives in :mod:`hpcgraft.storage.checkpoints` (layout, manifest, verification) and
:mod:`hpcgraft.storage.tree` (the HDF5 tree of each file).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from hpcgraft.errors import EXIT_USAGE, CheckpointError, UserError, report
from hpcgraft.storage import run
from hpcgraft.storage.atomic import write_bytes_durable
from hpcgraft.storage.checkpoints import (
    MANIFEST,
    RUN_FILE,
    best_checkpoints,
    check_peer,
    load_member,
    open_h5,
    open_verified,
    peer_file,
    peer_of_file,
    read_manifest,
)
from hpcgraft.storage.outputs import check_output_file
from hpcgraft.storage.tree import key_of, read_node, walk
from hpcgraft.text import size


def _is_array(kind: str) -> bool:
    return kind.startswith("torch.") or kind == "numpy"


def _tensor_stats(f: h5py.File) -> tuple[int, int]:
    count = nbytes = 0
    for _, ds in walk(f):
        if _is_array(ds.attrs.get("type", "")):
            count += 1
            nbytes += ds.size * ds.dtype.itemsize
    return count, nbytes


def _describe(ds: h5py.Dataset) -> str:
    kind = ds.attrs.get("type", "dataset")
    if _is_array(kind):
        return f"{kind if kind.startswith('torch.') else f'numpy.{ds.dtype}'} {tuple(ds.shape)}"
    value = repr(read_node(ds))
    return f"{kind} {value if len(value) <= 60 else value[:57] + '...'}"


def _keys(group: h5py.Group) -> str:
    """Top-level keys for a summary line; odd ones (empty, spaces, commas) quoted."""
    keys = [key_of(k) for k in group]
    return ", ".join(k if k and k.strip() == k and "," not in k else repr(k) for k in keys) or "(none)"


def _inspect_file(path: Path, show_tree: bool) -> None:
    if path.suffix != ".h5":
        raise CheckpointError(f"{path} is not a checkpoint directory, a run directory or a checkpoint .h5 file")
    if (path.parent / MANIFEST).exists():  # part of a checkpoint: check it like a load would
        manifest = read_manifest(path.parent)
        if path.name not in manifest["files"]:
            raise CheckpointError(f"{path.name} is not listed in {path.parent / MANIFEST}")
        f = open_verified(path, manifest["files"][path.name])
        note = "verified against MANIFEST.json"
    else:
        f = open_h5(path)
        note = "no MANIFEST.json beside it: not verified"
    with f:
        meta = {k.removeprefix("hpcgraft."): f.attrs[k] for k in f.attrs if k.startswith("hpcgraft.")}
        count, nbytes = _tensor_stats(f)
        head = ", ".join(f"{k} {_plain(v)}" for k, v in meta.items() if k != "format")
        print(f"{path} ({note}): {head}")
        print(f"tensors {count}, {nbytes} bytes ({size(nbytes)})")
        print(f"keys: {_keys(f)}")
        if show_tree:
            for name, ds in walk(f):
                print(f"  {name}  {_describe(ds)}")


def _plain(value: Any) -> Any:
    if isinstance(value, h5py.Empty):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _inspect(path: Path, show_tree: bool) -> None:
    if path.is_file():
        _inspect_file(path, show_tree)
        return
    info = run.latest(path)
    manifest = read_manifest(info.path)
    print(f"checkpoint {info.path}: step {info.step}, epoch {info.epoch}, peers {info.peers}, "
          f"created {manifest.get('created', '?')}, all files verified (crc32)")
    best = {p: c.path.name for p, c in best_checkpoints(info.path.parent).items()}
    print(f"{'peer':>4}  {'tensors':>7}  {'bytes':>12}  {'metric':>8}  file")
    for p in range(info.peers):
        name = peer_file(p)
        with open_h5(info.path / name) as f:
            count, nbytes = _tensor_stats(f)
        metric = manifest["metrics"][p]
        shown = "-" if metric is None else f"{metric:.4f}"
        mark = " *" if best.get(p) == info.path.name else ""
        print(f"{p:>4}  {count:>7}  {nbytes:>12}  {shown:>8}{mark:2}  {name} "
              f"({size(manifest['files'][name]['size'])})")
    if best:
        print("best checkpoint per peer (* marks this one): " + ", ".join(f"peer {p} {n}" for p, n in best.items()))
    with open_h5(info.path / RUN_FILE) as f:
        print(f"run.h5 keys: {_keys(f)}")
        if show_tree:
            for name, ds in walk(f):
                print(f"  {RUN_FILE}:{name}  {_describe(ds)}")
    if show_tree:
        for p in range(info.peers):
            with open_h5(info.path / peer_file(p)) as f:
                for name, ds in walk(f):
                    print(f"  {peer_file(p)}:{name}  {_describe(ds)}")


def _flat_state(tree: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_state(value, name + "."))
        elif isinstance(value, torch.Tensor):
            out[name] = value
        else:
            raise CheckpointError(f"model entry '{name}' is a {type(value).__name__}, not a tensor; "
                                  "a state_dict holds tensors only")
    return out


def _export(path: Path, peer: int | None, out: Path, best: bool = False) -> None:
    check_output_file(out, "--out")
    if best and (path.is_file() or (path / MANIFEST).exists()):
        raise CheckpointError(f"--best picks among a run's checkpoints: give the run directory, not {path}")
    if path.is_file():
        owner = peer_of_file(path.name)
        if owner is None:
            raise CheckpointError(f"{path} is not a peer file (peer-NNN.h5); pass it or its checkpoint directory")
        if peer is not None and peer != owner:
            raise CheckpointError(f"{path.name} holds peer {owner}, not --peer {peer}")
        peer, path = owner, path.parent
    if peer is None:
        raise CheckpointError("say which peer to export with --peer I")
    info = run.best(path, peer) if best else run.latest(path)
    tree = load_member(info, peer_file(check_peer(info, peer)))
    if not isinstance(tree.get("model"), Mapping):
        raise CheckpointError(f"{peer_file(peer)} of {info.path.name} has no 'model' subtree "
                              f"(keys: {', '.join(map(str, tree)) or 'none'})")
    state = _flat_state(tree["model"])
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # the export format: a plain state_dict for torch.load(weights_only=True)
    write_bytes_durable(out, buffer.getbuffer())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"wrote {out}: peer {peer} of {info.path}{' (its best)' if best else ''} (step {info.step}, "
          f"epoch {info.epoch}), "
          f"{len(state)} tensors, {size(nbytes)}")


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
            _inspect(args.path, args.tree)
        else:
            _export(args.path, args.peer, args.out, args.best)
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
