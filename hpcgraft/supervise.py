"""Rank supervision: name the rank the kernel killed.

A rank killed by a signal (``kill -9``, the out-of-memory killer, a segfault) prints nothing, and the
launcher's own report cannot be trusted to name it: MPICH's mpiexec names the first rank *in rank
order* with a bad exit, which is often a healthy rank it killed while cleaning up. So each rank started
by a launcher runs as a child of a small supervisor (standard library only, no MPI, no torch) that
waits for it, and when it dies from a signal prints one line naming the rank, its pid and host, then
dies from the same signal so the launcher still sees what happened.

The other way round, the rank outlives its supervisor just long enough to clean up: it runs in a process
group of its own (MPICH's launcher ends a job with ``kill(-pgid, SIGKILL)`` on the supervisors' groups,
also when mpiexec itself was killed), and a thread in the rank (:func:`watch_supervisor`) waits on a pipe
that only the supervisor holds open. When the supervisor dies, whoever killed it, the rank removes its
shared memory, names what died (the supervisor, or the launcher above it) on stderr and to the callbacks
registered with :func:`on_orphaned` (rank 0 records it in status.json, whose reader may see no output at
all once mpiexec is gone), and kills itself. Until that thread runs, the rank dies with its supervisor
(``PR_SET_PDEATHSIG``): no rank is ever left behind.

Stop signals (SIGUSR1, SIGTERM) are held (blocked) from the first moment of the process, across the
child's exec and its imports of MPI and torch, until the rank has installed its own handlers
(:func:`hpcgraft.comm.failure.catch_stop_signals`): a signal during start-up is then delivered, recorded
and honoured at the first step, instead of killing a rank that cannot yet checkpoint. The supervisor
passes the signals it receives on to the child; one that also reached the child directly (a launcher
signalling the process group) is harmless: a rank only records them.

MPICH keeps each node's shared memory in a ``/dev/shm/mpich_shm_*`` file that only MPI_Finalize removes;
a job ended by MPI_Abort or a kill leaves it behind (2 MB each, until the node reboots). The rank tells
its supervisor which files it mapped (:func:`note_mpi_started`), and the supervisor removes them once
the rank has ended, whatever ended it. ``HPCGRAFT_SUPERVISE=0`` turns supervision off.

A rank can also hang before it has started: in MPI_Init, when the launcher's wire-up fails (SLURM's pmi2
plugin misreading a long key-value request under load is one seen cause; a rank that aborts there leaves
the others waiting for it forever, and srun does not end the step for them). That costs the whole
allocation until the time limit. So the start-up has a clock: the rank tells its supervisor when MPI is up,
on the same pipe on which it names its shared memory; one that has not said so within
``HPCGRAFT_START_TIMEOUT`` seconds (default 600, 0: no limit) is killed, and the supervisor exits with
:data:`~hpcgraft.errors.EXIT_NO_START` after one line naming the rank. Nothing was trained by then, so
starting the step again is safe: the sbatch scripts do it. The rank whose wire-up failed first usually
does not hang but aborts in MPI_Init (a garbled address); its supervisor reports that as the same status
(:func:`failed_in_start`), so that the step's status, the highest of its ranks', says "start again" and not
"crashed".
"""

from __future__ import annotations

import ctypes
import math
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from hpcgraft.errors import EXIT_FAILURE, EXIT_NO_START, EXIT_OK, EXIT_REQUEUE, EXIT_USAGE

#: Set in the child's environment, so it runs the training itself instead of supervising again.
CHILD_MARK = "HPCGRAFT_SUPERVISED"
#: The pipe (a file descriptor number) on which a supervised rank says that MPI has started, then names its
#: shared-memory files.
SHM_FD = "HPCGRAFT_SHM_FD"
_STARTED = "started"  # the pipe's first line; the lines after it are paths
#: Seconds a rank may take from its start until MPI is up; past it, its supervisor ends it (EXIT_NO_START).
START_TIMEOUT = "HPCGRAFT_START_TIMEOUT"
DEFAULT_START_TIMEOUT = 600.0
#: How often a job whose ranks could not start MPI is started again (submitit requeues; the sbatch scripts
#: read it as START_RETRIES).
START_RETRIES = "HPCGRAFT_START_RETRIES"
DEFAULT_START_RETRIES = 2
#: Tests set this to a file where every rank also appends the shared-memory files it mapped, so that the
#: suite can check that none of its own jobs left one (other jobs on the machine make them too).
SHM_LOG = "HPCGRAFT_SHM_LOG"
_SHM_PREFIX = "/dev/shm/mpich_shm_"
#: The read end of a pipe whose write end only the supervisor holds: end of file when it died.
LIFE_FD = "HPCGRAFT_SUPERVISOR_FD"
SUPERVISOR_PID = "HPCGRAFT_SUPERVISOR_PID"
#: Environment variables through which launchers tell a process its rank (MPICH/Hydra, SLURM, Open MPI, PMIx).
RANK_VARIABLES = ("PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
_PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
#: What the launcher sends to the supervisor's process group reaches the rank, in a group of its own, through it.
_FORWARDED = (*STOP_SIGNALS, signal.SIGINT)
#: Signals whose default action ends the supervisor, which it names to the rank before dying of them.
_FATAL = (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR2, signal.SIGALRM)

#: The signals of a crash in native code: in a rank that has not reported MPI up, MPI's start-up crashed.
_NATIVE_CRASHES = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE)

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


def _prctl_pdeathsig(signum: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def _start_child() -> None:
    """In the child, before exec: a process group of its own, out of reach of the launcher's group kill, and
    death with the supervisor until :func:`watch_supervisor` takes over. The stop signals stay blocked (see
    :func:`hold_stop_signals`) until the rank installs its handlers."""
    os.setpgid(0, 0)
    _prctl_pdeathsig(signal.SIGKILL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])  # held in the supervisor only


def shared_memory_files(maps: str = "/proc/self/maps") -> list[str]:
    """The MPICH shared-memory files this process has mapped."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = {line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) == 6}
    return sorted(path for path in found if path.startswith(_SHM_PREFIX))


def note_mpi_started() -> None:
    """In a rank, once MPI is initialised: tell the supervisor (which stops the start-up clock) and name its
    shared-memory files to it (and to the test log), so that they are removed however the job ends."""
    text = "".join(f + "\n" for f in shared_memory_files())
    fd = os.environ.pop(SHM_FD, None)
    if fd is not None:
        try:
            os.write(int(fd), f"{_STARTED}\n{text}".encode())
            os.close(int(fd))
        except (OSError, ValueError):
            pass
    log = os.environ.get(SHM_LOG)
    if log and text:
        with open(log, "a", encoding="utf-8") as f:
            f.write(text)


def _remove_shared_memory(read_fd: int) -> bool:
    """After the rank ended: remove the files it named (a finished job's are gone already), and say whether
    it had reported MPI up. Another rank of the node may still be running, which is harmless: its mapping
    outlives the name."""
    chunks = []
    try:
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
    except OSError:
        pass
    os.close(read_fd)
    lines = b"".join(chunks).decode(errors="replace").splitlines()
    unlink_shared_memory(lines)
    return bool(lines) and lines[0] == _STARTED


def unlink_shared_memory(paths: Sequence[str] | None = None) -> None:
    """Remove MPICH shared-memory files (default: the ones this process mapped). Called by a rank right
    before MPI_Abort too, since the launcher may kill the supervisors before they get to it."""
    for path in shared_memory_files() if paths is None else paths:
        if path.startswith(_SHM_PREFIX) and "/" not in path[len(_SHM_PREFIX):]:
            try:
                os.unlink(path)
            except OSError:
                pass


_orphan_callbacks: list[Callable[[str], None]] = []
_watching = False


def on_orphaned(callback: Callable[[str], None]) -> None:
    """Have ``callback(what died)`` called in this rank when its supervisor dies, right before the rank ends
    itself: the last moment to record it (rank 0's status.json). Runs on the watching thread; a process that
    has no supervisor to lose keeps none."""
    if _watching:
        _orphan_callbacks.append(callback)


def _process(pid: int) -> tuple[str, str, str, int | None] | None:
    """(name, state, start time, wait status once a zombie) of a process the kernel still knows, else None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # from field 3 (state) on; the name may hold spaces
    exit_code = int(fields[49]) if len(fields) > 49 else None  # field 52, Linux 3.5 and later
    return text[text.index("(") + 1:text.rindex(")")], fields[0], fields[19], exit_code


def _ancestors(pid: int, above: int = 2) -> list[tuple[int, str, str]]:
    """(pid, name, start time) of ``pid`` and up to ``above`` of its ancestors: the supervisor, then the
    launcher's processes (hydra_pmi_proxy and mpiexec, or slurmstepd), which may be the ones that died."""
    chain: list[tuple[int, str, str]] = []
    while pid > 1 and len(chain) <= above:
        info = _process(pid)
        if info is None:
            break
        chain.append((pid, info[0], info[2]))
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return chain


def _how(info: tuple[str, str, str, int | None] | None) -> str:
    """`` (SIGKILL)`` or `` (exit 3)`` while the dead process is still unreaped; nothing once it is gone."""
    if info is None or info[1] != "Z" or info[3] is None:
        return ""
    if os.WIFSIGNALED(info[3]):
        return f" ({signal.Signals(os.WTERMSIG(info[3])).name})"
    return f" (exit {os.WEXITSTATUS(info[3])})"


def what_died(chain: Sequence[tuple[int, str, str]], rank: str, host: str, note: str = "") -> str:
    """The outermost process of ``chain`` (the supervisor first, then the launcher above it) that has died,
    named: the launcher's death takes the supervisors with it, so it is the cause to name. ``note``: what
    the supervisor said of its own death, if anything."""
    for i in reversed(range(len(chain))):
        pid, name, start = chain[i]
        info = _process(pid)
        if i == 0 or info is None or info[2] != start or info[1] in ("Z", "X"):
            how = _how(info if info and info[2] == start else None)
            if i == 0:
                # Its parent reaps it within moments, and with it the exit status. A supervisor outlives its
                # rank unless killed, and names the catchable signals that kill it: SIGKILL is what is left.
                how = how or f" ({note or signal.SIGKILL.name})"
                return f"rank {rank}'s supervisor (pid {pid} on {host}) died{how}"
            return f"{name} (pid {pid} on {host}) died{how}"
    raise ValueError("an empty chain of processes")


def _watch(fd: int, chain: list[tuple[int, str, str]]) -> None:
    """Wait until the supervisor has died (end of file on its pipe), then clean up, name it and end the rank."""
    said = []
    try:
        while chunk := os.read(fd, 64):
            said.append(chunk)
    except OSError:
        pass
    rank = launcher_rank() or "?"
    what = what_died(chain, rank, socket.gethostname(), b"".join(said).decode(errors="replace").strip())
    unlink_shared_memory()
    for callback in list(_orphan_callbacks):
        try:
            callback(what)
        except Exception:  # noqa: BLE001 - the rank must end whatever a callback does
            pass
    line = f"hpcgraft: {what}; rank {rank} (pid {os.getpid()}) removed its shared memory and stops\n"
    try:
        os.write(2, line.encode())  # no reader left when mpiexec died: then status.json is the record
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def watch_supervisor() -> None:
    """In a supervised rank, before MPI starts: outlive the supervisor only to remove this rank's shared memory
    and name what died (the module docstring says why). Does nothing in a process that is not supervised."""
    import threading  # here: the supervisor's own start-up, before it holds the stop signals, stays short

    global _watching
    fd = os.environ.pop(LIFE_FD, None)
    supervisor = os.environ.pop(SUPERVISOR_PID, None)
    if _watching or fd is None or supervisor is None:
        return
    _watching = True
    os.set_inheritable(int(fd), False)  # the rank's own subprocesses have no supervisor to watch
    chain = _ancestors(int(supervisor)) or [(int(supervisor), "?", "")]
    threading.Thread(target=_watch, args=(int(fd), chain), name="hpcgraft-supervisor-watch", daemon=True).start()
    _prctl_pdeathsig(0)  # the thread takes over; a supervisor dead already has closed the pipe


def _die_saying(life_write: int, signum: int) -> None:
    """A signal that ends the supervisor: tell the rank which (it cannot learn it otherwise), then die of it."""
    try:
        os.write(life_write, signal.Signals(signum).name.encode())
    except OSError:
        pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def start_timeout() -> float | None:
    """The start-up clock's limit in seconds (None: no limit), from :data:`START_TIMEOUT`; raises ValueError
    with the one line to print for a value that is not a number of seconds."""
    text = os.environ.get(START_TIMEOUT, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_START_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"{START_TIMEOUT}={text} is not a number of seconds; set it to the time a rank may take "
                         f"to start MPI (default {DEFAULT_START_TIMEOUT:g}, 0: no limit)")
    return seconds or None


def start_retries() -> int:
    """How often a job whose ranks could not start MPI is started again, from :data:`START_RETRIES`; raises
    ValueError with the one line to print for a value that is not a count."""
    text = os.environ.get(START_RETRIES, "").strip()
    if not text:
        return DEFAULT_START_RETRIES
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{START_RETRIES}={text} is not a count; set it to how often a job whose ranks could not "
                         f"start MPI is started again (default {DEFAULT_START_RETRIES}, 0: never)")
    return int(text)


def _started_in_time(child: subprocess.Popen, read_fd: int, timeout: float | None) -> bool:
    """Whether the child said MPI is up (or ended) before ``timeout`` seconds passed. Both show as the pipe
    becoming readable: its first line, or the end of file of a child that closed it by ending."""
    if timeout is None:
        return True
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        if select.select([read_fd], [], [], left)[0]:
            return True
    return child.poll() is not None


def _end_unstarted(child: subprocess.Popen, timeout: float) -> int:
    """Kill a child stuck before MPI was up, with whatever it had started (its process group), remove the
    shared memory it mapped meanwhile, and name it in one line."""
    files = shared_memory_files(f"/proc/{child.pid}/maps")
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
    unlink_shared_memory(files)
    return _unstarted(child, f"did not get through MPI's start-up within {timeout:g} s ({START_TIMEOUT}): "
                             "the launcher's wire-up failed or hung")


def _unstarted(child: subprocess.Popen, what: str) -> int:
    """Name a child that ended before MPI was up (``what`` happened to it) in one line; the status to exit with."""
    print(f"hpcgraft: rank {launcher_rank() or '?'} (pid {child.pid} on {socket.gethostname()}) {what}; nothing "
          "was trained, so starting the job step again is safe (the sbatch scripts do it)", file=sys.stderr,
          flush=True)
    return EXIT_NO_START


def failed_in_start(status: int) -> bool:
    """Whether a rank that ended (``status`` as :attr:`subprocess.Popen.returncode`) before reporting MPI up
    failed in MPI's start-up: a crash in native code, or an exit status of MPI's own abort. The statuses
    Python and hpcgraft give (1: an exception, 2: bad input, ...) are the program's, and kept; so is a kill
    (SIGKILL, SIGTERM), which comes from outside."""
    if status < 0:
        return -status in _NATIVE_CRASHES
    return status not in (EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_REQUEUE, EXIT_NO_START)


def _ended(status: int) -> str:
    if status < 0:
        sig = signal.Signals(-status)
        return f"was killed by {sig.name} ({_HINTS.get(sig, 'a crash in native code')})"
    return f"exited with status {status}"


def supervise(argv: Sequence[str]) -> int:
    """Run ``argv`` as this rank's child and return its exit status; a child killed by a signal is
    named on stderr and this process then dies from the same signal. A child that has not started MPI
    within :func:`start_timeout` is ended, and the status is :data:`~hpcgraft.errors.EXIT_NO_START`."""
    try:
        timeout = start_timeout()
    except ValueError as exc:  # the same environment on every rank: each stops, before any work; one says why
        if launcher_rank() in (None, "0"):
            print(f"hpcgraft: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    # Signals that arrive before the child exists are held, then passed on to it.
    hold_stop_signals()
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])  # Ctrl-C too, passed on once the child exists
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)  # close_fds=False keeps the launcher's descriptors (PMI_FD) open too
    life_read, life_write = os.pipe()  # the write end stays in this process only, until it ends
    os.set_inheritable(life_read, True)
    try:
        child = subprocess.Popen(
            list(argv), close_fds=False, preexec_fn=_start_child,
            env={**os.environ, CHILD_MARK: "1", SHM_FD: str(write_fd), LIFE_FD: str(life_read),
                 SUPERVISOR_PID: str(os.getpid())},
        )
    finally:
        os.close(write_fd)
        os.close(life_read)
    for sig in _FORWARDED:
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    for sig in _FATAL:
        signal.signal(sig, lambda s, _f: _die_saying(life_write, s))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    if not _started_in_time(child, read_fd, timeout):
        status = _end_unstarted(child, timeout)
        os.close(read_fd)
        return status
    status = child.wait()
    if not _remove_shared_memory(read_fd) and failed_in_start(status):
        return _unstarted(child, f"{_ended(status)} before MPI's start-up completed: the launcher's wire-up failed")
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
    watch_supervisor()


def train() -> None:
    """The ``hpcgraft-train`` command (``hpcgraft train``'s older name): ``python -m hpcgraft.cli.train``,
    supervised under a launcher.

    The module runs as ``__main__`` (its own guard supervises), so this module never imports the
    training and stays importable before MPI and torch."""
    runpy.run_module("hpcgraft.cli.train", run_name="__main__", alter_sys=True)
