"""Watching a run while it trains: a bar on a terminal, plain lines in a batch log, a summary at the end.

A cluster job's ``.out`` file is not a terminal: a bar's carriage-return redraws would fill it with one
endless line, and without a bar nothing appears between two epoch rows (minutes to hours apart on
ImageNet). So off a terminal rank 0 prints a plain line every ``log.every_s`` seconds: epoch, step,
images per second of the run and of every peer, the loss so far and the time left of the epoch and
of the run.

The per-peer figures live on the other ranks. Gathering them must never leave a rank waiting in a
collective that another rank skips, so the ranks meet only at agreed optimizer steps: every meeting
point is chosen by rank 0 at the previous one (from its clock and the measured pace) and broadcast
there, so every rank knows the next one in advance and none decides alone. Ranks take the same steps
in the same order (same steps per epoch, a stop agreed at the same step), so all of them reach each
meeting point; between meeting points there is no communication at all, and a meeting is two small
collectives about once per ``log.every_s``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import torch

from hpcgraft.text import duration, plural

if TYPE_CHECKING:
    from hpcgraft.training.peer import Peer, Progress

BAR, LINES, NONE = "bar", "lines", "none"


def progress_mode(setting: str, every_s: float, is_tty: bool) -> str:
    """How rank 0 shows progress. ``log.progress`` auto and on: a bar on a terminal, plain lines every
    ``log.every_s`` seconds elsewhere (never redraws into a file); off, or ``every_s=0`` off a terminal:
    nothing between the epoch rows."""
    if setting == "off":
        return NONE
    if is_tty:
        return BAR
    return LINES if every_s > 0 else NONE


@dataclass
class RankFigures:
    """One rank's numbers at a meeting point (its share of the peer's batch, replicas summed by rank 0)."""

    peer: int
    seen: int  # images trained in the running epoch
    loss_sum: float  # their summed loss
    seconds: float  # training time in the running epoch


@dataclass
class Estimate:
    """What one progress line says; computed on rank 0 from every rank's figures."""

    epoch: int  # the running epoch, 1-based
    epochs: int
    batch: int  # batches done in the running epoch
    steps: int  # batches per epoch
    peer_rate: list[float]  # images/s per peer
    peer_loss: list[float | None]
    eta_epoch: float | None  # seconds
    eta_run: float | None


def estimate(figures: list[RankFigures], epoch: int, epochs: int, batch: int, steps: int,
             epoch_overhead: float | None) -> Estimate:
    """Images/s and loss per peer (its replicas summed) and the time left.

    The run moves at its slowest rank's pace (grafting and the stop flag keep the ranks in step), so the
    time left of the epoch is the remaining batches at the slowest rank's seconds per batch. The run's
    adds the remaining epochs at that pace plus what the last epoch end took (evaluation, graft,
    checkpoint: ``epoch_overhead``; unknown before the first epoch end, then counted as zero).
    """
    peers = 1 + max(f.peer for f in figures)
    seen, loss, rate = [0] * peers, [0.0] * peers, [0.0] * peers
    for f in figures:
        seen[f.peer] += f.seen
        loss[f.peer] += f.loss_sum
        rate[f.peer] += f.seen / f.seconds if f.seconds > 0 else 0.0
    per_batch = max((f.seconds for f in figures), default=0.0) / batch if batch > 0 else None
    eta_epoch = eta_run = None
    if per_batch is not None:
        eta_epoch = (steps - batch) * per_batch
        ends = (epochs - epoch + 1) * (epoch_overhead or 0.0)  # the running epoch's end and every later one's
        eta_run = eta_epoch + (epochs - epoch) * steps * per_batch + ends
    return Estimate(epoch, epochs, batch, steps, rate, [loss[p] / seen[p] if seen[p] else None for p in range(peers)],
                    eta_epoch, eta_run)


def progress_line(e: Estimate) -> str:
    """``progress: epoch 3/30, step 12/22, 1250 img/s (peer 0: 627 img/s, loss 0.4321; peer 1: ...),
    left: epoch 4 s, run 1m52s``: plain text, no redraws, one line per report."""
    peers = "; ".join(f"peer {p}: {_rate(r)} img/s, loss {'-' if loss is None else f'{loss:.4f}'}"
                      for p, (r, loss) in enumerate(zip(e.peer_rate, e.peer_loss, strict=True)))
    return (f"progress: epoch {e.epoch}/{e.epochs}, step {e.batch}/{e.steps}, {_rate(sum(e.peer_rate))} img/s "
            f"({peers}), left: epoch {duration(e.eta_epoch)}, run {duration(e.eta_run)}")


def _rate(r: float) -> str:
    return f"{r:.0f}" if r >= 10 else f"{r:.2g}"


def next_meeting(step: int, since_print: float, every_s: float, seconds_per_step: float | None) -> int:
    """The optimizer step of the next meeting: where the pace says ``every_s`` will have passed since the
    last printed line (at least the next step; the step after this one while the pace is unknown)."""
    if seconds_per_step is None or seconds_per_step <= 0:
        return step + 1
    return step + max(1, math.ceil((every_s - since_print) / seconds_per_step))


class RunProgress:
    """Progress of one rank's training: every rank calls :meth:`begin`, :meth:`step` and :meth:`end`
    around its epoch; only rank 0 shows anything.

    Built by every rank at the same point of the run (it agrees on the mode with one broadcast: only
    rank 0 knows whether it writes to a terminal).
    """

    def __init__(self, peer: Peer, out: TextIO | None = None, is_tty: bool | None = None,
                 hosted: list[int] | None = None) -> None:
        self.peer = peer  # the rank's first peer: the progress of all it hosts (they step together)
        self.hosted = hosted if hosted is not None else [peer.world.peer]
        self.cfg = peer.cfg.log
        self.out = out or sys.stdout
        world = peer.world
        self.is_root = world.is_root
        mode = progress_mode(self.cfg.progress, self.cfg.every_s,
                             sys.stderr.isatty() if is_tty is None else is_tty) if self.is_root else None
        self.comm = world.comm.Dup()
        self.mode: str = self.comm.bcast(mode, root=0)
        self.steps = len(peer.train_loader)
        self.bar: Any = None
        self.began = 0.0
        self.epoch_ended: float | None = None
        self.overhead: float | None = None  # wall time of the last epoch end (evaluation, graft, checkpoint)
        self.meeting = peer.progress.step + 1  # the first meeting measures the pace; it prints nothing
        self.printed = time.monotonic()
        self.met: tuple[int, float] | None = None  # step and time of the last meeting (rank 0)

    def begin(self) -> None:
        """An epoch starts (or resumes mid-epoch)."""
        self.began = time.monotonic()
        if self.epoch_ended is not None:
            self.overhead = time.monotonic() - self.epoch_ended
        if self.mode == BAR and self.is_root:
            from tqdm import tqdm

            prog = self.peer.progress
            self.bar = tqdm(total=self.steps, initial=prog.batch, leave=False, dynamic_ncols=True,
                            desc=f"epoch {prog.epoch + 1}/{self.peer.cfg.train.epochs}", file=sys.stderr)

    def step(self, loss_sum: torch.Tensor | list[torch.Tensor]) -> None:
        """After every optimizer step, on every rank; ``loss_sum`` is the epoch's running summed loss, one
        per hosted peer (read only at meeting points: on a GPU, reading it waits for the device)."""
        if self.bar is not None:
            self.bar.update(1)
        if self.mode != LINES or self.peer.progress.step < self.meeting:
            return
        prog = self.peer.progress
        seconds = prog.seconds + time.monotonic() - self.began
        sums = loss_sum if isinstance(loss_sum, list) else [loss_sum]
        mine = [RankFigures(p, prog.seen, float(s), seconds) for p, s in zip(self.hosted, sums, strict=True)]
        with self.peer.watchdog.guard("progress: gather of the ranks' figures"):
            blocks = self.comm.gather(mine, root=0)
            figures = [f for block in blocks for f in block] if self.is_root else None
            self.meeting = self.comm.bcast(self._report(figures, prog) if self.is_root else None, root=0)

    def _report(self, figures: list[RankFigures], prog: Progress) -> int:
        """Rank 0 at a meeting: print a line if ``every_s`` has passed, and choose the next meeting."""
        now = time.monotonic()
        if self.met is not None and now - self.printed >= self.cfg.every_s:
            e = estimate(figures, prog.epoch + 1, self.peer.cfg.train.epochs, prog.batch, self.steps, self.overhead)
            print(progress_line(e), file=self.out, flush=True)
            self.printed = now
        pace = (now - self.met[1]) / (prog.step - self.met[0]) if self.met and prog.step > self.met[0] else None
        self.met = (prog.step, now)
        return next_meeting(prog.step, now - self.printed, self.cfg.every_s, pace)

    def end(self) -> None:
        """The epoch's training ends (or stops); evaluation and grafting follow."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.epoch_ended = time.monotonic()


# ------------------------------------------------------------------------------------------ the end of a run
def run_summary(rows: list[dict[str, Any]], seconds: float) -> str:
    """One line at the end of a run from its metrics.jsonl rows: best and final top-1 of every peer and
    of the ensemble, and the wall time of this start."""
    parts = []
    peers = sorted({r["peer"] for r in rows if r.get("peer") is not None})
    for p in peers:
        parts.append(f"peer {p} " + _best_final([(r["epoch"], r["test_acc"]) for r in rows if r.get("peer") == p]))
    ens = [(r["epoch"], r["ensemble_acc"]) for r in rows if r.get("peer") is None and r.get("ensemble_acc") is not None]
    if ens:
        parts.append("ensemble " + _best_final(ens))
    epochs = max((r["epoch"] for r in rows), default=0)
    return (f"summary: {plural(epochs, 'epoch')}, top-1 best/final: {'; '.join(parts) or 'no metrics'}; "
            f"wall time {duration(seconds)}")


def _best_final(series: list[tuple[int, float]]) -> str:
    best_epoch, best = max(series, key=lambda t: (t[1], -t[0]))  # the first epoch that reached the best
    return f"{best:.2f} (epoch {best_epoch}) / {series[-1][1]:.2f}"
