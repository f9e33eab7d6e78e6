"""What a run leaves for people and plots: metrics.jsonl, graft.jsonl, status.json and the epoch table.

Only rank 0 writes. Lines are appended and flushed as they happen, so ``tail -f`` works, and a resumed
run first cuts away what came after its checkpoint, so every epoch appears exactly once.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from hpcgraft.storage import atomic

METRICS, GRAFTS, STATUS = "metrics.jsonl", "graft.jsonl", "status.json"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _read_tolerant(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Rows of a log being resumed, and whether its last line was torn. A kill or ENOSPC during an append
    leaves a partial last line; it holds nothing the checkpoint does not, so it is dropped rather than
    blocking every later resume. Damage anywhere else is not an interrupted append and stays an error."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return rows, True
            raise
        rows.append(row)
    return rows, False


def _rewrite(path: Path, keep: Callable[[dict[str, Any]], bool]) -> bool:
    rows, torn = _read_tolerant(path)
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows if keep(r)))
    return torn


class Sink(Protocol):
    """Another form of the logs (TensorBoard event files): fed every row the run log appends."""

    def truncate_after(self, epoch: int, step: int) -> None: ...

    def record(self, name: str, rows: list[dict[str, Any]]) -> None: ...


class RunLog:
    """Append-only JSON-lines files of one run directory, and the sinks that receive the same rows."""

    def __init__(self, run_dir: str | Path, sinks: Sequence[Sink] = ()) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sinks = list(sinks)
        self._status_lock = threading.Lock()  # a dying rank writes its last status from another thread
        self._status_final = False

    def truncate_after(self, epoch: int, step: int) -> list[str]:
        """Forget what a run logged after the checkpoint it resumes from (epoch done, global step); returns
        the names of the logs whose torn last line was dropped."""
        torn = []
        for name, keep in ((METRICS, lambda r: r["epoch"] <= epoch), (GRAFTS, lambda r: r["step"] <= step)):
            if (self.dir / name).exists() and _rewrite(self.dir / name, keep):
                torn.append(name)
        for sink in self.sinks:
            sink.truncate_after(epoch, step)
        return torn

    def append(self, name: str, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        # never through a symlink planted in the run directory (the run refuses one at its start)
        fd = os.open(self.dir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "a") as f:
            for row in rows:
                f.write(json.dumps(row, allow_nan=True) + "\n")
            f.flush()
        for sink in self.sinks:
            sink.record(name, rows)

    def sync(self) -> None:
        """Put the logs on disk. Called before every checkpoint: a checkpoint is fsynced, and rows only in the
        page cache could be lost with the node while the checkpoint after them survives; a resume would then
        never log their epochs again. Synced first, a torn or missing row is always one the resume repeats."""
        for name in (METRICS, GRAFTS):
            try:
                fd = os.open(self.dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def status(self, **fields: Any) -> None:
        with self._status_lock:
            if not self._status_final:
                atomic.write_text(self.dir / STATUS, json.dumps(fields, indent=1) + "\n")

    def last_status(self, state: str, reason: str) -> None:
        """The run's end, recorded from outside the training (its process is being killed): ``state`` and
        ``reason`` replace a status that still says running (or none yet), at the epoch and step it had, and
        nothing written later replaces them. A status that says how the run ended already stays."""
        with self._status_lock:
            try:
                old = self.read_status()
            except (OSError, ValueError):
                old = {}
            if old.get("state", "running") == "running":
                atomic.write_text(self.dir / STATUS, json.dumps(
                    {"state": state, "epoch": old.get("epoch", 0), "step": old.get("step", 0), "reason": reason},
                    indent=1) + "\n")
            self._status_final = True

    def read_status(self) -> dict[str, Any]:
        p = self.dir / STATUS
        return json.loads(p.read_text()) if p.exists() else {}


def fmt(value: Any, spec: str = ".2f") -> str:
    """A number as the tables show it; missing (None or NaN) as "-"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def epoch_table(rows: list[dict[str, Any]], ensemble_acc: float, epochs: int, thresholds: list[float],
                header: bool) -> str:
    """The per-epoch table printed by rank 0: one line per peer and one for the ensemble."""
    inv = [f"inv@{t:g}" for t in thresholds]
    cols = ["epoch", "peer", "lr", "train_loss", "train_acc", "test_acc", "ens_acc", "alpha", *inv, "sec"]
    widths = [7, 4, 8, 10, 9, 8, 7, 6, *[max(7, len(c)) for c in inv], 6]
    lines = []
    if header:
        lines.append(" ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        cells = [
            f"{r['epoch']}/{epochs}", str(r["peer"]), fmt(r["lr"], ".4g" if (r["lr"] or 0) >= 1e-3 else ".2e"),
            fmt(r["train_loss"], ".4f"),
            fmt(r["train_acc"], ".2f"), fmt(r["test_acc"], ".2f"), "", fmt(r["alpha_mean"], ".3f"),
            *[str(r[f"invalid_{t:g}"]) for t in thresholds], fmt(r["seconds"], ".1f"),
        ]
        lines.append(" ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    ens = ["", "ens", "", "", "", "", fmt(ensemble_acc, ".2f"), "", *["" for _ in thresholds], ""]
    lines.append(" ".join(c.rjust(w) for c, w in zip(ens, widths, strict=True)).rstrip())
    return "\n".join(lines)
