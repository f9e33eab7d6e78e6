"""Following a submitted job from the submitting shell: its state changes and the new lines of its log.

``hpcgraft.launch --wait`` used to sit silent for hours; it now prints ``job 123: PENDING``, ``job 123:
RUNNING`` as the scheduler reports them and, in between, what the training prints (epoch rows, progress
lines, the summary), read from the job's log file as it grows. No scheduler is needed here: the caller
hands in each state it polled, which keeps this testable with a plain file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


class JobFollower:
    """Print a job's state changes and the complete lines its log gained since the last :meth:`poll`.

    The log may not exist yet (a pending job), may be cut short and rewritten (a requeued job's log
    opened anew: read again from the start), and may end without a newline until the job is over
    (:meth:`finish` prints that last partial line).
    """

    def __init__(self, job: str, log: str | Path, write: Callable[[str], None] = print) -> None:
        self.job, self.log, self.write = job, Path(log), write
        self.state: str | None = None
        self.offset = 0
        self.partial = b""

    def poll(self, state: str | None) -> None:
        """One look: ``state`` as the scheduler reports it now (None: it no longer lists the job)."""
        self.tail()
        if state and state != self.state:
            self.write(f"job {self.job}: {state}")
            self.state = state

    def tail(self) -> None:
        try:
            size = self.log.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:  # rewritten from the start (a requeue): follow the new content
            self.offset, self.partial = 0, b""
        if size == self.offset:
            return
        with self.log.open("rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            self._line(line)

    def finish(self, state: str) -> None:
        """The job is over: the rest of its log, then its final state."""
        self.tail()
        if self.partial:
            self._line(self.partial)
            self.partial = b""
        if state != self.state:
            self.write(f"job {self.job}: {state}")
            self.state = state

    def _line(self, raw: bytes) -> None:
        # A bar's redraws (a job started with log.progress on a terminal-like output): keep the last one.
        self.write(raw.decode("utf-8", "replace").rstrip("\r").rpartition("\r")[2])
