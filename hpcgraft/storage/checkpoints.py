"""Checkpoints, the collective side: a run's ranks save, resume and prune together.

The format on disk (one HDF5 file per peer, run.h5, MANIFEST.json written last) and the serial reading of
it are :mod:`hpcgraft.storage.checkpoint_files`; its public names are importable from here too.

A save builds every file in memory first (HDF5's in-memory driver), so the space the checkpoint needs is
known exactly before anything is written: a file system without that space fails the save on every rank
before a byte is written, and one that fills up during the write (another job, a quota) fails a plain
write of bytes, never HDF5 in the middle of a file, whose handles would fail again at every later close
and at the process's exit. Each file is then written under a temporary name, fsynced and renamed into
place; MANIFEST.json last.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import operator
import shutil
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py

from hpcgraft.errors import CheckpointError
from hpcgraft.storage.atomic import fsync_dir, write_bytes_durable
from hpcgraft.storage.checkpoint_files import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    RUN_FILE,
    Candidate,
    CheckpointInfo,
    best_checkpoint,
    best_checkpoints,
    best_of,
    check_peer,
    checkpoints_root,
    choose,
    complete_checkpoints,
    file_problem,
    info_of,
    is_step_dir,
    list_candidates,
    load_member,
    member,
    open_h5,
    open_verified,
    peer_file,
    peer_of_file,
    read_manifest,
    remove_dir,
    resolve,
    stamp,
    step_dir_name,
)
from hpcgraft.storage.tree import Tree, one_line, read_tree, write_tree
from hpcgraft.text import plural
from hpcgraft.text import size as size_text

if TYPE_CHECKING:
    from mpi4py import MPI

# What offline tools import from here (the format's names live in checkpoint_files).
__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "RUN_FILE", "CheckpointInfo", "CheckpointManager", "CheckpointSpaceError",
    "best_checkpoint", "best_checkpoints", "check_peer", "checkpoints_root", "complete_checkpoints", "file_problem",
    "h5_image", "is_step_dir", "load_member", "open_h5", "open_verified", "peer_file", "peer_of_file",
    "read_manifest", "resolve", "step_dir_name",
]

_FULL = "no space"  # rank 0's verdict when a writer ran out of space during the write
_IMAGE_NAMES = itertools.count()  # the in-memory driver still wants a file name, unique in the process


@dataclass(frozen=True)
class Space:
    free: int | None  # bytes free in the run directory before the save (None: unknown)
    needed: int  # bytes of every file of the checkpoint
    files: int


class CheckpointSpaceError(CheckpointError):
    """The file system has no room for the checkpoint; the last complete one is intact."""

    def __init__(self, run_dir: Path, step: int, space: Space, *, during: bool = False) -> None:
        self.space = space
        free = "an unknown amount" if space.free is None else size_text(space.free)
        how = (" (it ran out during the write: another job or a quota took it)" if during else "")
        super().__init__(f"no space left in {run_dir} for the checkpoint at step {step}: {free} free before the "
                         f"write, the checkpoint needs {size_text(space.needed)} ({plural(space.files, 'file')}){how}; "
                         "free space (or lower checkpoint.keep: older checkpoints are removed only after a new one "
                         "is complete) and re-run the same command to resume from the last checkpoint")


def h5_image(tree: Mapping, meta: Mapping[str, Any]) -> bytes:
    """The bytes of one checkpoint file, built in memory. File locking is off: it touches no disk, and HDF5's
    locks fail on some cluster file systems."""
    with h5py.File(f"hpcgraft-image-{next(_IMAGE_NAMES)}.h5", "w", driver="core", backing_store=False,
                   track_order=True, locking=False) as f:
        write_tree(f, tree)
        for key, value in meta.items():
            f.attrs[f"hpcgraft.{key}"] = h5py.Empty("f8") if value is None else value
        f.flush()
        return f.id.get_file_image()


def _free_bytes(path: Path) -> int | None:
    """Bytes this process may still write under ``path`` (what ``df`` shows as available), None if unknown."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Collective save/resume of a run's checkpoints; see the module docstring for the layout."""

    def __init__(self, run_dir: str | Path, comm: MPI.Comm, *, peer: int, peers: int, writer: bool,
                 keep: int = 2, keep_best: bool = True, interval: int = 1, hosted: int = 1) -> None:
        """``peer``: the first of the ``hosted`` peers this rank saves (peer .. peer+hosted-1) if ``writer``."""
        if keep < 1:
            raise CheckpointError(f"checkpoint.keep must be at least 1, got {keep}")
        if not 0 <= peer <= peer + hosted - 1 < peers:
            raise CheckpointError(f"peer {peer + hosted - 1} is outside 0..{peers - 1}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.comm = comm
        self.rank = comm.Get_rank()
        self.peer, self.peers, self.writer = peer, peers, writer
        self.hosted = list(range(peer, peer + hosted))
        self.keep, self.keep_best, self.interval = keep, keep_best, interval
        self._verified: set[tuple[int, int, int, int]] = set()  # files this rank checked in latest()

    # ---- save -------------------------------------------------------------------------------------

    def due(self, epoch: int, *, last: bool) -> bool:
        """Whether a checkpoint is written after ``epoch`` completed epochs: every ``interval``, and the last."""
        return last or epoch % self.interval == 0

    def save(self, step: int, epoch: int, peer_tree: Tree | list[Tree], run_tree: Tree | None, *,
             metric: float | None | list[float | None] = None) -> CheckpointInfo:
        """COLLECTIVE: write this step's checkpoint; raises CheckpointError on every rank if any rank failed
        (:class:`CheckpointSpaceError` when the file system is too full for it). ``peer_tree`` and ``metric``:
        one per hosted peer (a list), or the one peer's."""
        step, epoch = operator.index(step), operator.index(epoch)  # the same on all ranks: no one waits alone
        ckpt_dir = self.root / step_dir_name(step)
        meta = {"format": FORMAT, "step": step, "epoch": epoch, "peers": self.peers}
        trees = peer_tree if isinstance(peer_tree, list) else [peer_tree]
        metrics = metric if isinstance(metric, list) else [metric]
        scores = {p: _finite(m) for p, m in zip(self.hosted, metrics, strict=True)} if self.writer else {}
        images: dict[str, bytes] = {}
        failure = None
        try:
            for p, tree in zip(self.hosted, trees, strict=True) if self.writer else ():
                images[peer_file(p)] = h5_image(tree, {**meta, "peer": p, "metric": scores[p]})
            if self.rank == 0:
                images[RUN_FILE] = h5_image(run_tree or {}, meta)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            failure = f"rank {self.rank} could not write {ckpt_dir.name}: {one_line(exc)}"
        free = _free_bytes(self.run_dir) if self.rank == 0 else None
        layout = self.comm.allgather((step, epoch, self.hosted, self.peers, self.writer, failure,
                                      sum(len(b) for b in images.values()), free))
        space = self._check_layout(layout)
        if space.free is not None and space.needed > space.free:  # nothing written: the last checkpoint stays
            raise CheckpointSpaceError(self.run_dir, step, space)
        prepared = self._guard(lambda: self._prepare(ckpt_dir)) if self.rank == 0 else None
        prepared = self.comm.bcast(prepared, root=0)
        if prepared is not None:
            raise CheckpointError(f"checkpoint at step {step} failed: rank 0 could not prepare it: {prepared}")

        files: dict[str, Any] = {}
        full = False
        try:
            if images:
                ckpt_dir.mkdir(parents=True, exist_ok=True)  # a shared file system may lag behind rank 0's mkdir
            for name, image in images.items():
                files[name] = write_bytes_durable(ckpt_dir / name, image)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            failure = f"rank {self.rank} could not write {ckpt_dir.name}: {one_line(exc)}"
            full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        images.clear()
        reports = self.comm.gather((failure, full, files, scores), root=0)

        outcome = None
        if self.rank == 0:
            outcome = self._guard(lambda: self._finish(ckpt_dir, step, epoch, reports))
        outcome = self.comm.bcast(outcome, root=0)
        if outcome == _FULL:
            raise CheckpointSpaceError(self.run_dir, step, space, during=True)
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

    def _check_layout(self, layout: list[tuple]) -> Space:
        """Same inputs on every rank and exactly one writer per peer; every rank reaches the same verdict.
        Returns the space the checkpoint needs (its files built in memory) and rank 0's free space."""
        step, epoch, _, peers, _, _, _, free = layout[0]
        for rank, (s, e, _, k, _, _, _, _) in enumerate(layout):
            if (s, e, k) != (step, epoch, peers):
                raise CheckpointError(f"save() called with step {s}, epoch {e}, peers {k} on rank {rank} but step "
                                      f"{step}, epoch {epoch}, peers {peers} on rank 0; every rank must save together")
        writers = sorted(p for _, _, hosted, _, w, _, _, _ in layout if w for p in hosted)
        if writers != list(range(peers)):
            raise CheckpointError(f"checkpoint writers cover peers {writers}, expected exactly one writer for each of "
                                  f"0..{peers - 1} (replica 0 of every peer)")
        failures = [f for *_, f, _, _ in layout if f]
        if failures:
            raise CheckpointError(f"checkpoint at step {step} failed: {'; '.join(failures)}")
        return Space(free=free, needed=sum(n for *_, n, _ in layout), files=peers + 1)

    def _finish(self, ckpt_dir: Path, step: int, epoch: int, reports: list[tuple]) -> str | None:
        failures = [f for f, *_ in reports if f]
        if failures:  # every writer has stopped: drop the partial directory, so resumes do not report it
            try:
                remove_dir(ckpt_dir)
            except OSError:
                pass
            return _FULL if any(full for _, full, *_ in reports) else "; ".join(failures)
        files: dict[str, Any] = {}
        metrics: list[float | None] = [None] * self.peers
        for _, _, written, scores in reports:
            files.update(written)
            for peer, metric in scores.items():
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
        candidates = list_candidates(self.root)
        current = [c for c in candidates if c.step <= step]
        complete = [c for c in current if c.manifest is not None]
        keep = {c.path for c in complete[: self.keep]}
        if self.keep_best:
            for p in range(self.peers):
                if (best := best_of(complete, p)) is not None:
                    keep.add(best.path)
        doomed = [c.path for c in candidates if c.step > step]
        doomed += [c.path for c in current if c.path not in keep and (c.manifest is not None or c.step < step)]
        for path in doomed:
            try:
                remove_dir(path)
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
        writer_of = {p: r for r, hosted in enumerate(self.comm.allgather(self.hosted if self.writer else []))
                     for p in hosted}
        size = self.comm.Get_size()

        def checker(index: int, name: str) -> int:
            peer = peer_of_file(name)
            owner = writer_of.get(peer) if peer is not None else (0 if name == RUN_FILE else None)
            return index % size if owner is None else owner

        listing: list[Candidate] | str | None = None
        if self.rank == 0:
            try:
                listing = [c for c in list_candidates(self.root) if c.path.name not in exclude]
            except OSError as exc:
                listing = one_line(exc)
        listing = self.comm.bcast(listing, root=0)
        if isinstance(listing, str):
            raise CheckpointError(f"cannot list checkpoints in {self.root}: {listing}")

        def verify(cand: Candidate) -> str | None:
            names = sorted(cand.manifest["files"])
            mine = {}
            for n in [n for i, n in enumerate(names) if checker(i, n) == self.rank]:
                path = cand.path / n
                try:
                    mine[n] = file_problem(path, cand.manifest["files"][n])
                    if mine[n] is None:
                        self._verified.add(stamp(path))
                except Exception as exc:  # noqa: BLE001 - must reach the allgather, or the others wait forever
                    mine[n] = f"{n}: unreadable ({one_line(exc)})"
            found = {}
            for part in self.comm.allgather(mine):
                found.update(part)
            return next((found[n] for n in names if found[n]), None)

        # Every rank saw the same listing and verification results, so all return or raise alike.
        chosen = choose(listing, verify, report=self.rank == 0)
        if chosen is None:
            return None
        return info_of(chosen.path, chosen.manifest)  # the caller compares info.peers with its own layout

    def load_peer(self, info: CheckpointInfo, peer: int) -> Tree:
        """The tree peer ``peer`` saved; its file is checked against the manifest before it is parsed,
        unless this rank checked that very file (same inode, size and mtime) in :meth:`latest`."""
        return self._load(*member(info, peer_file(check_peer(info, peer))))

    def load_run(self, info: CheckpointInfo) -> Tree:
        return self._load(*member(info, RUN_FILE))

    def _load(self, path: Path, entry: Mapping[str, Any]) -> Tree:
        try:
            checked = stamp(path) in self._verified
        except OSError:
            checked = False
        with open_h5(path) if checked else open_verified(path, entry) as f:
            return read_tree(f)


def _finite(metric: float | None) -> float | None:
    """Metrics go into JSON, which has no NaN; a non-finite metric never counts as the best."""
    value = None if metric is None else float(metric)
    return value if value is not None and math.isfinite(value) else None

