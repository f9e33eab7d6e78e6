"""The run directory's lock: one job per run directory, the holder named, stale locks
taken over. Real concurrent jobs are in tests/e2e/test_hardening.py; here the file-system cases."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys

import pytest

from hpcgraft.storage.lock import LOCK_FILE, RunDirLock, RunDirLockedError


def test_a_second_holder_is_refused_with_the_holders_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = RunDirLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirLockedError, match=rf"^{tmp_path} is in use by another job \(pid {os.getpid()} on "
                                                rf"{socket.gethostname()}, SLURM job 4242\); wait for it"):
        RunDirLock(tmp_path).acquire()
    first.release()
    again = RunDirLock(tmp_path)
    again.acquire()  # released: free again
    again.release()


def test_a_dead_holder_releases_the_lock(tmp_path):
    """flock dies with its process: a killed job never blocks its requeue."""
    code = (f"from pathlib import Path; from hpcgraft.storage.lock import RunDirLock; "
            f"RunDirLock(Path({str(tmp_path)!r})).acquire(); import os; os._exit(9)")
    subprocess.run([sys.executable, "-c", code], check=False, timeout=120, env={**os.environ})
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] != os.getpid()  # its record is left behind
    lock = RunDirLock(tmp_path)
    lock.acquire()
    lock.release()


@pytest.fixture
def no_flock(monkeypatch):
    def refuse(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)


def _record(tmp_path, **holder: object) -> None:
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder) + "\n")


def test_without_flock_a_live_holder_keeps_the_directory(tmp_path, no_flock):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _record(tmp_path, host=socket.gethostname(), pid=sleeper.pid, job=None)
        with pytest.raises(RunDirLockedError, match=rf"pid {sleeper.pid} on {socket.gethostname()}\)"):
            RunDirLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunDirLock(tmp_path)  # now a dead pid on this host: stale, taken over
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # without flock, an empty file is a free lock


def test_without_flock_another_hosts_holder_is_not_guessed_dead(tmp_path, no_flock):
    _record(tmp_path, host="elsewhere-node", pid=1, job="77")
    with pytest.raises(RunDirLockedError, match=r"pid 1 on elsewhere-node, SLURM job 77\).*if that job is gone, "
                                                rf"delete {tmp_path / LOCK_FILE}"):
        RunDirLock(tmp_path).acquire()
