"""The fast tier's rule, enforced: a test under tests/unit runs in this process alone. It starts no other
process (subprocess, mpirun, fork, DataLoader workers) and does not import ``mpi4py.MPI`` (which initialises
MPI), unless it is marked ``process`` (or ``slow``); ``make test-fast`` leaves the marked ones out and so stays
under a minute. Checked at every collection of a test module and around every unmarked test's setup, call and
teardown, so that the rule cannot rot: a test that breaks it fails in ``make test`` too.

The import of ``mpi4py.MPI`` can only be seen the first time it happens in a session: in ``make test`` an earlier
marked test may have imported it already; ``make test-fast`` sees every one.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import threading
from collections.abc import Iterator

import pytest

EXEMPT = ("process", "slow")  # the markers that take a test out of the fast tier
PROCESS_EVENTS = {  # audit events (sys.addaudithook) that start or become another process
    "subprocess.Popen": "starts a subprocess",
    "os.system": "starts a shell (os.system)",
    "os.posix_spawn": "spawns a process (os.posix_spawn)",
    "os.spawn": "spawns a process (os.spawn*)",
    "os.fork": "forks (os.fork: multiprocessing, DataLoader workers)",
    "os.forkpty": "forks (os.forkpty)",
    "os.exec": "replaces the process (os.exec*)",
}
MPI_MODULE = "mpi4py.MPI"


class FastTierError(Exception):
    """What a guarded test gets at the call that breaks the rule."""


class _Guard:
    """Which test (or test module being collected) is guarded now, and what it did that breaks the rule."""

    def __init__(self) -> None:
        self.where: str | None = None
        self.broken: list[str] = []

    def audit(self, event: str, args: tuple) -> None:
        if self.where is None or threading.current_thread() is not threading.main_thread():
            return  # unguarded; or the end-to-end runs made ahead of need in a background thread
        if event in PROCESS_EVENTS:
            what = PROCESS_EVENTS[event]
        elif event == "import" and args[0] == MPI_MODULE:
            what = "imports mpi4py.MPI (initialises MPI)"
        else:
            return
        self.broken.append(what)
        raise FastTierError(f"{self.where} {what}: {fix()}")


def fix() -> str:
    return ("tests/unit is the fast tier (make test-fast: no other process, no MPI); mark the test "
            "@pytest.mark.process, or move it to tests/e2e")


# Asked once per interpreter by h5py's import, through `uname -p`: not a test's doing, so asked before the guard.
platform.processor()
_GUARD = _Guard()
sys.addaudithook(_GUARD.audit)  # hooks cannot be removed; the guard is off whenever ``where`` is None


@contextlib.contextmanager
def _guarded(where: str) -> Iterator[None]:
    _GUARD.where, _GUARD.broken = where, []
    try:
        yield
    finally:
        _GUARD.where = None


def _exempt(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(name) for name in EXEMPT)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[pytest.CollectReport]:
    """A test module that starts a process or MPI as it is imported breaks every test in it."""
    if not isinstance(collector, pytest.Module):
        return (yield)
    with _guarded(f"importing {collector.nodeid}"):
        report = yield
    if _GUARD.broken and report.passed:  # the module caught the error itself
        report.outcome, report.longrepr = "failed", f"importing {collector.nodeid} {_GUARD.broken[0]}: {fix()}"
    return report


def _phase(item: pytest.Item) -> Iterator[None]:
    """Setup, call and teardown of an unmarked test, guarded; one clear failure if it broke the rule, also
    where the test caught the error or failed on something else because of it."""
    if _exempt(item):
        return (yield)
    with _guarded(item.nodeid):
        try:
            result = yield
        except Exception:
            if not _GUARD.broken:
                raise
            result = None
    if _GUARD.broken:
        pytest.fail(f"{item.nodeid} {_GUARD.broken[0]}: {fix()}", pytrace=False)
    return result


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_phase)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_phase)
pytest_runtest_teardown = pytest.hookimpl(wrapper=True)(_phase)
