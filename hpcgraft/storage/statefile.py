"""A model's state from whatever file holds it, for the offline commands (graft, analyze, report).

Inputs: a PyTorch file (.pt/.pth) read with ``weights_only=True``, so loading cannot run code, holding a
state dict or a checkpoint dict with one under 'state_dict', 'model' or 'net' ('module.' prefixes of
DataParallel are dropped); an hpcgraft peer file (HDF5); or an hpcgraft checkpoint (a run directory or
one of its ``checkpoints/step-*`` directories), each file checked against its manifest. No MPI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from hpcgraft.errors import CheckpointError, InputError
from hpcgraft.storage.checkpoints import (
    MANIFEST,
    CheckpointInfo,
    is_step_dir,
    load_member,
    peer_file,
    peer_of_file,
    read_manifest,
    resolve,
)
from hpcgraft.storage.tree import read_tree

State = dict[str, torch.Tensor]
STATE_KEYS = ("state_dict", "model", "net")  # where common checkpoint layouts keep the weights
DP_PREFIX = "module."
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def load_state(path: str | Path) -> State:
    """The one state dict inside ``path`` (a .pt/.pth file or an hpcgraft peer .h5 file), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a .pt/.pth state dict or an hpcgraft peer .h5 file")
    if _is_hdf5(path):
        with h5py.File(path, "r", locking=False) as f:
            return find_state(read_tree(f), path)
    return find_state(_load_torch(path), path)


def load_states(path: str | Path, peer: int | None = None) -> dict[str, State]:
    """Label -> state dict: one for a plain file, one per peer (or only ``peer``) of an hpcgraft checkpoint."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file; give a state dict file (.pt) or an hpcgraft checkpoint")
    if p.is_dir() or _is_hdf5(p):
        return _checkpoint_states(p, peer)
    if peer not in (None, 0):
        raise InputError(f"{p} is a single state dict; --peer applies to hpcgraft checkpoints only")
    return {p.name: load_state(p)}


def find_state(obj: Any, path: Path | str) -> State:
    """The state dict inside a loaded object: the mapping itself, or one nested under a usual key."""
    seen = []
    while not _is_state(obj):
        if not isinstance(obj, Mapping):
            raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict; save "
                             "model.state_dict() (or a dict with it under 'state_dict', 'model' or 'net')")
        key = next((k for k in STATE_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            raise InputError(f"{path}: found no state dict (a dict of tensors, or one under 'state_dict', "
                             f"'model' or 'net'{' inside ' + '/'.join(seen) if seen else ''}); keys: {keys}")
        seen.append(key)
        obj = obj[key]
    state = {k: torch.as_tensor(v) for k, v in obj.items()}
    if all(k.startswith(DP_PREFIX) for k in state):
        state = {k[len(DP_PREFIX):]: v for k, v in state.items()}
    return state


def _is_state(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor | np.ndarray) for v in obj.values()))


def _is_hdf5(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(8) == _HDF5_MAGIC


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types; all mean "cannot read this"
        text = str(exc)
        if found := _GLOBAL.search(text):
            name, why = found.group(1).rstrip("."), " ".join(found.group(2).split())
            raise InputError(
                f"{path}: refused the pickled global {name}{f' ({why})' if why else ''}; weights-only loading ran "
                "nothing from the file. Re-save the weights alone with torch.save(model.state_dict(), path)") from None
        raise InputError(f"{path}: not a readable PyTorch file ({_reason(text, exc)})") from exc


#: torch's words for a refused global: "unsupported GLOBAL posix.system whose module posix is blocked" (2.6+),
#: "Unsupported global: GLOBAL __main__.Evil was not an allowed global by default" (earlier)
_GLOBAL = re.compile(r"unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)([^\n]*?)(?:\.\s|\.?$)", re.I | re.M)


def _reason(text: str, exc: BaseException) -> str:
    """The informative part of a torch.load error, on one line."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n\n|$)", text, re.S)
    line = found.group(1) if found else next((ln for ln in text.splitlines() if ln.strip()), "")
    line = " ".join(line.split())
    return (line[:200] + "...") if len(line) > 200 else (line or type(exc).__name__)


def _checkpoint_states(path: Path, peer: int | None) -> dict[str, State]:
    """Model weights of the peers of an hpcgraft checkpoint, each file checked against its manifest.

    ``path``: a run directory (its newest intact checkpoint), a ``checkpoints/step-*`` directory, or one
    ``peer-NNN.h5`` file of such a directory.
    """
    only = peer
    if path.is_file():
        owner = peer_of_file(path.name)
        if owner is None:
            raise InputError(f"{path} is an HDF5 file but not a checkpoint's peer-NNN.h5; give the file of one "
                             "peer, its checkpoint directory or the run directory")
        if only is not None and only != owner:
            raise InputError(f"{path.name} holds peer {owner}, not --peer {only}")
        only, path = owner, path.parent
    try:
        if (path / MANIFEST).exists() or is_step_dir(path):
            manifest = read_manifest(path)
            info = CheckpointInfo(path, manifest["step"], manifest["epoch"], manifest["peers"])
        else:
            run_dir = path.parent if path.name == "checkpoints" else path
            if not (run_dir / "checkpoints").is_dir():
                raise InputError(f"{path} holds no complete checkpoint; give a run directory whose run wrote "
                                 "checkpoints (checkpoint.enabled=true), one of its checkpoints, or a .pt file")
            info = resolve(run_dir)
        peers = range(info.peers) if only is None else [only]
        if any(not 0 <= p < info.peers for p in peers):
            raise InputError(f"{info.path} has peers 0..{info.peers - 1}; --peer {only} does not exist")
        out = {}
        for p in peers:
            label = f"peer {p} ({info.path.name}, epoch {info.epoch})"
            out[label] = find_state(load_member(info, peer_file(p)).get("model"), f"{label}: model")
        return out
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
