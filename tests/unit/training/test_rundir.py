"""The run directory's safety, through the training command's own ``main`` in this process (one rank):
another project's directory is neither resumed, marked nor cleared, --restart removes only what hpcgraft
wrote, and no symlink planted where hpcgraft writes is followed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from hpcgraft import train
from hpcgraft.storage.lock import LOCK_FILE
from hpcgraft.training.rundir import MARKER, start_over
from tests._util import ROOT

RELAYOUT = ROOT / "tests/data/run-before-relayout"  # a real run directory of an earlier version (one peer)


def main(capsys: pytest.CaptureFixture, out: Path, *args: str) -> tuple[int, list[str]]:
    """(status, error lines) of ``python -m hpcgraft.train`` on ``out``, one epoch of digits, without mpirun."""
    rc = train.main(["--config", str(ROOT / "configs/digits.yaml"), "--out", str(out), "train.epochs=1",
                     "graft.mode=none", "log.progress=off", "dist.threads=1", *args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hpcgraft: error:")]
    assert "Traceback" not in err, err
    return rc, errors


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` but the lock: its content and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def other_tools_run(out: Path) -> Path:
    (out / "checkpoints" / "best").mkdir(parents=True)
    (out / "checkpoints" / "best" / "model.pth").write_bytes(b"weights")
    (out / "config.yaml").write_text("lr: 0.1\nepochs: 90\nmodel: resnet50\n")
    (out / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')
    return out


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
@pytest.mark.parametrize("orders", [["resume", "restart"], ["restart"]], ids=["resume-then-restart", "restart"])
def test_another_tools_run_is_neither_resumed_marked_nor_cleared(capsys, tmp_path, stop_signals_kept, orders):
    """Its config.yaml is YAML, but not an hpcgraft config: the directory is not hpcgraft's."""
    out = other_tools_run(tmp_path / "run")
    before = snapshot(out)
    for order in orders:
        rc, errors = main(capsys, out, *(["--restart"] if order == "restart" else []))
        assert rc == 2 and len(errors) == 1, errors
        assert errors[0].startswith(f"hpcgraft: error: --out {out} is not an hpcgraft run directory (it holds "
                                    f"checkpoints, config.yaml, metrics.jsonl and no {MARKER}; its config.yaml is "
                                    "not an hpcgraft config (unknown config key 'lr'"), errors
        assert errors[0].endswith("hpcgraft neither resumes nor clears it: pass an empty or new directory"), errors
        assert snapshot(out) == before
        assert not (out / MARKER).exists()


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
def test_restart_of_a_run_keeps_the_files_hpcgraft_did_not_write(capsys, tmp_path, stop_signals_kept):
    out = tmp_path / "run"
    shutil.copytree(RELAYOUT, out)
    (out / "notes.txt").write_text("mine\n")
    (out / "checkpoints" / "best-by-hand").mkdir()
    (out / "checkpoints" / "best-by-hand" / "model.pth").write_bytes(b"weights")
    rc, errors = main(capsys, out, "--restart", "checkpoint.enabled=false")
    assert rc == 0 and not errors, errors
    assert (out / "notes.txt").read_text() == "mine\n"
    assert (out / "checkpoints" / "best-by-hand" / "model.pth").read_bytes() == b"weights"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best-by-hand"]  # the run's own went
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 1]
    assert (out / MARKER).exists()


def test_start_over_removes_only_hpcgraft_entries(tmp_path):
    """The lowest layer of --restart: the run's files, step directories (also one whose removal was cut
    short) and event files go; a foreign file in each of those places stays."""
    out = tmp_path / "run"
    shutil.copytree(RELAYOUT, out)
    (out / "checkpoints" / ".trash-step-000000011").mkdir()
    events = out / "tensorboard" / "peer0"
    events.mkdir(parents=True)
    (events / "events.out.tfevents.0000000001.host.1.hpcgraft").write_bytes(b"x")
    (out / "tensorboard" / "notes.txt").write_text("mine\n")
    (out / "checkpoints" / "README").write_text("mine\n")
    start_over(out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "checkpoints", "checkpoints/README", "tensorboard", "tensorboard/notes.txt"]


# Where a planted symlink would redirect a write (or a removal), and one entry of the wrong kind each.
PLANTED = ["status.json", "metrics.jsonl", "graft.jsonl", "config.yaml", "checkpoints",
           "checkpoints/step-000000022", "checkpoints/step-000000022/peer-000.h5", "tensorboard", "tensorboard/peer0"]


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
@pytest.mark.parametrize("restart", [False, True], ids=["resume", "restart"])
@pytest.mark.parametrize("entry", PLANTED)
def test_a_symlink_where_hpcgraft_writes_is_refused_and_its_target_untouched(capsys, tmp_path, stop_signals_kept,
                                                                           entry, restart):
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "file.txt").write_text("keep me\n")
    (outside / "folder" / "inside.txt").write_text("keep me too\n")
    out = tmp_path / "run"
    shutil.copytree(RELAYOUT, out)
    (out / MARKER).touch()
    (out / "tensorboard").mkdir()
    link = out / entry
    if link.is_dir():
        shutil.rmtree(link)
    link.unlink(missing_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside / ("folder" if entry in ("checkpoints", "tensorboard") or "/" in entry and
                               not entry.endswith(".h5") else "file.txt"))
    before = snapshot(outside)
    rc, errors = main(capsys, out, "train.epochs=2", *(["--restart"] if restart else []))
    assert errors == [f"hpcgraft: error: {link} is a symlink; hpcgraft follows no link it did not make: remove "
                      "it, or use another --out"] and rc == 2
    assert snapshot(outside) == before


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
@pytest.mark.parametrize(("entry", "kind", "wanted"), [("status.json", "a directory", "file"),
                                                       ("metrics.jsonl", "a directory", "file"),
                                                       ("tensorboard", "a file", "folder"),
                                                       ("checkpoints", "a file", "folder")])
def test_an_entry_of_the_wrong_kind_is_refused_before_the_work(capsys, tmp_path, stop_signals_kept, entry, kind,
                                                               wanted):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).touch()
    if kind == "a directory":
        (out / entry).mkdir()
    else:
        (out / entry).write_text("mine\n")
    rc, errors = main(capsys, out, "log.tensorboard=true")
    assert errors == [f"hpcgraft: error: {out / entry} is {kind} where hpcgraft writes its {entry} {wanted}; move "
                      "it away, or use another --out"] and rc == 2
    assert not (out / "config.yaml").exists()


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
def test_a_refused_run_writes_no_marker(capsys, tmp_path, stop_signals_kept):
    """An empty directory refused for a bad value stays as it was (but for the lock)."""
    out = tmp_path / "run"
    out.mkdir()
    rc, errors = main(capsys, out, "model.name=resnet32")  # does not take the digits' images
    assert rc == 2 and len(errors) == 1, errors
    assert sorted(os.listdir(out)) in ([], [LOCK_FILE])


def test_the_writers_never_follow_a_link_planted_during_the_run(tmp_path):
    """Planted after the start's check: the temporary name of an atomic write, an appended log."""
    from hpcgraft.storage import atomic
    from hpcgraft.storage.runlog import RunLog

    outside = tmp_path / "outside.txt"
    outside.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / f".status.json.{os.getpid()}.tmp").symlink_to(outside)
    atomic.write_text(run / "status.json", "{}\n")
    assert (run / "status.json").read_text() == "{}\n" and not (run / "status.json").is_symlink()
    (run / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        RunLog(run).append("metrics.jsonl", [{"epoch": 1}])
    assert outside.read_text() == "keep me\n"


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
def test_the_logs_are_on_disk_before_each_checkpoint(capsys, tmp_path, stop_signals_kept, monkeypatch):
    """A checkpoint is fsynced; rows still in the page cache could be lost with the node while it survives,
    and the resume would never log their epoch again. So the logs are synced first, each time."""
    from hpcgraft.storage.checkpoints import CheckpointManager

    events: list[str] = []
    real_fsync, real_save = os.fsync, CheckpointManager.save

    def fsync(fd: int) -> None:
        events.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).name}")
        real_fsync(fd)

    def save(self, step, *args, **kw):
        events.append(f"checkpoint {step}")
        return real_save(self, step, *args, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(CheckpointManager, "save", save)
    rc, errors = main(capsys, tmp_path / "run", "train.epochs=2")
    assert rc == 0 and not errors, errors
    saves = [i for i, e in enumerate(events) if e.startswith("checkpoint")]
    assert [events[i] for i in saves] == ["checkpoint 22", "checkpoint 44"]
    for i in saves:
        assert "fsync metrics.jsonl" in events[(saves[saves.index(i) - 1] if i != saves[0] else 0):i], events
