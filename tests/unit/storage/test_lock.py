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
from pathlib import Path

import pytest

from hpcgraft.errors import CheckpointError
from hpcgraft.storage import lock as lock_module
from hpcgraft.storage.lock import LOCK_FILE, RunDirLock, RunDirLockedError, node_local_flock


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


@pytest.mark.process  # the holder is another process
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


@pytest.mark.process  # the holder is another process
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


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_a_symlink_or_directory_where_the_lock_belongs_is_refused_and_its_target_untouched(tmp_path, kind):
    """The holder's record would go into whatever file a planted link points to, and be truncated at release."""
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    os.utime(outside, ns=(1_000_000_000, 1_000_000_000))
    run = tmp_path / "run"
    run.mkdir()
    if kind == "symlink":
        (run / LOCK_FILE).symlink_to(outside)
    else:
        (run / LOCK_FILE).mkdir()
    with pytest.raises(CheckpointError, match=rf"^{run / LOCK_FILE} is a {kind}, where hpcgraft keeps the run "
                                              r"directory's lock file .*; remove it, or use another --out$"):
        RunDirLock(run).acquire()
    assert outside.read_text() == "keep me\n" and outside.stat().st_mtime_ns == 1_000_000_000


def _mountinfo(fstype: str, options: str, point: str = "/") -> str:
    return (f"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
            f"40 22 0:50 / {point} rw,relatime shared:30 - {fstype} server:/export rw,{options}\n")


@pytest.mark.parametrize(("fstype", "options", "local"), [
    ("nfs4", "vers=4.2,local_lock=none,addr=10.0.0.1", False),
    ("nfs", "vers=3,local_lock=flock,addr=10.0.0.1", True),
    ("nfs4", "vers=4.1,local_lock=all", True),
    ("nfs", "vers=3,local_lock=posix", False),
    ("lustre", "flock,lazystatfs", False),
    ("lustre", "localflock,lazystatfs", True),
    ("ext4", "local_lock=all", False),
])
def test_node_local_flock_is_read_from_the_run_directorys_mount(fstype, options, local):
    assert node_local_flock(Path("/scratch/me/run"), _mountinfo(fstype, options, "/scratch")) is local
    # a path outside that mount is on the root file system
    assert node_local_flock(Path("/home/me/run"), _mountinfo(fstype, options, "/scratch")) is False
    assert node_local_flock(Path("/scratchy/run"), _mountinfo(fstype, options, "/scratch")) is False


def test_a_mount_point_with_a_space_is_unescaped():
    assert node_local_flock(Path("/my data/run"), _mountinfo("nfs", "local_lock=all", r"/my\040data")) is True


def test_on_a_node_local_flock_another_hosts_holder_keeps_the_directory(tmp_path, monkeypatch):
    """flock succeeds on this node while a job on another node holds the directory: its record decides."""
    monkeypatch.setattr(lock_module, "MOUNTINFO", tmp_path / "mountinfo")
    (tmp_path / "mountinfo").write_text(_mountinfo("nfs4", "vers=4.2,local_lock=all", str(tmp_path)))
    _record(tmp_path, host="elsewhere-node", pid=1, job="77")
    with pytest.raises(RunDirLockedError, match=r"pid 1 on elsewhere-node, SLURM job 77\).*if that job is gone"):
        RunDirLock(tmp_path).acquire()
    _record(tmp_path, host=socket.gethostname(), pid=os.getppid(), job=None)  # alive, but flock says it is gone
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert lock.flocked and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
