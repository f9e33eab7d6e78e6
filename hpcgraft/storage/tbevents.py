"""TensorBoard event files of a run (``log.tensorboard=true``): the rows of metrics.jsonl and graft.jsonl as
scalars, for ``tensorboard --logdir RUN/tensorboard`` (or ``--logdir runs/`` to compare runs).

    RUN/tensorboard/peer0/, peer1/, ..., ensemble/     one TensorBoard "run" per peer and the ensemble

One folder per peer (rather than one tag per peer) lets TensorBoard draw the peers and the ensemble in the
same chart: ``metrics/test_acc`` of ``ensemble`` is the ensemble's accuracy. A :class:`TensorBoardSink` is
fed by :class:`hpcgraft.storage.runlog.RunLog` with the very rows it appends (rank 0 only), so the event
files can never say something the JSON-lines logs do not. The files are written by PyTorch's
``torch.utils.tensorboard.SummaryWriter``, one per folder, each row as one event.

A resumed run must not show an epoch twice, and it must not lose the wall times of what came before, so
earlier event files are kept and every start of the job writes new ones (a segment). A resume from the
checkpoint at global step s opens each folder's writer with ``purge_step=s + 1``: its new file begins with
a ``SessionLog.START`` at that step, and TensorBoard's readers then drop what the old segment logged after
the checkpoint (the same rows the JSON-lines logs cut away on resume); a start from step 0 removes the old
files instead.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcgraft.config import Config
from hpcgraft.errors import ConfigError
from hpcgraft.storage.runlog import GRAFTS, METRICS

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TENSORBOARD = "tensorboard"  # the folder inside the run directory
ENSEMBLE = "ensemble"
PREFIX = "events.out.tfevents."  # what TensorBoard's readers look for in a file name
SUFFIX = ".hpcgraft"  # ends the name of every event file hpcgraft writes: the files it may rename
_NOT_SCALARS = {"epoch", "peer", "step"}


def require_tensorboard(cfg: Config) -> None:
    """``log.tensorboard=true`` where the package is missing is bad input, found before any data is read."""
    if not cfg.log.tensorboard:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("log.tensorboard=true needs the tensorboard package, which is not installed; install it "
                          "with pip install 'hpcgraft[tensorboard]' (or pip install tensorboard), or set "
                          "log.tensorboard=false") from None


def metric_scalars(row: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """(TensorBoard run, {tag: value}) of a metrics.jsonl row. Every number the row holds is kept, so fields
    added to the rows later appear without a change here; the ensemble's ``ensemble_X`` becomes
    ``metrics/test_X``, the tag of the peers' ``test_X``, so that they share a chart."""
    if row.get("peer") is None:
        names = {k: f"test_{k.removeprefix('ensemble_')}" if k.startswith("ensemble_") else k for k in row}
        run = ENSEMBLE
    else:
        names = {k: k for k in row}
        run = f"peer{row['peer']}"
    return run, {f"metrics/{names[k]}": float(v) for k, v in row.items() if k not in _NOT_SCALARS and _number(v)}


def graft_scalars(row: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """(TensorBoard run, {tag: value}) of a graft.jsonl row: the round's wall time, the peer's mean alpha, and
    per layer the alpha it kept of itself and the entropy of its weights."""
    values = {f"graft/{k}": float(row[k]) for k in ("seconds", "alpha_mean") if _number(row.get(k))}
    for layer in row.get("layers") or ():
        name = layer["name"].removesuffix(".weight")
        values[f"alpha/{name}"] = float(layer["alpha"])
        values[f"entropy/{name}"] = float(layer["h_self"])
    return f"peer{row['peer']}", values


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class TensorBoardSink:
    """The event files of one run directory, written as the run log is (see the module's docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._writers: dict[str, SummaryWriter] = {}  # TensorBoard run -> its writer in this segment
        self._purge: int | None = None  # the first step this segment replaces (None: from scratch)

    def truncate_after(self, epoch: int, step: int) -> None:
        """Begin a segment after the checkpoint at global ``step`` (0: a run from scratch)."""
        self.close()
        if step == 0:
            remove_events(self.root)
            self._purge = None
            return
        self._purge = step + 1
        # Every run folder gets its START now, even one this segment never writes to again.
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else ():
            if folder.is_dir() and not folder.is_symlink():
                self._writer(folder.name)

    def record(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Rows just appended to the run log ``name``; logs other than metrics and grafts are ignored."""
        convert = {METRICS: metric_scalars, GRAFTS: graft_scalars}.get(name)
        if convert is None:
            return
        for row in rows:
            run, values = convert(row)
            if values:
                self._write(run, row["step"], values)
        for writer in self._writers.values():
            writer.flush()  # readable at once: TensorBoard shows a running run

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def _write(self, run: str, step: int, values: dict[str, float]) -> None:
        """One event per row, as the JSON-lines logs hold one line: a row's scalars share its step and wall
        time, and the record's checksums (pure Python in TensorBoard) are computed once per row."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
        self._writer(run).file_writer.add_summary(summary, global_step=step)

    def _writer(self, run: str) -> SummaryWriter:
        if run in self._writers:
            return self._writers[run]
        from torch.utils.tensorboard import SummaryWriter

        folder = self.root / run
        folder.mkdir(parents=True, exist_ok=True)
        _stamp_below_now(folder)
        self._writers[run] = SummaryWriter(str(folder), purge_step=self._purge, filename_suffix=SUFFIX)
        return self._writers[run]


def remove_events(root: Path) -> None:
    """Remove the event files hpcgraft wrote under ``root`` (a run's TensorBoard folder) and the folders
    that leaves empty; anything else there (and what a symlink points to) stays."""
    if root.is_symlink() or not root.is_dir():
        return
    for folder in [root, *(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())]:
        for f in folder.glob(f"{PREFIX}*{SUFFIX}"):
            if not f.is_symlink() and f.is_file():
                f.unlink()
        with contextlib.suppress(OSError):  # not empty: someone else's files stay
            folder.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def _stamp_below_now(folder: Path) -> None:
    """Readers take a folder's event files in name order, and that order decides what a START drops; the
    writer names a new file by the clock. Where an earlier segment's file is stamped at or after now (written
    on a node whose clock was ahead, before a requeue), hpcgraft's files are renamed, in their order, to the
    seconds just below now, so the new segment's file sorts after them. Wall times inside stay as logged."""
    ours = sorted(p for p in folder.glob(f"{PREFIX}*{SUFFIX}") if p.is_file() and not p.is_symlink())
    now = int(time.time())
    stamps = [p.name[len(PREFIX):].partition(".") for p in ours]
    if not ours or not all(s.isdigit() for s, _, _ in stamps) or int(stamps[-1][0]) < now:
        return
    for i, (path, (_, _, rest)) in enumerate(zip(ours, stamps, strict=True)):
        target = folder / f"{PREFIX}{now - len(ours) + i:010d}.{rest}"
        if not target.exists():
            path.rename(target)
