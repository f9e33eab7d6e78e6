"""Rank supervision: name the rank the kernel killed.

A rank killed by a signal (``kill -9``, the out-of-memory killer, a segfault) prints nothing, and the
launcher's own report cannot be trusted to name it: MPICH's mpiexec names the first rank *in rank
order* with a bad exit, which is often a healthy rank it killed while cleaning up. So each rank started
by a launcher runs as a child of a small supervisor (standard library only, no MPI, no torch) that
waits for it, and when it dies from a signal prints one line naming the rank, its pid and host, then
dies from the same signal so the launcher still sees what happened. The child dies with its
supervisor (``PR_SET_PDEATHSIG``), so a launcher that kills the supervisor never leaves a rank behind.

Stop signals (SIGUSR1, SIGTERM) reach the child directly when a launcher signals the process group
(mpiexec and srun do), and are also passed on to it, which is harmless: a rank only records them.
``HPCGRAFT_SUPERVISE=0`` turns supervision off.
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
#: Environment variables through which launchers tell a process its rank (MPICH/Hydra, SLURM, Open MPI, PMIx).
RANK_VARIABLES = ("PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGUSR1, signal.SIGTERM)

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


def _start_child() -> None:
    """In the child, before exec: die with the supervisor, and take signals the supervisor holds back."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # an ignored SIGINT would survive exec


def supervise(argv: Sequence[str]) -> int:
    """Run ``argv`` as this rank's child and return its exit status; a child killed by a signal is
    named on stderr and this process then dies from the same signal."""
    # Signals that arrive before the child exists are held, then passed on to it.
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child through the process group
    child = subprocess.Popen(
        list(argv), env={**os.environ, CHILD_MARK: "1"}, close_fds=False, preexec_fn=_start_child
    )
    for sig in _FORWARDED:
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    status = child.wait()
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


def supervise_module(module: str) -> None:
    """Call first thing in ``python -m <module>``, before MPI or torch are imported: under a launcher
    this process becomes the rank's supervisor and exits here; otherwise it returns and the module runs."""
    if should_supervise():
        sys.exit(supervise([sys.executable, "-m", module, *sys.argv[1:]]))


def train() -> None:
    """The ``hpcgraft-train`` command: ``python -m hpcgraft.train``, supervised under a launcher.

    The module runs as ``__main__`` (its own guard supervises), so this module never imports the
    training and stays importable before MPI and torch."""
    runpy.run_module("hpcgraft.train", run_name="__main__", alter_sys=True)
