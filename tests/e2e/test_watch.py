"""Watching a run end to end: real mpirun ranks writing to pipes (no terminal) print plain progress lines
and a summary, and ``hpcgraft.launch --wait`` follows a real job through submitit's local executor."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from hpcgraft.training.progress import run_summary
from tests._util import ROOT, env

pytestmark = pytest.mark.mpi

LINE = re.compile(r"progress: epoch ([12])/2, step (\d+)/22, \d+ img/s \(peer 0: \d+ img/s, loss \d+\.\d{4}; "
                  r"peer 1: \d+ img/s, loss \d+\.\d{4}\), left: epoch \S+( s)?, run \S+( s)?")


def test_progress_lines_and_summary_off_a_terminal(e2e_run):
    """graft2_again: log.every_s=0.05 and log.progress left at auto, output to pipes. Its numbers equal
    graft2's, which reports nothing (tests/e2e/test_train.py): meeting to report changes nothing."""
    run = e2e_run("graft2_again")
    out, err = run.proc.stdout, run.proc.stderr
    assert "\r" not in out and "\r" not in err  # no bar redraws in a log
    lines = [line for line in out.splitlines() if line.startswith("progress:")]
    assert len(lines) >= 2, out
    steps = []
    for line in lines:
        m = LINE.fullmatch(line)
        assert m, line
        steps.append((int(m[1]), int(m[2])))
    assert steps == sorted(steps) and all(1 <= s <= 22 for _, s in steps)
    summary = [line for line in out.splitlines() if line.startswith("summary:")]
    assert len(summary) == 1 and out.rstrip().endswith(summary[0])
    expected = run_summary(run.metrics(), 0.0).rpartition("; wall time")[0]
    assert summary[0].startswith(expected + "; wall time ") and "peer 1" in expected and "ensemble" in expected
    assert "hpcgraft: 2 peers x 1 replica," in err and "finished 2 epochs;" in err


def test_launch_wait_prints_state_changes_and_the_training_log(tmp_path):
    cmd = [sys.executable, "-m", "hpcgraft.launch", "--executor", "local", "--tasks-per-node", "2", "--wait",
           "--out", str(tmp_path / "run"), "--config", "configs/digits.yaml", "train.epochs=1",
           "checkpoint.enabled=false", "dist.threads=1", "log.every_s=0.05"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    job = re.match(r"submitted job (\S+) ", lines[0])[1]
    running, done = lines.index(f"job {job}: RUNNING"), lines.index(f"job {job}: COMPLETED")
    followed = lines[running + 1:done]  # what the job printed, followed while it ran
    assert any(line.startswith("progress: epoch 1/1, step ") for line in followed), r.stdout
    assert any(line.split()[:2] == ["1/1", "1"] for line in followed), r.stdout  # the epoch table
    assert any(line.startswith("summary: 1 epoch, top-1 best/final: peer 0 ") for line in followed), r.stdout
    assert lines.count(f"job {job}: RUNNING") == 1 and "\r" not in r.stdout
