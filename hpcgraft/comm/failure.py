"""Failure handling: an exception on any rank aborts the whole job, a watchdog aborts a collective
that takes far longer than it should, and stop signals become a stop at the same step on every rank.

Failures must not hang an allocation: a rank left waiting in a collective holds every node of the job.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import signal
import sys
import termios
import threading
import time
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from hpcgraft.comm import mpi
from hpcgraft.errors import EXIT_FAILURE, AgreedError, UserError
from hpcgraft.supervise import STOP_SIGNALS, unlink_shared_memory

if TYPE_CHECKING:
    from mpi4py import MPI


#: How long an aborting rank waits for the launcher to read its last words (seconds); the abort follows anyway.
DRAIN_S = 5.0


def say_last_words(text: str, fd: int = 2) -> None:
    """Write ``text`` to ``fd`` whole, then wait until the reader has taken it from the pipe.

    MPI_Abort makes the launcher kill every rank and stop forwarding their output; a message still in a
    buffer, or still in the pipe when that happens, is lost, and the job's output ends at "Traceback (most
    recent call last):", with no cause. So the message goes out in as few write calls as the pipe
    allows, past Python's buffers, and on a pipe the rank waits (bounded) until the launcher has read it."""
    with contextlib.suppress(ValueError, OSError):
        sys.stderr.flush()
    data = text.encode("utf-8", "replace")
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data):]
        deadline = time.monotonic() + DRAIN_S
        unread = array.array("i", [1])
        while time.monotonic() < deadline:
            fcntl.ioctl(fd, termios.FIONREAD, unread)  # a pipe's unread bytes; fails on files, ending the wait
            if unread[0] <= 0:
                break
            time.sleep(0.005)


def abort(comm: MPI.Comm, message: str, code: int = EXIT_FAILURE, detail: str = "") -> None:
    """Print one line naming this rank (after ``detail``, a traceback), then take every rank of the job down."""
    say_last_words(f"{detail}hpcgraft: rank {comm.Get_rank()}: {message}\n")
    unlink_shared_memory()  # MPI_Finalize, which would remove it, never comes, and /dev/shm would keep it
    if comm.Get_size() > 1:
        comm.Abort(code)
    sys.exit(code)


@contextlib.contextmanager
def abort_on_error(comm: MPI.Comm) -> Iterator[None]:
    """Run the body; an exception on this rank logs its traceback and aborts the communicator, so
    the other ranks stop at once instead of waiting forever in their next collective."""
    try:
        yield
    except (SystemExit, AgreedError):
        raise
    except KeyboardInterrupt:
        abort(comm, "interrupted")
    except BaseException as exc:  # noqa: BLE001 - any failure must take the job down
        if isinstance(exc, UserError):
            abort(comm, f"error: {exc}")
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the cause, not a traceback
            abort(comm, f"failed: no space left on the device of {exc.filename or 'a file being written'} "
                        f"({exc.strerror}); free space and re-run the same command to resume from the last checkpoint")
        abort(comm, f"failed with {type(exc).__name__}: {exc}", detail=traceback.format_exc())


class Watchdog:
    """Aborts the job when one guarded collective lasts longer than ``timeout`` seconds.

    A lost node leaves its partners blocked in MPI forever; this turns that into a clean abort that
    names the stuck operation, so the allocation is released and the job can be resubmitted.
    """

    def __init__(self, comm: MPI.Comm, timeout: float) -> None:
        self.comm, self.timeout = comm, timeout
        self._lock = threading.Lock()
        self._what: str | None = None
        self._since = 0.0
        self._thread = threading.Thread(target=self._watch, name="hpcgraft-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        with self._lock:
            self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._what = None

    def _watch(self) -> None:
        tick = min(1.0, self.timeout / 4)
        while True:
            time.sleep(tick)
            with self._lock:
                what, since = self._what, self._since
            if what is not None and time.monotonic() - since > self.timeout:
                abort(self.comm, f"watchdog: '{what}' took longer than dist.watchdog_s={self.timeout:g} s; "
                                 "a peer is lost or stuck, aborting the job")


_stop_signal: int | None = None


def _on_stop_signal(signum: int, frame: object) -> None:
    global _stop_signal
    _stop_signal = signum


def catch_stop_signals() -> None:
    """Record SIGUSR1/SIGTERM instead of dying, and take the ones held since the process started
    (:func:`hpcgraft.supervise.hold_stop_signals`): a signal during start-up is honoured at the first step."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class StopRequest:
    """SIGUSR1/SIGTERM on any rank -> every rank sees ``poll() == True`` at the same step.

    SLURM sends USR1 before a time limit (``--signal``) and TERM on preemption, to each rank at a
    slightly different moment. A pipelined non-blocking MAX-allreduce of the local flag, started at one
    step and completed at the next, makes all ranks agree on where to stop at no cost to the step.
    """

    def __init__(self, comm: MPI.Comm) -> None:
        catch_stop_signals()
        self._max = mpi().MAX
        self.comm = comm.Dup()
        self._send = np.zeros(1, dtype=np.int32)
        self._recv = np.zeros(1, dtype=np.int32)
        self._req: MPI.Request | None = None

    @property
    def received(self) -> int | None:
        return _stop_signal

    def poll(self) -> bool:
        """Collective: call once per step on every rank."""
        if self._req is not None:
            self._req.Wait()
            self._req = None
            if self._recv[0]:
                return True
        self._send[0] = 1 if self.received is not None else 0
        self._req = self.comm.Iallreduce(self._send, self._recv, op=self._max)
        return False

    def close(self) -> None:
        if self._req is not None:
            self._req.Wait()
            self._req = None
