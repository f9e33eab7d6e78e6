"""Rank supervision: name the rank the kernel killed.

A rank killed by a signal (``kill -9``, the out-of-memory killer, a segfault) prints nothing, and the
launcher's own report cannot be trusted to name it: MPICH's mpiexec names the first rank *in rank
order* with a bad exit, which is often a healthy rank it killed while cleaning up. So each rank started
by a launcher runs as a child of a small supervisor (standard library only, no MPI, no torch) that
waits for it, and when it dies from a signal prints one line naming the rank, its pid and host, then
dies from the same signal so the launcher still sees what happened. The child dies with its
supervisor (``PR_SET_PDEATHSIG``), so a launcher that kills the supervisor never leaves a rank behind.

Stop signals (SIGUSR1, SIGTERM) are held (blocked) from the first moment of the process, across the
child's exec and its imports of MPI and torch, until the rank has installed its own handlers
(:func:`hpcgraft.comm.failure.catch_stop_signals`): a signal during start-up is then delivered, recorded
and honoured at the first step, instead of killing a rank that cannot yet checkpoint. The supervisor
passes the signals it receives on to the child; one that also reached the child directly (a launcher
signalling the process group) is harmless: a rank only records them.

MPICH keeps each node's shared memory in a ``/dev/shm/mpich_shm_*`` file that only MPI_Finalize removes;
a job ended by MPI_Abort or a kill leaves it behind (2 MB each, until the node reboots). The rank tells
its supervisor which files it mapped (:func:`note_shared_memory`), and the supervisor removes them once
the rank has ended, whatever ended it. ``HPCGRAFT_SUPERVISE=0`` turns supervision off.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

#: Set in the child's environment, so it runs the training itself instead of supervising again.
CHILD_MARK = "HPCGRAFT_SUPERVISED"
#: The pipe (a file descriptor number) on which a supervised rank names its shared-memory files.
SHM_FD = "HPCGRAFT_SHM_FD"
#: Tests set this to a file where every rank also appends the shared-memory files it mapped, so that the
#: suite can check that none of its own jobs left one (other jobs on the machine make them too).
SHM_LOG = "HPCGRAFT_SHM_LOG"
_SHM_PREFIX = "/dev/shm/mpich_shm_"
#: Environment variables through which launchers tell a process its rank (MPICH/Hydra, SLURM, Open MPI, PMIx).
RANK_VARIABLES = ("PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGUSR1, signal.SIGTERM)
STOP_SIGNALS = _FORWARDED

_HINTS = {
    signal.SIGKILL: "kill -9, or the kernel's out-of-memory killer: see `dmesg`",
    signal.SIGSEGV: "a crash in native code",
    signal.SIGBUS: "a crash in native code, or a full /dev/shm",
    signal.SIGABRT: "an abort in native code",
}


def launcher_rank() -> str | None:
    """The rank a launcher gave this process, or None when it was started on its own."""
    for name in RANK_VARIABLES:
        if name in os.environ:
            return os.environ[name]
    return None


def should_supervise() -> bool:
    return (
        os.environ.get(CHILD_MARK) != "1"
        and os.environ.get("HPCGRAFT_SUPERVISE", "1") != "0"
        and launcher_rank() is not None
        and sys.platform.startswith("linux")
    )


def death_message(rank: str, pid: int, host: str, signum: int) -> str:
    """The one line printed for a rank that a signal ended."""
    sig = signal.Signals(signum)
    hint = _HINTS.get(sig)
    return (
        f"hpcgraft: rank {rank} (pid {pid} on {host}) was killed by {sig.name} (signal {signum}"
        f"{f': {hint}' if hint else ''}); the job stops, and running it again resumes from the last checkpoint"
    )


def hold_stop_signals() -> None:
    """Block SIGUSR1/SIGTERM until the rank can honour them; the mask survives fork and exec, and a signal
    that arrives meanwhile stays pending instead of killing the process."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _start_child() -> None:
    """In the child, before exec: die with the supervisor. The stop signals stay blocked (see
    :func:`hold_stop_signals`) until the rank installs its handlers."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # an ignored SIGINT would survive exec


def shared_memory_files(maps: str = "/proc/self/maps") -> list[str]:
    """The MPICH shared-memory files this process has mapped."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = {line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) == 6}
    return sorted(path for path in found if path.startswith(_SHM_PREFIX))


def note_shared_memory() -> None:
    """In a rank, once MPI is initialised: name its shared-memory files to the supervisor (and the test
    log), so that they are removed however the job ends."""
    files = shared_memory_files()
    if not files:
        return
    text = "".join(f + "\n" for f in files)
    fd = os.environ.pop(SHM_FD, None)
    if fd is not None:
        try:
            os.write(int(fd), text.encode())
            os.close(int(fd))
        except (OSError, ValueError):
            pass
    log = os.environ.get(SHM_LOG)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(text)


def _remove_shared_memory(read_fd: int) -> None:
    """After the rank ended: remove the files it named (a finished job's are gone already). Another rank
    of the node may still be running, which is harmless: its mapping outlives the name."""
    chunks = []
    try:
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
    except OSError:
        pass
    os.close(read_fd)
    unlink_shared_memory(b"".join(chunks).decode(errors="replace").splitlines())


def unlink_shared_memory(paths: Sequence[str] | None = None) -> None:
    """Remove MPICH shared-memory files (default: the ones this process mapped). Called by a rank right
    before MPI_Abort too, since the launcher may kill the supervisors before they get to it."""
    for path in shared_memory_files() if paths is None else paths:
        if path.startswith(_SHM_PREFIX) and "/" not in path[len(_SHM_PREFIX):]:
            try:
                os.unlink(path)
            except OSError:
                pass


def supervise(argv: Sequence[str]) -> int:
    """Run ``argv`` as this rank's child and return its exit status; a child killed by a signal is
    named on stderr and this process then dies from the same signal."""
    # Signals that arrive before the child exists are held, then passed on to it.
    hold_stop_signals()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child through the process group
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)  # close_fds=False keeps the launcher's descriptors (PMI_FD) open too
    try:
        child = subprocess.Popen(
            list(argv), env={**os.environ, CHILD_MARK: "1", SHM_FD: str(write_fd)}, close_fds=False,
            preexec_fn=_start_child,
        )
    finally:
        os.close(write_fd)
    for sig in _FORWARDED:
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    status = child.wait()
    _remove_shared_memory(read_fd)
    if status >= 0:
        return status
    signum = -status
    print(death_message(launcher_rank() or "?", child.pid, socket.gethostname(), signum), file=sys.stderr,
          flush=True)
    if signum not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    return 128 + signum  # not reached for signals whose default action ends the process


def supervise_module(module: str, args: Sequence[str] | None = None) -> None:
    """Call first thing in ``python -m <module>`` (``args``: its arguments, default ``sys.argv[1:]``), before
    MPI or torch are imported: under a launcher this process becomes the rank's supervisor and exits here;
    otherwise it returns and the module runs, with the stop signals held until it installs its handlers."""
    hold_stop_signals()
    if should_supervise():
        sys.exit(supervise([sys.executable, "-m", module, *(sys.argv[1:] if args is None else args)]))


def train() -> None:
    """The ``hpcgraft-train`` command (``hpcgraft train``'s older name): ``python -m hpcgraft.cli.train``,
    supervised under a launcher.

    The module runs as ``__main__`` (its own guard supervises), so this module never imports the
    training and stays importable before MPI and torch."""
    runpy.run_module("hpcgraft.cli.train", run_name="__main__", alter_sys=True)
