"""A peer's model out of a checkpoint, as a plain PyTorch state dict: what ``hpcgraft checkpoint export``
writes, for use outside hpcgraft (a state dict of tensors only, written durably and atomically)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import torch

from hpcgraft.errors import CheckpointError
from hpcgraft.storage import run
from hpcgraft.storage.atomic import write_bytes_durable
from hpcgraft.storage.checkpoints import MANIFEST, check_peer, load_member, peer_file, peer_of_file
from hpcgraft.storage.outputs import check_output_file
from hpcgraft.text import size


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


def export_peer(path: Path, peer: int | None, out: Path, best: bool = False) -> str:
    """Write one peer's model of a run (its newest checkpoint, or with ``best`` its best one), of a checkpoint
    or of a peer file as a plain state dict for ``torch.load(weights_only=True)``; returns what was written."""
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
    return (f"wrote {out}: peer {peer} of {info.path}{' (its best)' if best else ''} (step {info.step}, "
            f"epoch {info.epoch}), {len(state)} tensors, {size(nbytes)}")
