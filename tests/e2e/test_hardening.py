"""Hardening end to end: real jobs racing for one run directory, failures that always say why, signals
during start-up, and no shared-memory segment left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._util import MPIRUN, ROOT, env, jsonl, train

pytestmark = pytest.mark.mpi

DIGITS = str(ROOT / "configs/digits.yaml")


def _start(out: Path, *overrides: str, np: int = 0, environ: dict[str, str] | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "hpcgraft.train", "--config", DIGITS, "--out", str(out), "log.progress=off",
            *overrides]
    if np:
        args = [MPIRUN, "-np", str(np), *args]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ or env(),
                            cwd=ROOT, start_new_session=True)


def _rows(out: Path) -> list[tuple]:
    return [(r["epoch"], r["peer"]) for r in jsonl(out / "metrics.jsonl")]


def test_two_jobs_started_together_on_one_out_run_once(tmp_path):
    out = tmp_path / "run"
    jobs = [_start(out, "train.epochs=1", np=2) for _ in range(2)]
    done = [(job.wait(timeout=600), *job.communicate()) for job in jobs]
    assert sorted(rc for rc, _, _ in done) == [0, 2], done
    loser = next(err for rc, _, err in done if rc == 2)
    refused = f"hpcgraft: error: {out} is in use by another job (pid "
    assert refused in loser or "holds a finished run" in loser, loser
    assert _rows(out) == [(1, 0), (1, 1), (1, None)]  # every (epoch, peer) once


def _holder(lock: Path, job: subprocess.Popen) -> int:
    """The pid recorded in a run directory's lock, once the job has taken it."""
    for _ in range(3000):  # generous: the machine may be loaded
        text = lock.read_text() if lock.exists() else ""
        if text.strip():
            return json.loads(text)["pid"]
        assert job.poll() is None, job.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{lock} was never taken")


def test_a_job_started_while_another_runs_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    """The holder is a real mpirun job stalled after step 2; its rank is then killed with kill -9 (and
    its supervisor removes the job's shared memory, which the session's check sees)."""
    out = tmp_path / "run"
    job = _start(out, "graft.mode=none", "train.epochs=1", np=1, environ={**env(), "HPCGRAFT_INJECT": "0:2:sleep"})
    try:
        pid = _holder(out / ".hpcgraft.lock", job)
        second = train(0, out, "graft.mode=none", "train.epochs=1", timeout=600)
        assert second.returncode == 2, second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("hpcgraft: error:")]
        assert errors == [f"hpcgraft: error: {out} is in use by another job (pid {pid} on "
                          f"{os.uname().nodename}); wait for it to end, stop it, or use another --out"], second.stderr
        os.kill(pid, signal.SIGKILL)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
    third = train(0, out, "graft.mode=none", "train.epochs=1", "log.progress=off", timeout=600)
    assert third.returncode == 0, third.stderr
    assert _rows(out) == [(1, 0), (1, None)]


# ---------------------------------------------------------------- a failing rank's cause always arrives
@pytest.fixture
def busy_cores() -> object:
    """Two spinning processes: the failing rank's message must arrive on a loaded machine too."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for s in spinners:
        s.kill()
        s.wait()


def test_the_failing_ranks_cause_always_arrives(busy_cores):
    """20 aborts in a row under load: every one ends with the traceback's last line and the cause line."""
    script = str(ROOT / "tests/e2e/ranks/abort_rank.py")
    lost = []
    for i in range(20):
        r = subprocess.run([MPIRUN, "-np", "2", sys.executable, script, str(i)], capture_output=True, text=True,
                           env=env(), cwd=ROOT, timeout=300)
        assert r.returncode != 0
        cause = f"hpcgraft: rank 1: failed with RuntimeError: injected cause {i}"
        if cause not in r.stderr or f"RuntimeError: injected cause {i}\n" not in r.stderr:
            lost.append((i, r.stderr[-400:]))
    assert not lost, lost


# ----------------------------------------------------------------------------- stop signals are never lost
@pytest.mark.parametrize(("sig", "after_s"), [(signal.SIGTERM, 0.3), (signal.SIGUSR1, 1.2), (signal.SIGTERM, 3.0)])
def test_a_stop_signal_during_start_up_is_honoured_at_the_first_step(tmp_path, sig, after_s):
    """Whenever the signal lands (the supervisors, MPI and torch still starting, or the data loading), the
    job stops with 75: after a checkpoint, or with nothing written when it had nothing to save. The moments
    only spread the signal over the start-up; no assertion depends on them (on a fast machine the last one
    lands in the first epoch, so the run is long enough never to finish first)."""
    out = tmp_path / "run"
    job = _start(out, "train.epochs=20", np=2)
    time.sleep(after_s)
    os.kill(job.pid, sig)  # mpiexec passes it on to every rank
    _, err = job.communicate(timeout=600)
    assert job.returncode == 75, err
    assert "Traceback" not in err
    status = json.loads((out / "status.json").read_text()) if (out / "status.json").exists() else None
    if status is None:  # stopped before the first step: nothing to save, no log written
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    else:
        assert status["state"] == "stopped" and status["step"] < 20 * 22, status
        assert list((out / "checkpoints").glob("step-*"))


# ------------------------------------------------------------------------ NaN peers and cultivation
def test_a_nan_peer_does_not_poison_cultivation_and_all_nan_fails(tmp_path):
    """Peer 1 goes NaN at step 3 while cultivating: peer 0 trains on, finite. When every peer goes NaN
    the run fails (exit 1, status "failed") instead of finishing."""
    one = train(2, tmp_path / "one", "graft.mode=none", "cultivate.lambda=1", "train.epochs=1", "log.progress=off",
                environ={**env(), "HPCGRAFT_INJECT": "1:3:nan"}, timeout=600)
    assert one.returncode == 0, one.stderr
    rows = {r["peer"]: r for r in jsonl(tmp_path / "one" / "metrics.jsonl") if r["peer"] is not None}
    assert rows[0]["train_loss"] == rows[0]["train_loss"] and rows[1]["train_loss"] != rows[1]["train_loss"], rows
    every = train(2, tmp_path / "all", "graft.mode=none", "train.epochs=2", "log.progress=off",
                  environ={**env(), "HPCGRAFT_INJECT": "0:3:nan,1:3:nan"}, timeout=600)
    assert every.returncode == 1, every.stderr
    errors = [line for line in every.stderr.splitlines() if line.startswith("hpcgraft: error:")]
    assert errors == ["hpcgraft: error: every peer's weights are NaN/Inf after epoch 1 (step 22); lower train.lr "
                      "(or graft.a) and start over with --restart"], every.stderr
    assert json.loads((tmp_path / "all" / "status.json").read_text())["state"] == "failed"


# ------------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_leaves_status_interrupted_not_running(tmp_path):
    """SIGINT in epoch 2 (after step 25): the job ends at once, without a checkpoint, and status.json no
    longer says the run is going on; it keeps the last epoch and step it recorded."""
    out = tmp_path / "run"
    r = train(0, out, "graft.mode=none", "train.epochs=2", "log.progress=off", "dist.threads=1",
              environ={**env(), "HPCGRAFT_INJECT": "0:25:int"})
    assert r.returncode == 1, r.stderr
    assert "hpcgraft: rank 0: interrupted" in r.stderr
    assert json.loads((out / "status.json").read_text()) == {"state": "interrupted", "epoch": 1, "step": 22}
