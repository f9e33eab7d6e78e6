"""One job per run directory: an exclusive lock held for the job's lifetime.

Two jobs on one run directory (an overlapping requeue, a command started twice) both resume the same
checkpoint and append every epoch twice. The lock file names its holder (host, pid, SLURM job id) so the
refusal can say who holds the directory. ``flock`` is released by the kernel when the holder dies, so a
killed job never blocks its requeue; where the file system has no ``flock`` (some NFS and parallel file
systems), the file's content is the lock, and a holder on this host whose pid is gone is taken over.

Where ``flock`` works but only within one node (NFS mounted with ``local_lock=flock`` or ``local_lock=all``,
Lustre with ``localflock``), a job on another node would get the lock too: there the file's content is
checked as well, so a holder recorded by another host keeps the directory. The mount is read from
/proc/self/mountinfo when the lock is taken.

The lock file is opened without following a symlink: a link planted where the lock belongs would
otherwise receive the holder's record and be truncated at release, whatever file it points to.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
from pathlib import Path

from hpcgraft.errors import CheckpointError

LOCK_FILE = ".hpcgraft.lock"
#: flock errors that mean "this file system does not lock", not "someone holds it".
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
MOUNTINFO = Path("/proc/self/mountinfo")


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
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR):
                raise
            kind = "a symlink" if exc.errno == errno.ELOOP else "a directory"
            raise CheckpointError(f"{self.path} is {kind}, where hpcgraft keeps the run directory's lock file "
                                  "(it follows no link it did not make); remove it, or use another --out") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.flocked = True
                if node_local_flock(self.path.parent):  # another node's holder is invisible to this flock
                    self._take_by_content(fd, flocked=True)
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

    def _take_by_content(self, fd: int, *, flocked: bool = False) -> None:
        """Without flock (or with a node-local one): a recorded holder that is alive, or on another host
        (whose pids this host cannot see), keeps the directory; a dead pid on this host is a stale lock and
        is taken over. ``flocked``: this host's flock is held, so no holder on this host is alive."""
        holder = _read_holder(fd)
        if not holder:
            return
        if holder.get("host") == socket.gethostname() and (flocked or holder.get("pid") == os.getpid()):
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


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are written as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def node_local_flock(path: Path, mountinfo: str | None = None) -> bool:
    """Whether ``flock`` on ``path``'s file system locks only within this node (NFS ``local_lock=flock`` or
    ``all``, Lustre ``localflock``). ``mountinfo``: the text of /proc/self/mountinfo (read when None); a
    system without it is taken to lock across nodes, as flock is meant to."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    target = os.path.realpath(path)
    best: tuple[int, str, set[str]] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        if len(fields) < dash + 3:
            continue
        point = _unescape(fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):  # the last, deepest mount over the path wins
            options = set(fields[5].split(",")) | set(fields[dash + 3].split(",") if len(fields) > dash + 3 else ())
            best = (len(point), fields[dash + 1], options)
    if best is None:
        return False
    _, fstype, options = best
    if fstype.startswith("nfs"):
        return bool(options & {"local_lock=flock", "local_lock=all"})
    return fstype == "lustre" and "localflock" in options
