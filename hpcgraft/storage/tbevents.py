"""TensorBoard event files of a run (``log.tensorboard=true``): the rows of metrics.jsonl and graft.jsonl as
scalars, for ``tensorboard --logdir RUN/tensorboard`` (or ``--logdir runs/`` to compare runs).

    RUN/tensorboard/peer0/, peer1/, ..., ensemble/     one TensorBoard "run" per peer and the ensemble

One folder per peer (rather than one tag per peer) lets TensorBoard draw the peers and the ensemble in the
same chart: ``metrics/test_acc`` of ``ensemble`` is the ensemble's accuracy. A :class:`TensorBoardSink` is
fed by :class:`hpcgraft.storage.runlog.RunLog` with the very rows it appends (rank 0 only), so the event
files can never say something the JSON-lines logs do not.

A resumed run must not show an epoch twice, and it must not lose the wall times of what came before, so
earlier event files are kept and every start of the job writes new ones (a segment). A resume from the
checkpoint at global step s begins each new file with a ``SessionLog.START`` at step s + 1: TensorBoard's
readers then drop what the old segment logged after that checkpoint (the same rows the JSON-lines logs
cut away on resume); a start from step 0 removes the old files instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from hpcgraft.config import Config
from hpcgraft.errors import ConfigError
from hpcgraft.storage.runlog import GRAFTS, METRICS

TENSORBOARD = "tensorboard"  # the folder inside the run directory
ENSEMBLE = "ensemble"
PREFIX = "events.out.tfevents."  # what TensorBoard's readers look for in a file name
_NOT_SCALARS = {"epoch", "peer", "step"}


def require_tensorboard(cfg: Config) -> None:
    """``log.tensorboard=true`` where the package is missing is bad input, found before any data is read."""
    if not cfg.log.tensorboard:
        return
    try:
        from tensorboard.compat.proto import event_pb2  # noqa: F401
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
        self._files: dict[str, BinaryIO] = {}  # TensorBoard run -> its event file in this segment
        self._start: int | None = None  # the step this segment's files start at (None: from scratch)

    def truncate_after(self, epoch: int, step: int) -> None:
        """Begin a segment after the checkpoint at global ``step`` (0: a run from scratch)."""
        self.close()
        if step == 0:
            remove_events(self.root)
            self._start = None
            return
        self._start = step + 1
        # Every run folder gets its START now, even one this segment never writes to again.
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else ():
            if folder.is_dir():
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
        for f in self._files.values():
            f.flush()  # readable at once: TensorBoard shows a running run

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def _write(self, run: str, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=v)
                                             for tag, v in values.items()])
        self._writer(run).write(record(event_pb2.Event(wall_time=time.time(), step=step, summary=summary)
                                       .SerializeToString()))

    def _writer(self, run: str) -> BinaryIO:
        if run in self._files:
            return self._files[run]
        from tensorboard.compat.proto import event_pb2

        folder = self.root / run
        folder.mkdir(parents=True, exist_ok=True)
        f = _open_segment(folder)
        now = time.time()
        f.write(record(event_pb2.Event(wall_time=now, step=self._start or 0, file_version="brain.Event:2")
                       .SerializeToString()))
        if self._start is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            f.write(record(event_pb2.Event(wall_time=now, step=self._start, session_log=start).SerializeToString()))
        self._files[run] = f
        return f


def remove_events(root: Path) -> None:
    """Remove the event files hpcgraft wrote under ``root`` (a run's TensorBoard folder) and the folders
    that leaves empty; anything else there (and what a symlink points to) stays."""
    if root.is_symlink() or not root.is_dir():
        return
    for folder in [root, *(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())]:
        for f in folder.glob(f"{PREFIX}*.hpcgraft"):
            if not f.is_symlink() and f.is_file():
                f.unlink()
        with contextlib.suppress(OSError):  # not empty: someone else's files stay
            folder.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def record(data: bytes) -> bytes:
    """One TFRecord frame: length, masked CRC-32C of the length, the data, masked CRC-32C of the data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def _masked_crc(data: bytes) -> int:
    crc = _crc32c()(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@functools.cache
def _crc32c() -> Callable[[bytes], int]:
    """google-crc32c (in the extra) where installed: TensorBoard's own CRC is pure Python, ~3 us a byte, which
    made a resnet110 graft report (220 scalars, 7 kB) cost 20 ms per peer on rank 0 instead of 2 us."""
    try:
        import google_crc32c

        return google_crc32c.value
    except ImportError:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c

        return crc32c


def _open_segment(folder: Path) -> BinaryIO:
    """A new event file that sorts after every older one in ``folder``. Readers take a folder's files in
    name order and that order decides what a START drops, so the time stamp in the name is never below an
    earlier file's, even when a requeued job runs on a node whose clock is behind."""
    stamps = [int(p.name[len(PREFIX):].split(".")[0]) for p in folder.glob(PREFIX + "*")
              if p.name[len(PREFIX):].split(".")[0].isdigit()]
    stamp = max([int(time.time()), *(s + 1 for s in stamps)])
    return (folder / f"{PREFIX}{stamp:010d}.{socket.gethostname()}.{os.getpid()}.hpcgraft").open("xb")
