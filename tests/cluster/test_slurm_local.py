"""tools/slurm_local.sh itself: a test cluster on ports of its own (another SLURM on this host holds the
default ones), and a start that fails leaves no daemon behind. Each test starts a cluster of its own, in a
directory of its own, beside the session's (tests/conftest.py ``slurm_cluster``)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._util import ROOT

pytestmark = pytest.mark.slurm

SLURM_LOCAL = str(ROOT / "tools" / "slurm_local.sh")
DEFAULT_PORTS = range(6817, 6822)  # SLURM's two, and the next ones a cluster of two nodes would take after them


@pytest.fixture
def cluster_dir() -> Iterator[Path]:
    """A short path (the munge socket's path must fit a sockaddr) for a cluster that is stopped afterwards."""
    if os.geteuid() != 0 or shutil.which("slurmctld") is None:
        pytest.skip("needs root and SLURM installed (tools/slurm_local.sh start installs it; the session's cluster)")
    path = Path(tempfile.mkdtemp(prefix="hgs-", dir="/tmp"))
    yield path
    subprocess.run(["bash", SLURM_LOCAL, "stop"], env={**os.environ, "HPCGRAFT_SLURM_DIR": str(path)},
                   capture_output=True, timeout=300)
    shutil.rmtree(path, ignore_errors=True)


def _listen(port: int) -> socket.socket | None:
    """A socket listening on ``port`` on every address, as a foreign slurmctld would; None where one already is."""
    s = socket.socket()
    try:
        s.bind(("", port))
    except OSError:
        s.close()
        return None
    s.listen()
    return s


def _daemons_of(cluster: Path) -> list[str]:
    """Command lines of the processes that belong to the cluster in ``cluster`` (its conf, its munge socket)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(cluster).encode() in a for a in args):
            found.append(" ".join(a.decode(errors="replace") for a in args))
    return found


def _start(cluster: Path, **extra: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HPCGRAFT_SLURM_DIR": str(cluster), "HPCGRAFT_SLURM_NODES": "2", **extra}
    return subprocess.run(["bash", SLURM_LOCAL, "start"], capture_output=True, text=True, env=environ, timeout=600)


def test_the_cluster_takes_free_ports_when_the_default_ones_are_in_use(cluster_dir):
    held = [s for s in (_listen(p) for p in DEFAULT_PORTS) if s is not None]
    try:
        r = _start(cluster_dir)
        assert r.returncode == 0, r.stdout + r.stderr
        conf = (cluster_dir / "slurm.conf").read_text()
        ports = [int(p) for p in re.findall(r"(?m)(?:^SlurmctldPort=|^SlurmdPort=| Port=)(\d+)", conf)]
        assert len(ports) == 4 and not set(ports) & set(DEFAULT_PORTS), conf
        job = subprocess.run(["srun", "--nodes=2", "--ntasks=2", "hostname"], capture_output=True, text=True,
                             env={**os.environ, "SLURM_CONF": str(cluster_dir / "slurm.conf")}, timeout=300)
        assert job.returncode == 0 and len(job.stdout.split()) == 2, job.stderr
    finally:
        for s in held:
            s.close()


def test_a_start_that_fails_leaves_no_daemon_running(cluster_dir):
    """The second node's port is taken between the choice (HPCGRAFT_SLURM_PORT) and its slurmd's start:
    munged, slurmctld and the first slurmd have started by then, and must be stopped."""
    base = next(p for p in range(7100, 9000, 10) if all(_listen_free(p + i) for i in range(3)))
    held = _listen(base + 2)
    assert held is not None
    try:
        r = _start(cluster_dir, HPCGRAFT_SLURM_PORT=str(base))
    finally:
        held.close()
    assert r.returncode != 0, r.stdout
    assert "slurm_local: start failed; stopping the daemons it started" in r.stderr, r.stderr
    assert "Address already in use" in r.stderr, r.stderr  # the slurmd's log, shown
    assert "Running as primary controller" in r.stderr, r.stderr  # slurmctld had started
    assert _daemons_of(cluster_dir) == []


def _listen_free(port: int) -> bool:
    s = _listen(port)
    if s is None:
        return False
    s.close()
    return True
