"""Checkpoints: every peer's state in its own HDF5 file, written in parallel, verified on resume.

Layout of ``RUN_DIR/checkpoints/step-000001234/``::

    peer-000.h5 ... peer-{K-1}.h5   one per peer, written by that peer's replica 0, all at the same time
    run.h5                          run-level data (config text, grafting history, versions), by rank 0
    MANIFEST.json                   size and CRC-32 of every file, the step, epoch and per-peer metric

Every file is written whole under a temporary name, fsynced and renamed into place, and MANIFEST.json
is written last: a checkpoint without a manifest never finished and does not count. A file truncated
or corrupted later is caught by its size and checksum, and :meth:`CheckpointManager.latest` falls back
to the previous checkpoint. Each file is a tree (:mod:`hpcgraft.storage.tree`): no pickle, so a
checkpoint cannot run code when it is loaded.

:class:`CheckpointManager` is the collective side (a run's ranks save and resume together, and it owns
the keep/best policy); :func:`resolve` and :func:`load_member` are the serial side for offline tools,
which never start MPI.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py

from hpcgraft.errors import CheckpointError
from hpcgraft.storage.atomic import crc_of, fsync_dir, replace_durable, write_bytes_durable
from hpcgraft.storage.tree import Tree, one_line, read_tree, write_tree
from hpcgraft.text import plural

if TYPE_CHECKING:
    from mpi4py import MPI

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


def _write_h5(path: Path, tree: Mapping, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Write one checkpoint file atomically: a crash leaves the old file or the new one, never a torn one.

    HDF5 writes straight to the file (the page cache) rather than through a Python file object, which
    costs more than the disk does. File locking is off: the temporary names are unique and finished
    files never change, and HDF5's locks fail on some cluster file systems.
    """

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w", track_order=True, locking=False) as f:
            write_tree(f, tree)
            for key, value in meta.items():
                f.attrs[f"hpcgraft.{key}"] = h5py.Empty("f8") if value is None else value

    return replace_durable(path, write)


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


def _load_file(path: Path, entry: Mapping[str, Any]) -> Tree:
    with open_verified(path, entry) as f:
        return read_tree(f)


def _stamp(path: Path) -> tuple[int, int, int, int]:
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


def _info(ckpt_dir: Path, manifest: Mapping[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(path=ckpt_dir, step=manifest["step"], epoch=manifest["epoch"], peers=manifest["peers"],
                          metrics=tuple(manifest["metrics"]))


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories under ``ckpt_root``, newest step first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


@dataclass
class _Candidate:
    step: int
    path: Path
    manifest: dict[str, Any] | None
    problem: str | None  # why the manifest is unusable


def _candidates(ckpt_root: Path) -> list[_Candidate]:
    out = []
    for step, path in _step_dirs(ckpt_root):
        try:
            out.append(_Candidate(step, path, read_manifest(path), None))
        except CheckpointError as exc:
            out.append(_Candidate(step, path, None, str(exc)))
    return out


def _choose(candidates: list[_Candidate], verify: Callable[[_Candidate], str | None],
            report: bool) -> _Candidate | None:
    """The newest candidate that verifies. Each damaged one newer than it is reported in one line on
    stderr (when ``report``); if only damaged complete checkpoints exist, that is an error, because
    silently starting over would throw away the run."""
    damaged: list[tuple[_Candidate, str]] = []
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


def _verify_serial(cand: _Candidate) -> str | None:
    assert cand.manifest is not None
    for name, entry in sorted(cand.manifest["files"].items()):
        if problem := file_problem(cand.path / name, entry):
            return problem
    return None


def _remove_dir(path: Path) -> None:
    """Rename first, so a removal cut short never leaves something that looks like a checkpoint."""
    trash = path.with_name(f".trash-{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash)


# --------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Collective save/resume of a run's checkpoints; see the module docstring for the layout."""

    def __init__(self, run_dir: str | Path, comm: MPI.Comm, *, peer: int, peers: int, writer: bool,
                 keep: int = 2, keep_best: bool = True, interval: int = 1) -> None:
        if keep < 1:
            raise CheckpointError(f"checkpoint.keep must be at least 1, got {keep}")
        if not 0 <= peer < peers:
            raise CheckpointError(f"peer {peer} is outside 0..{peers - 1}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.comm = comm
        self.rank = comm.Get_rank()
        self.peer, self.peers, self.writer = peer, peers, writer
        self.keep, self.keep_best, self.interval = keep, keep_best, interval
        self._verified: set[tuple[int, int, int, int]] = set()  # files this rank checked in latest()

    # ---- save -------------------------------------------------------------------------------------

    def due(self, epoch: int, *, last: bool) -> bool:
        """Whether a checkpoint is written after ``epoch`` completed epochs: every ``interval``, and the last."""
        return last or epoch % self.interval == 0

    def save(self, step: int, epoch: int, peer_tree: Tree, run_tree: Tree | None, *,
             metric: float | None = None) -> CheckpointInfo:
        """COLLECTIVE: write this step's checkpoint; raises CheckpointError on every rank if any rank failed."""
        step, epoch = operator.index(step), operator.index(epoch)  # the same on all ranks: no one waits alone
        ckpt_dir = self.root / step_dir_name(step)
        prepared = self._guard(lambda: self._prepare(ckpt_dir)) if self.rank == 0 else None
        layout = self.comm.allgather((step, epoch, self.peer, self.peers, self.writer, prepared))
        self._check_layout(layout)

        files: dict[str, Any] = {}
        failure = score = None
        try:
            meta = {"format": FORMAT, "step": step, "epoch": epoch, "peers": self.peers}
            if self.writer:
                score = _finite(metric)
                ckpt_dir.mkdir(parents=True, exist_ok=True)  # a shared file system may lag behind rank 0's mkdir
                name = peer_file(self.peer)
                files[name] = _write_h5(ckpt_dir / name, peer_tree, {**meta, "peer": self.peer, "metric": score})
            if self.rank == 0:
                files[RUN_FILE] = _write_h5(ckpt_dir / RUN_FILE, run_tree or {}, meta)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            failure = f"rank {self.rank} could not write {ckpt_dir.name}: {one_line(exc)}"
        reports = self.comm.gather((failure, files, self.peer if self.writer else None, score), root=0)

        outcome = None
        if self.rank == 0:
            outcome = self._guard(lambda: self._finish(ckpt_dir, step, epoch, reports))
        outcome = self.comm.bcast(outcome, root=0)
        if outcome is not None:
            raise CheckpointError(f"checkpoint at step {step} failed: {outcome}")
        return CheckpointInfo(path=ckpt_dir, step=step, epoch=epoch, peers=self.peers)

    @staticmethod
    def _guard(action: Callable[[], str | None]) -> str | None:
        """Run rank 0's part; a failure becomes a message to broadcast instead of leaving others waiting."""
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it
            return one_line(exc)

    def _prepare(self, ckpt_dir: Path) -> None:
        """Make the step directory; a checkpoint of the same step being replaced stops counting first."""
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.root)
        if (ckpt_dir / MANIFEST).exists():
            (ckpt_dir / MANIFEST).unlink()
            fsync_dir(ckpt_dir)

    def _check_layout(self, layout: list[tuple]) -> None:
        """Same inputs on every rank and exactly one writer per peer; every rank reaches the same verdict."""
        step, epoch, _, peers, _, prepared = layout[0]
        if prepared is not None:
            raise CheckpointError(f"checkpoint at step {step} failed: rank 0 could not prepare it: {prepared}")
        for rank, (s, e, _, k, _, _) in enumerate(layout):
            if (s, e, k) != (step, epoch, peers):
                raise CheckpointError(f"save() called with step {s}, epoch {e}, peers {k} on rank {rank} but step "
                                      f"{step}, epoch {epoch}, peers {peers} on rank 0; every rank must save together")
        writers = sorted(p for _, _, p, _, w, _ in layout if w)
        if writers != list(range(peers)):
            raise CheckpointError(f"checkpoint writers cover peers {writers}, expected exactly one writer for each of "
                                  f"0..{peers - 1} (replica 0 of every peer)")

    def _finish(self, ckpt_dir: Path, step: int, epoch: int, reports: list[tuple]) -> str | None:
        failures = [f for f, *_ in reports if f]
        if failures:  # every writer has stopped: drop the partial directory, so resumes do not report it
            try:
                _remove_dir(ckpt_dir)
            except OSError:
                pass
            return "; ".join(failures)
        files: dict[str, Any] = {}
        metrics: list[float | None] = [None] * self.peers
        for _, written, peer, metric in reports:
            files.update(written)
            if peer is not None:
                metrics[peer] = metric
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "step": step, "epoch": epoch, "peers": self.peers,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": metrics,
            "files": dict(sorted(files.items())),
        }
        write_bytes_durable(ckpt_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        try:
            self._prune(step)
        except OSError as exc:  # the checkpoint is complete: failing to tidy up is not a failed save
            print(f"hpcgraft: warning: could not prune {self.root}: {one_line(exc)}", file=sys.stderr, flush=True)
        return None

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep`` complete checkpoints and each peer's best; drop older unfinished ones.

        Directories of later steps than the one just written are left from before a fallback to an
        earlier checkpoint (they were damaged, or the run was rolled back): they go too, so a later
        resume cannot jump onto the abandoned timeline. A failure to delete is a warning, not an error:
        the checkpoint just written is safe either way.
        """
        # Leftovers of an interrupted removal go first, so their names are free again.
        for trash in [p for p in self.root.iterdir() if p.name.startswith(".trash-")]:
            shutil.rmtree(trash, ignore_errors=True)
        candidates = _candidates(self.root)
        current = [c for c in candidates if c.step <= step]
        complete = [c for c in current if c.manifest is not None]
        keep = {c.path for c in complete[: self.keep]}
        if self.keep_best:
            for p in range(self.peers):
                if (best := _best_of(complete, p)) is not None:
                    keep.add(best.path)
        doomed = [c.path for c in candidates if c.step > step]
        doomed += [c.path for c in current if c.path not in keep and (c.manifest is not None or c.step < step)]
        for path in doomed:
            try:
                _remove_dir(path)
            except OSError as exc:
                print(f"hpcgraft: warning: could not remove old checkpoint {path.name}: {exc.strerror}",
                      file=sys.stderr, flush=True)

    # ---- resume -----------------------------------------------------------------------------------

    def latest(self, exclude: Collection[str] = ()) -> CheckpointInfo | None:
        """COLLECTIVE: the newest complete checkpoint whose files verify, the same on every rank; ``exclude``:
        names of step directories the caller found unfit (they are passed over like damaged ones).

        The files are checked in parallel, each peer file by the rank that writes (and will load) it,
        run.h5 by rank 0, so that load_peer right after need not read the file a second time.
        """
        writer_of = {p: r for r, p in enumerate(self.comm.allgather(self.peer if self.writer else None))
                     if p is not None}
        size = self.comm.Get_size()

        def checker(index: int, name: str) -> int:
            peer = peer_of_file(name)
            owner = writer_of.get(peer) if peer is not None else (0 if name == RUN_FILE else None)
            return index % size if owner is None else owner

        listing: list[_Candidate] | str | None = None
        if self.rank == 0:
            try:
                listing = [c for c in _candidates(self.root) if c.path.name not in exclude]
            except OSError as exc:
                listing = one_line(exc)
        listing = self.comm.bcast(listing, root=0)
        if isinstance(listing, str):
            raise CheckpointError(f"cannot list checkpoints in {self.root}: {listing}")

        def verify(cand: _Candidate) -> str | None:
            names = sorted(cand.manifest["files"])
            mine = {}
            for n in [n for i, n in enumerate(names) if checker(i, n) == self.rank]:
                path = cand.path / n
                try:
                    mine[n] = file_problem(path, cand.manifest["files"][n])
                    if mine[n] is None:
                        self._verified.add(_stamp(path))
                except Exception as exc:  # noqa: BLE001 - must reach the allgather, or the others wait forever
                    mine[n] = f"{n}: unreadable ({one_line(exc)})"
            found = {}
            for part in self.comm.allgather(mine):
                found.update(part)
            return next((found[n] for n in names if found[n]), None)

        # Every rank saw the same listing and verification results, so all return or raise alike.
        chosen = _choose(listing, verify, report=self.rank == 0)
        if chosen is None:
            return None
        return _info(chosen.path, chosen.manifest)  # the caller compares info.peers with its own layout

    def load_peer(self, info: CheckpointInfo, peer: int) -> Tree:
        """The tree peer ``peer`` saved; its file is checked against the manifest before it is parsed,
        unless this rank checked that very file (same inode, size and mtime) in :meth:`latest`."""
        return self._load(*_member(info, peer_file(check_peer(info, peer))))

    def load_run(self, info: CheckpointInfo) -> Tree:
        return self._load(*_member(info, RUN_FILE))

    def _load(self, path: Path, entry: Mapping[str, Any]) -> Tree:
        try:
            checked = _stamp(path) in self._verified
        except OSError:
            checked = False
        with open_h5(path) if checked else open_verified(path, entry) as f:
            return read_tree(f)


def _best_of(complete: list[_Candidate], peer: int) -> _Candidate | None:
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
    return [_info(c.path, c.manifest) for c in _candidates(ckpt_root) if c.manifest is not None]


def best_checkpoints(path: Path) -> dict[int, CheckpointInfo]:
    """Peer -> the checkpoint of a run (directory or its ``checkpoints/``) with the peer's best metric,
    from the manifests (files not verified: for listings such as ``inspect``)."""
    complete = [c for c in _candidates(checkpoints_root(path)) if c.manifest is not None]
    if not complete:
        return {}
    best = {p: _best_of(complete, p) for p in range(complete[0].manifest["peers"])}
    return {p: _info(c.path, c.manifest) for p, c in best.items() if c is not None}


def best_checkpoint(path: Path, peer: int) -> CheckpointInfo:
    """Serial: the checkpoint of a run directory holding ``peer``'s best weights, checked against its
    manifest. A damaged best is an error, not a silent fall back to a worse one."""
    root = checkpoints_root(path)
    complete = [c for c in _candidates(root) if c.manifest is not None]
    if not complete:
        raise CheckpointError(f"no complete checkpoint in {root}")
    if not 0 <= peer < complete[0].manifest["peers"]:
        raise CheckpointError(f"the run in {path} has peers 0..{complete[0].manifest['peers'] - 1}; "
                              f"peer {peer} does not exist")
    best = _best_of(complete, peer)
    if best is None:
        raise CheckpointError(f"no checkpoint in {root} records a metric for peer {peer} (checkpoint.keep_best=false "
                              "records none after a graft); pick one by its directory instead")
    if problem := _verify_serial(best):
        raise CheckpointError(f"the best checkpoint of peer {peer}, {best.path.name}, is damaged ({problem})")
    return _info(best.path, best.manifest)


def _finite(metric: float | None) -> float | None:
    """Metrics go into JSON, which has no NaN; a non-finite metric never counts as the best."""
    value = None if metric is None else float(metric)
    return value if value is not None and math.isfinite(value) else None


def check_peer(info: CheckpointInfo, peer: int) -> int:
    if not 0 <= peer < info.peers:
        raise CheckpointError(f"checkpoint {info.path.name} has {plural(info.peers, 'peer')} (0..{info.peers - 1}); "
                              f"peer {peer} does not exist")
    return peer


def _member(info: CheckpointInfo, name: str) -> tuple[Path, dict[str, Any]]:
    try:
        manifest = read_manifest(info.path)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {info.path.name} is damaged ({exc})") from None
    return info.path / name, manifest["files"][name]


def load_member(info: CheckpointInfo, name: str) -> Tree:
    """One file of a checkpoint, checked against its manifest first (serial: offline tools)."""
    return _load_file(*_member(info, name))


def resolve(path: Path) -> CheckpointInfo:
    """A checkpoint directory, or a run directory's newest intact checkpoint, checked against its manifest
    (serial: offline tools)."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory, a run directory or a checkpoint .h5 file")
    if _STEP_DIR.match(path.name) or (path / MANIFEST).exists():
        try:
            cand = _Candidate(0, path, read_manifest(path), None)
            problem = _verify_serial(cand)
        except CheckpointError as exc:
            problem = str(exc)
        if problem:
            raise CheckpointError(f"checkpoint {path.name} is damaged ({problem})")
        return _info(path, cand.manifest)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    chosen = _choose(_candidates(root), _verify_serial, report=True)
    if chosen is None:
        raise CheckpointError(f"no complete checkpoint in {root}")
    return _info(chosen.path, chosen.manifest)

