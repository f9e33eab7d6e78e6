"""One job per run directory: an exclusive lock held for the job's lifetime.

Two jobs on one run directory (an overlapping requeue, a command started twice) both resume the same
checkpoint and append every epoch twice. The lock file names its holder (host, pid, SLURM job id) so the
refusal can say who holds the directory. ``flock`` is released by the kernel when the holder dies, so a
killed job never blocks its requeue; where the file system has no ``flock`` (some NFS and parallel file
systems), the file's content is the lock, and a holder on this host whose pid is gone is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from hpcgraft.errors import CheckpointError

LOCK_FILE = ".hpcgraft.lock"
#: flock errors that mean "this file system does not lock", not "someone holds it".
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirLockedError(CheckpointError):
    """Another live job holds the run directory."""


def _holder_text(holder: dict) -> str:
    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{job}"


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError):
        holder = {}
    return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDirLock:
    """The exclusive lock of one run directory; held until :meth:`release` or the process ends."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None
        self.flocked = False

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirLockedError` naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.flocked = True
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise self._refusal(_read_holder(fd)) from None
                if exc.errno not in _NO_FLOCK:
                    raise
                self._take_by_content(fd)
            me = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _take_by_content(self, fd: int) -> None:
        """Without flock: a recorded holder that is alive, or on another host (whose pids this host
        cannot see), keeps the directory; a dead pid on this host is a stale lock and is taken over."""
        holder = _read_holder(fd)
        if not holder:
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            return
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                and not _pid_alive(holder["pid"]):
            return
        raise self._refusal(holder, other_host=holder.get("host") != socket.gethostname())

    def _refusal(self, holder: dict, other_host: bool = False) -> RunDirLockedError:
        hint = (f"; if that job is gone, delete {self.path}" if other_host else "")
        return RunDirLockedError(f"{self.path.parent} is in use by another job ({_holder_text(holder)}); wait for it "
                                 f"to end, stop it, or use another --out{hint}")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # without flock, an empty file is a free lock
        os.close(self.fd)
        self.fd = None
