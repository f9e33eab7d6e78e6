"""Watching a run: the progress line, its estimates, the meeting points of the ranks, the end-of-run
summary and the wording of counts (hpcgraft/training/progress.py, hpcgraft/text.py)."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

import pytest
import torch

from hpcgraft.config import load_config
from hpcgraft.errors import ConfigError
from hpcgraft.storage.runlog import epoch_table
from hpcgraft.text import duration, plural
from hpcgraft.training import progress
from hpcgraft.training.peer import Progress
from hpcgraft.training.progress import (
    BAR,
    LINES,
    NONE,
    Estimate,
    RankFigures,
    RunProgress,
    estimate,
    next_meeting,
    progress_line,
    progress_mode,
    run_summary,
)


def test_plural_and_duration():
    assert [plural(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    assert plural(1, "replica") == "1 replica" and plural(3, "this", "these") == "3 these"
    assert [duration(s) for s in (None, float("nan"), -1, 0, 4.4, 59.6, 61, 3599, 3600 * 5 + 7 * 60, 86400 * 3.5)] == \
        ["?", "?", "?", "0 s", "4 s", "1m00s", "1m01s", "59m59s", "5h07m", "3d12h"]


@pytest.mark.parametrize(("setting", "every_s", "tty", "mode"), [
    ("auto", 60, True, BAR), ("on", 60, True, BAR), ("auto", 60, False, LINES), ("on", 60, False, LINES),
    ("auto", 0, False, NONE), ("off", 60, True, NONE), ("off", 60, False, NONE),
])
def test_a_bar_only_on_a_terminal(setting, every_s, tty, mode):
    """Off a terminal there are never carriage-return redraws, also with log.progress=on: plain lines."""
    assert progress_mode(setting, every_s, tty) == mode


def test_every_s_is_a_checked_key():
    assert load_config("configs/digits.yaml", ["log.every_s=0.5"]).log.every_s == 0.5
    assert load_config(None).log.every_s == 60
    with pytest.raises(ConfigError, match=r"log.every_s=-1.0 must be a number of seconds >= 0"):
        load_config(None, ["log.every_s=-1"])


def test_estimate_sums_replicas_and_paces_by_the_slowest_rank():
    # 2 peers x 2 replicas, 10 of 22 batches done; peer 1's replica 1 is the slowest (5 s for 10 batches)
    figures = [RankFigures(0, 320, 320 * 1.0, 4.0), RankFigures(0, 320, 320 * 2.0, 4.0),
               RankFigures(1, 320, 320 * 0.5, 4.0), RankFigures(1, 320, 320 * 0.5, 5.0)]
    e = estimate(figures, epoch=3, epochs=5, batch=10, steps=22, epoch_overhead=2.0)
    assert e.peer_rate == [160.0, 80.0 + 64.0]
    assert e.peer_loss == [1.5, 0.5]
    assert e.eta_epoch == pytest.approx(12 * 0.5)
    # the rest of this epoch, two more epochs of 22 batches, and three epoch ends (this one and two more)
    assert e.eta_run == pytest.approx(6.0 + 2 * 22 * 0.5 + 3 * 2.0)
    unknown = estimate(figures, epoch=1, epochs=5, batch=10, steps=22, epoch_overhead=None)
    assert unknown.eta_run == pytest.approx(6.0 + 4 * 11.0)
    nothing = estimate([RankFigures(0, 0, 0.0, 0.0)], epoch=1, epochs=1, batch=0, steps=22, epoch_overhead=None)
    assert nothing.eta_epoch is None and nothing.peer_loss == [None] and nothing.peer_rate == [0.0]


def test_progress_line_is_one_plain_line():
    e = Estimate(3, 30, 12, 22, [627.4, 612.6], [0.43214, None], 4.2, 112.0)
    line = progress_line(e)
    assert line == ("progress: epoch 3/30, step 12/22, 1240 img/s (peer 0: 627 img/s, loss 0.4321; "
                    "peer 1: 613 img/s, loss -), left: epoch 4 s, run 1m52s")
    assert "\r" not in line and "\n" not in line
    assert "2.5 img/s" in progress_line(Estimate(1, 1, 1, 2, [2.5], [1.0], None, None))


def test_next_meeting_follows_the_pace():
    assert next_meeting(100, 0.0, 60.0, None) == 101  # pace unknown: measure it at the next step
    assert next_meeting(100, 0.0, 60.0, 0.5) == 220
    assert next_meeting(100, 59.9, 60.0, 0.5) == 101  # always at least the next step
    assert next_meeting(100, 75.0, 60.0, 0.5) == 101


class _OneRank:
    """A world of one rank: what RunProgress asks of its communicator."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.step = 0

    def Dup(self) -> _OneRank:  # noqa: N802 - mpi4py's name
        return self

    def bcast(self, value, root=0):
        self.calls.append(("bcast", self.step))
        return value

    def gather(self, value, root=0):
        self.calls.append(("gather", self.step))
        return [value]


def _peer(every_s: float, setting: str = "auto", steps: int = 22) -> SimpleNamespace:
    cfg = load_config("configs/digits.yaml", [f"log.every_s={every_s}", f"log.progress={setting}"])
    comm = _OneRank()
    world = SimpleNamespace(is_root=True, comm=comm, peer=0)
    watchdog = SimpleNamespace(guard=lambda what: contextlib.nullcontext())
    return SimpleNamespace(cfg=cfg, world=world, train_loader=[None] * steps, progress=Progress(),
                           watchdog=watchdog)


def _train(watch: RunProgress, peer: SimpleNamespace, batches: int) -> None:
    watch.begin()
    for _ in range(batches):
        prog = peer.progress
        prog.seen, prog.batch, prog.step = prog.seen + 64, prog.batch + 1, prog.step + 1
        peer.world.comm.step = prog.step
        watch.step(torch.tensor(prog.seen * 2.0, dtype=torch.float64))
    watch.end()


def test_ranks_meet_at_agreed_steps_and_print_plain_lines(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    peer = _peer(every_s=10)
    out = io.StringIO()
    watch = RunProgress(peer, out=out, is_tty=False)
    assert watch.mode == LINES and peer.world.comm.calls == [("bcast", 0)]  # the mode, agreed once

    def tick(loss_sum: torch.Tensor) -> None:  # every step takes 1 s of the fake clock
        clock[0] += 1.0
        real_step(loss_sum)

    real_step, watch.step = watch.step, tick
    _train(watch, peer, 22)
    meetings = [s for what, s in peer.world.comm.calls if what == "gather"]
    # steps 1 and 2 measure the pace (1 s per step); then one meeting per 10 s from the start, each printing
    assert meetings == [1, 2, 10, 20]
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("progress: epoch 1/30, step 10/22, ") and "loss 2.0000" in lines[0]
    assert lines[1].startswith("progress: epoch 1/30, step 20/22, ")
    assert lines[1].endswith("left: epoch 2 s, run 10m40s")  # 1 s per step, 29 epochs of 22 steps still to come


def test_no_meetings_without_lines():
    for every_s, setting in ((0, "auto"), (10, "off")):
        peer = _peer(every_s=every_s, setting=setting)
        watch = RunProgress(peer, out=io.StringIO(), is_tty=False)
        _train(watch, peer, 22)
        assert watch.mode == NONE and peer.world.comm.calls == [("bcast", 0)]


def test_run_summary_names_best_and_final_of_every_peer_and_the_ensemble():
    rows = []
    for epoch, accs, ens in ((1, (50.0, 60.0), 58.0), (2, (90.0, 80.0), 91.5), (3, (88.0, 80.0), 90.0)):
        rows += [{"epoch": epoch, "peer": p, "test_acc": a} for p, a in enumerate(accs)]
        rows.append({"epoch": epoch, "peer": None, "ensemble_acc": ens})
    assert run_summary(rows, 125.0) == (
        "summary: 3 epochs, top-1 best/final: peer 0 90.00 (epoch 2) / 88.00; peer 1 80.00 (epoch 2) / 80.00; "
        "ensemble 91.50 (epoch 2) / 90.00; wall time 2m05s")
    assert run_summary([], 1.0) == "summary: 0 epochs, top-1 best/final: no metrics; wall time 1 s"


def test_small_learning_rates_keep_the_table_aligned():
    row = {"epoch": 30, "peer": 0, "train_loss": 0.07, "train_acc": 99.8, "test_acc": 99.4, "alpha_mean": None,
           "invalid_0.1": 4, "invalid_0.01": 0, "seconds": 0.6}
    lines = epoch_table([dict(row, lr=lr) for lr in (0.1, 0.001234, 5.664e-07, 0.0)], 99.4, 30, [0.1, 0.01], True)
    widths = {len(line.rstrip()) for line in lines.splitlines()[:-1]}
    assert len(widths) == 1, lines
    assert " 5.66e-07 " in lines and " 0.001234 " in lines
