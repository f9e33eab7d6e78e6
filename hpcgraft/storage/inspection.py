"""What a checkpoint holds, as the checkpoint command shows it: a step directory's peers (tensors, bytes, the
metric and which peer's best it is) and run.h5, or one file; with ``tree``, every dataset with its type and
shape. Files beside a MANIFEST.json are verified as a load verifies them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcgraft.errors import CheckpointError
from hpcgraft.storage import run
from hpcgraft.storage.checkpoints import (
    MANIFEST,
    RUN_FILE,
    best_checkpoints,
    open_h5,
    open_verified,
    peer_file,
    read_manifest,
)
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


def _describe_file(path: Path, show_tree: bool) -> Iterator[str]:
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
        yield f"{path} ({note}): {head}"
        yield f"tensors {count}, {nbytes} bytes ({size(nbytes)})"
        yield f"keys: {_keys(f)}"
        if show_tree:
            for name, ds in walk(f):
                yield f"  {name}  {_describe(ds)}"


def _plain(value: Any) -> Any:
    if isinstance(value, h5py.Empty):
        return None
    return value.item() if isinstance(value, np.generic) else value


def describe(path: Path, show_tree: bool = False) -> Iterator[str]:
    """What a checkpoint directory, a run's newest checkpoint or one checkpoint file holds, line by line (so
    that a listing piped into ``head`` stops reading early); every file is verified as a load would."""
    if path.is_file():
        yield from _describe_file(path, show_tree)
        return
    info = run.latest(path)
    manifest = read_manifest(info.path)
    yield (f"checkpoint {info.path}: step {info.step}, epoch {info.epoch}, peers {info.peers}, "
           f"created {manifest.get('created', '?')}, all files verified (crc32)")
    best = {p: c.path.name for p, c in best_checkpoints(info.path.parent).items()}
    yield f"{'peer':>4}  {'tensors':>7}  {'bytes':>12}  {'metric':>8}  file"
    for p in range(info.peers):
        name = peer_file(p)
        with open_h5(info.path / name) as f:
            count, nbytes = _tensor_stats(f)
        metric = manifest["metrics"][p]
        shown = "-" if metric is None else f"{metric:.4f}"
        mark = " *" if best.get(p) == info.path.name else ""
        yield (f"{p:>4}  {count:>7}  {nbytes:>12}  {shown:>8}{mark:2}  {name} "
               f"({size(manifest['files'][name]['size'])})")
    if best:
        yield "best checkpoint per peer (* marks this one): " + ", ".join(f"peer {p} {n}" for p, n in best.items())
    with open_h5(info.path / RUN_FILE) as f:
        yield f"run.h5 keys: {_keys(f)}"
        if show_tree:
            for name, ds in walk(f):
                yield f"  {RUN_FILE}:{name}  {_describe(ds)}"
    if show_tree:
        for p in range(info.peers):
            with open_h5(info.path / peer_file(p)) as f:
                for name, ds in walk(f):
                    yield f"  {peer_file(p)}:{name}  {_describe(ds)}"
