"""Issue 11 end to end: real jobs racing for one run directory, failures that always say why, signals
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
    refused = f"hpcgraft: error: rank 0: {out} is in use by another job (pid "
    assert refused in loser or "holds a finished run" in loser, loser
    assert _rows(out) == [(1, 0), (1, 1), (1, None)]  # every (epoch, peer) once


def test_a_job_started_while_another_runs_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = _start(out, "graft.mode=none", "train.epochs=1", environ={**env(), "HPCGRAFT_INJECT": "0:2:sleep"})
    try:
        lock = out / ".hpcgraft.lock"
        for _ in range(1200):  # until the holder has recorded itself (generous: the machine may be loaded)
            if lock.exists() and lock.read_text().strip() and json.loads(lock.read_text())["pid"] == holder.pid:
                break
            assert holder.poll() is None, holder.communicate()
            time.sleep(0.1)
        second = train(0, out, "graft.mode=none", "train.epochs=1", timeout=600)
        assert second.returncode == 2, second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("hpcgraft: error:")]
        assert errors == [f"hpcgraft: error: {out} is in use by another job (pid {holder.pid} on {os.uname().nodename}"
                          "); wait for it to end, stop it, or use another --out"], second.stderr
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.communicate()
    third = train(0, out, "graft.mode=none", "train.epochs=1", "log.progress=off", timeout=600)
    assert third.returncode == 0, third.stderr
    assert _rows(out) == [(1, 0), (1, None)]


# ------------------------------------------------------------------------------------------ item 4
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
