"""kill -9 of a rank's supervisor, or of mpiexec itself: the job leaves no MPICH shared memory behind, the
rank that outlives its supervisor names what died, and status.json no longer says "running"
(hpcgraft.supervise). Real mpirun jobs of two ranks, long enough to be killed while they train."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcgraft.supervise import SHM_LOG
from tests._util import MPIRUN, ROOT, env

HOST = os.uname().nodename


def _start(out: Path, shm_log: Path) -> subprocess.Popen:
    """Two ranks training for far longer than the test waits; output in files beside the run directory."""
    cmd = [MPIRUN, "-np", "2", sys.executable, "-m", "hpcgraft.train", "--config", str(ROOT / "configs/digits.yaml"),
           "--out", str(out), "train.epochs=200", "log.progress=off"]
    with open(f"{out}.stdout", "w") as o, open(f"{out}.stderr", "w") as e:
        return subprocess.Popen(cmd, stdout=o, stderr=e, env={**env(), SHM_LOG: str(shm_log)}, cwd=ROOT,
                                start_new_session=True)


def _wait(what: str, ready, job: subprocess.Popen | None = None, timeout: float = 300):
    """Poll until ``ready()`` is truthy (and ``job`` still runs); a generous hang guard, not a speed requirement."""
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        assert job is None or job.poll() is None, Path(f"{job.args[job.args.index('--out') + 1]}.stderr").read_text()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def _status(out: Path) -> dict:
    try:
        return json.loads((out / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _training(job: subprocess.Popen, out: Path, shm_log: Path) -> tuple[dict[str, int], list[str]]:
    """Once the job has finished an epoch: its ranks' pids and the shared-memory files they mapped."""
    _wait("the first epoch", lambda: _status(out).get("state") == "running", job)
    text = Path(f"{out}.stderr").read_text()
    line = text.split("hpcgraft: rank pids:")[1].split("\n")[0]
    pids = {int(r): int(p) for r, p in re.findall(r"(\d+)=(\d+)@", line)}
    segments = sorted(set(shm_log.read_text().split()))
    assert segments and all(os.path.exists(s) for s in segments), segments
    return pids, segments


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def _ended(job: subprocess.Popen, pids: dict[int, int], segments: list[str], session_log: Path) -> None:
    """Wait until the job's ranks have ended and removed their segments (mpiexec stays unreaped until then, so
    that they can see how it ended). The segments also go to the session's log, whose check sees them too."""
    try:
        _wait("the ranks to end", lambda: all(_gone(p) for p in pids.values()), timeout=120)
        _wait("no shared memory left", lambda: not any(os.path.exists(s) for s in segments), timeout=60)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        with session_log.open("a") as f:
            f.write("".join(s + "\n" for s in segments))


@pytest.fixture
def shm_log(tmp_path: Path) -> Path:
    log = tmp_path / "segments.txt"
    log.touch()
    return log


def test_kill_9_of_a_ranks_supervisor_leaves_no_shared_memory_and_names_it(tmp_path, shm_log, no_shared_memory_left):
    out = tmp_path / "run"
    job = _start(out, shm_log)
    pids, segments = _training(job, out, shm_log)
    supervisor = _parent(pids[1])
    os.kill(supervisor, signal.SIGKILL)
    _ended(job, pids, segments, no_shared_memory_left)
    err = Path(f"{out}.stderr").read_text()
    assert job.returncode != 0
    named = [line for line in err.splitlines() if line.startswith("hpcgraft: rank 1's supervisor")]
    assert named == [f"hpcgraft: rank 1's supervisor (pid {supervisor} on {HOST}) died (SIGKILL); rank 1 "
                     f"(pid {pids[1]}) removed its shared memory and stops"], err
    status = _status(out)
    assert status["state"] == "failed" and status["epoch"] >= 1, status
    # Rank 0 writes status.json; it saw its own supervisor go (the launcher's clean-up of the failed job).
    assert re.match(rf"rank [01]'s supervisor \(pid \d+ on {re.escape(HOST)}\) died \(SIGKILL\); re-run the same "
                    "command to resume", status["reason"]), status


def test_kill_9_of_mpiexec_leaves_no_shared_memory_and_status_names_it(tmp_path, shm_log, no_shared_memory_left):
    """With mpiexec gone nobody reads the ranks' output any more: status.json is the record."""
    out = tmp_path / "run"
    job = _start(out, shm_log)
    pids, segments = _training(job, out, shm_log)
    os.kill(job.pid, signal.SIGKILL)
    _ended(job, pids, segments, no_shared_memory_left)
    status = _status(out)
    assert status["state"] == "failed", status
    assert status["reason"].startswith(f"{Path(MPIRUN).name} (pid {job.pid} on {HOST}) died (SIGKILL); "), status
