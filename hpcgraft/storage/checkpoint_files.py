"""The checkpoint format on disk, and the serial side that lists, verifies and reads it (offline tools, which
never start MPI, and the collective manager in :mod:`hpcgraft.storage.checkpoints` alike).

Layout of ``RUN_DIR/checkpoints/step-000001234/``::

    peer-000.h5 ... peer-{K-1}.h5   one per peer, written by that peer's replica 0, all at the same time
    run.h5                          run-level data (config text, grafting history, versions), by rank 0
    MANIFEST.json                   size and CRC-32 of every file, the step, epoch and per-peer metric

MANIFEST.json is written last: a checkpoint without a manifest never finished and does not count. A file
truncated or corrupted later is caught by its size and checksum, and the newest checkpoint that verifies is
chosen instead. Each file is a tree (:mod:`hpcgraft.storage.tree`): no pickle, so a checkpoint cannot run
code when it is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from hpcgraft.errors import CheckpointError
from hpcgraft.storage.atomic import crc_of
from hpcgraft.storage.tree import Tree, one_line, read_tree
from hpcgraft.text import plural

FORMAT = "hpcgraft-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
RUN_FILE = "run.h5"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_PEER_FILE = re.compile(r"peer-(\d+)\.h5")


@dataclass
class CheckpointInfo:
    path: Path  # the checkpoint directory, RUN_DIR/checkpoints/step-000001234
    step: int  # global optimizer step it was taken at
    epoch: int  # epochs completed (a mid-epoch checkpoint: the running epoch; the tree says the batch)
    peers: int
    # per peer: the test accuracy of the weights it holds (manifest); not part of which checkpoint it is
    metrics: tuple[float | None, ...] = field(default=(), compare=False)


def peer_file(peer: int) -> str:
    return f"peer-{peer:03d}.h5"


def peer_of_file(name: str) -> int | None:
    """The peer whose file ``name`` is (``peer-NNN.h5``), or None for any other name."""
    match = _PEER_FILE.fullmatch(name)
    return int(match.group(1)) if match else None


def is_step_dir(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name))


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def file_problem(path: Path, entry: Mapping[str, Any]) -> str | None:
    """Why ``path`` does not match its manifest entry; None if it does."""
    try:
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path.name}: {size} bytes instead of {entry['size']}"
        size, crc = crc_of(path)
    except FileNotFoundError:
        return f"{path.name}: missing"
    except OSError as exc:
        return f"{path.name}: unreadable ({exc.strerror})"
    if size != entry["size"]:  # it changed while being read
        return f"{path.name}: {size} bytes instead of {entry['size']}"
    return None if f"{crc:08x}" == entry["crc32"] else f"{path.name}: checksum mismatch"


def open_verified(path: Path, entry: Mapping[str, Any]) -> h5py.File:
    """Open a checkpoint file after checking it against its manifest entry (the read that checks it
    also brings it into the page cache for the parse)."""
    if problem := file_problem(path, entry):
        raise CheckpointError(f"checkpoint {path.parent.name} is damaged ({problem})")
    return open_h5(path)


def open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise CheckpointError(f"{path} is not a readable HDF5 file ({one_line(exc)})") from None


def load_file(path: Path, entry: Mapping[str, Any]) -> Tree:
    with open_verified(path, entry) as f:
        return read_tree(f)


def stamp(path: Path) -> tuple[int, int, int, int]:
    """What identifies one version of a file: a rewrite or replacement changes it."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The parsed and checked manifest; CheckpointError says what is wrong with it."""
    path = ckpt_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{MANIFEST} missing: the save did not finish") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{MANIFEST} unreadable ({one_line(exc)})") from None
    try:
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
        step, epoch, peers, files = (manifest[k] for k in ("step", "epoch", "peers", "files"))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (step, epoch, peers)):
            raise ValueError("step, epoch and peers must be integers")
        for name in [peer_file(p) for p in range(peers)] + [RUN_FILE]:
            if name not in files:
                raise ValueError(f"{name} is not listed")
        for name, entry in files.items():
            if not isinstance(entry.get("size"), int) or not isinstance(entry.get("crc32"), str):
                raise ValueError(f"the entry of {name} needs a size and a crc32")
        if len(manifest.get("metrics", [])) != peers:
            raise ValueError(f"metrics must list {peers} peers")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{MANIFEST} invalid ({one_line(exc)})") from None
    return manifest


def info_of(ckpt_dir: Path, manifest: Mapping[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(path=ckpt_dir, step=manifest["step"], epoch=manifest["epoch"], peers=manifest["peers"],
                          metrics=tuple(manifest["metrics"]))


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories under ``ckpt_root``, newest step first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


@dataclass
class Candidate:
    step: int
    path: Path
    manifest: dict[str, Any] | None
    problem: str | None  # why the manifest is unusable


def list_candidates(ckpt_root: Path) -> list[Candidate]:
    out = []
    for step, path in step_dirs(ckpt_root):
        try:
            out.append(Candidate(step, path, read_manifest(path), None))
        except CheckpointError as exc:
            out.append(Candidate(step, path, None, str(exc)))
    return out


def choose(candidates: list[Candidate], verify: Callable[[Candidate], str | None],
            report: bool) -> Candidate | None:
    """The newest candidate that verifies. Each damaged one newer than it is reported in one line on
    stderr (when ``report``); if only damaged complete checkpoints exist, that is an error, because
    silently starting over would throw away the run."""
    damaged: list[tuple[Candidate, str]] = []
    chosen = None
    for cand in candidates:
        problem = cand.problem or verify(cand)
        if problem is None:
            chosen = cand
            break
        damaged.append((cand, problem))
    if report:
        tail = f"falling back to {chosen.path.name}" if chosen else "no earlier checkpoint"
        for cand, problem in damaged:
            print(f"hpcgraft: checkpoint {cand.path.name} is damaged ({problem}); {tail}", file=sys.stderr, flush=True)
    if chosen is None and any(c.manifest is not None for c, _ in damaged):
        cand, problem = damaged[0]
        raise CheckpointError(f"no intact checkpoint in {cand.path.parent}: {cand.path.name} is damaged ({problem}) "
                              "and no earlier one verifies; restore the files or start over with --restart")
    return chosen


def verify_serial(cand: Candidate) -> str | None:
    assert cand.manifest is not None
    for name, entry in sorted(cand.manifest["files"].items()):
        if problem := file_problem(cand.path / name, entry):
            return problem
    return None


def remove_dir(path: Path) -> None:
    """Rename first, so a removal cut short never leaves something that looks like a checkpoint."""
    trash = path.with_name(f".trash-{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash)


def best_of(complete: list[Candidate], peer: int) -> Candidate | None:
    """The complete checkpoint with ``peer``'s highest metric (the later one of equals): the one kept as
    the best, exported by ``export --best`` and marked by ``inspect``."""
    metrics = [c.manifest["metrics"] if c.manifest is not None else [] for c in complete]
    scored = [(m[peer], c.step, i) for i, (c, m) in enumerate(zip(complete, metrics, strict=True))
              if peer < len(m) and m[peer] is not None]
    return complete[max(scored)[2]] if scored else None


def checkpoints_root(path: Path) -> Path:
    """The ``checkpoints/`` folder of a run directory (or the folder itself)."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def complete_checkpoints(ckpt_root: Path) -> list[CheckpointInfo]:
    """Checkpoints whose manifest is complete, newest first (files not verified: a listing, not a load)."""
    return [info_of(c.path, c.manifest) for c in list_candidates(ckpt_root) if c.manifest is not None]


def best_checkpoints(path: Path) -> dict[int, CheckpointInfo]:
    """Peer -> the checkpoint of a run (directory or its ``checkpoints/``) with the peer's best metric,
    from the manifests (files not verified: for listings such as ``inspect``)."""
    complete = [c for c in list_candidates(checkpoints_root(path)) if c.manifest is not None]
    if not complete:
        return {}
    best = {p: best_of(complete, p) for p in range(complete[0].manifest["peers"])}
    return {p: info_of(c.path, c.manifest) for p, c in best.items() if c is not None}


def best_checkpoint(path: Path, peer: int) -> CheckpointInfo:
    """Serial: the checkpoint of a run directory holding ``peer``'s best weights, checked against its
    manifest. A damaged best is an error, not a silent fall back to a worse one."""
    root = checkpoints_root(path)
    complete = [c for c in list_candidates(root) if c.manifest is not None]
    if not complete:
        raise CheckpointError(f"no complete checkpoint in {root}")
    if not 0 <= peer < complete[0].manifest["peers"]:
        raise CheckpointError(f"the run in {path} has peers 0..{complete[0].manifest['peers'] - 1}; "
                              f"peer {peer} does not exist")
    best = best_of(complete, peer)
    if best is None:
        raise CheckpointError(f"no checkpoint in {root} records a metric for peer {peer} (checkpoint.keep_best=false "
                              "records none after a graft); pick one by its directory instead")
    if problem := verify_serial(best):
        raise CheckpointError(f"the best checkpoint of peer {peer}, {best.path.name}, is damaged ({problem})")
    return info_of(best.path, best.manifest)


def check_peer(info: CheckpointInfo, peer: int) -> int:
    if not 0 <= peer < info.peers:
        raise CheckpointError(f"checkpoint {info.path.name} has {plural(info.peers, 'peer')} (0..{info.peers - 1}); "
                              f"peer {peer} does not exist")
    return peer


def member(info: CheckpointInfo, name: str) -> tuple[Path, dict[str, Any]]:
    try:
        manifest = read_manifest(info.path)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {info.path.name} is damaged ({exc})") from None
    return info.path / name, manifest["files"][name]


def load_member(info: CheckpointInfo, name: str) -> Tree:
    """One file of a checkpoint, checked against its manifest first (serial: offline tools)."""
    return load_file(*member(info, name))


def resolve(path: Path) -> CheckpointInfo:
    """A checkpoint directory, or a run directory's newest intact checkpoint, checked against its manifest
    (serial: offline tools)."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory, a run directory or a checkpoint .h5 file")
    if _STEP_DIR.match(path.name) or (path / MANIFEST).exists():
        try:
            cand = Candidate(0, path, read_manifest(path), None)
            problem = verify_serial(cand)
        except CheckpointError as exc:
            problem = str(exc)
        if problem:
            raise CheckpointError(f"checkpoint {path.name} is damaged ({problem})")
        return info_of(path, cand.manifest)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    chosen = choose(list_candidates(root), verify_serial, report=True)
    if chosen is None:
        raise CheckpointError(f"no complete checkpoint in {root}")
    return info_of(chosen.path, chosen.manifest)
