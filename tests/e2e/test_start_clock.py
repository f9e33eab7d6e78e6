"""The start-up clock of a rank's supervisor (hpcgraft.supervise): a rank that has not started MPI in time
is ended, with whatever it started, one line naming it and exit status 69; one that has started is never
touched by it. Real processes: the supervisor as a launcher starts it, and real mpirun jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcgraft.errors import EXIT_NO_START, EXIT_USAGE
from hpcgraft.supervise import START_TIMEOUT
from tests._util import ROOT, env, train

pytestmark = pytest.mark.process


def _supervised(child: str, timeout: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``child`` (Python code) run by a supervisor, as rank 3 of a launcher would be."""
    code = ("import sys; from hpcgraft.supervise import supervise; "
            f"sys.exit(supervise([sys.executable, '-c', {child!r}]))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=env() | {"PMI_RANK": "3", START_TIMEOUT: timeout})


def test_a_rank_that_never_starts_mpi_is_ended_with_what_it_started(tmp_path):
    # The rank starts a process of its own (MPI's helpers would be such), then hangs as in a stuck MPI_Init.
    child = ("import subprocess, sys, time;"
             " p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
             " open('grandchild', 'w').write(str(p.pid)); time.sleep(600)")
    start = time.monotonic()
    r = _supervised(child, "2", tmp_path)
    assert r.returncode == EXIT_NO_START, r.stderr
    assert time.monotonic() - start < 60  # not the child's 600 s
    assert r.stderr.startswith("hpcgraft: rank 3 (pid ") and r.stderr.count("\n") == 1, r.stderr
    assert "did not get through MPI's start-up within 2 s (HPCGRAFT_START_TIMEOUT)" in r.stderr
    grandchild = int((tmp_path / "grandchild").read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and "Z" not in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the rank's own process outlived it"
        time.sleep(0.05)


def test_a_rank_that_said_mpi_is_up_is_not_timed(tmp_path):
    child = ("import os, time; os.write(int(os.environ['HPCGRAFT_SHM_FD']), b'started\\n');"
             " time.sleep(3); raise SystemExit(7)")
    r = _supervised(child, "1", tmp_path)
    assert (r.returncode, r.stderr) == (7, "")


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_a_bad_start_timeout_is_one_line_and_exit_2(tmp_path, value):
    r = subprocess.run([sys.executable, "-c", "import sys; from hpcgraft.supervise import supervise; "
                        "sys.exit(supervise(['true']))"], capture_output=True, text=True, timeout=60,
                       env=env() | {"PMI_RANK": "0", START_TIMEOUT: value})
    assert r.returncode == EXIT_USAGE
    assert r.stderr == (f"hpcgraft: error: {START_TIMEOUT}={value} is not a number of seconds; set it to the time "
                        "a rank may take to start MPI (default 600, 0: no limit)\n")


def test_training_ranks_that_cannot_start_in_time_train_nothing_and_exit_69(tmp_path):
    """Under mpirun, no rank gets through its imports and MPI's start-up in 10 ms: the first one ended says
    so (mpiexec then kills the other, which may not get to say it); the run directory is never made."""
    r = train(2, tmp_path / "run", "train.epochs=1", environ=env() | {START_TIMEOUT: "0.01"})
    assert r.returncode == EXIT_NO_START, r.stderr
    lines = [line for line in r.stderr.splitlines() if "did not get through MPI's start-up" in line]
    assert lines and {line.split(" (pid")[0] for line in lines} <= {"hpcgraft: rank 0", "hpcgraft: rank 1"}, r.stderr
    assert not (tmp_path / "run").exists()
    assert not os.path.exists(ROOT / "runs" / "run")


@pytest.mark.parametrize(("child", "how"), [
    ("import os; os.abort()", "was killed by SIGABRT (an abort in native code)"),
    ("raise SystemExit(15)", "exited with status 15"),
])
def test_a_rank_that_crashes_before_mpi_is_up_exits_69(tmp_path, child, how):
    """The rank whose wire-up failed first aborts in MPI_Init (SIGABRT, or MPICH's own abort status) while the
    others hang: its status must say "start again" too, or the step's (the highest) reads as a crash."""
    r = _supervised(child, "30", tmp_path)
    assert r.returncode == EXIT_NO_START, r.stderr
    assert r.stderr.startswith("hpcgraft: rank 3 (pid ") and r.stderr.count("\n") == 1, r.stderr
    assert f"{how} before MPI's start-up completed" in r.stderr


@pytest.mark.parametrize("code", [1, 2])
def test_python_s_own_exit_before_mpi_is_kept(tmp_path, code):
    r = _supervised(f"raise SystemExit({code})", "30", tmp_path)
    assert (r.returncode, r.stderr) == (code, "")


def test_a_rank_that_crashes_after_mpi_is_up_dies_of_the_same_signal(tmp_path):
    child = "import os; os.write(int(os.environ['HPCGRAFT_SHM_FD']), b'started\\n'); os.abort()"
    r = _supervised(child, "30", tmp_path)
    assert r.returncode == -6, r.stderr
    assert "was killed by SIGABRT" in r.stderr and "the job stops" in r.stderr
