"""Shared fixtures: the end-to-end runs (tests/runs.py) and the local SLURM cluster (tools/slurm_local.sh,
two nodes on this host) for tests marked ``slurm``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import CodeType

import pytest

from tests.runs import E2E_RUNS, RunCache, RunResult, horovod_installed

ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = ROOT / "tools" / "slurm_local.sh"


def _slurm_local(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM_LOCAL), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    """A running SLURM cluster; yields its slurm.conf and exports SLURM_CONF for the session.

    Reuses a cluster that is already up (and leaves it up); starts one otherwise, of two nodes on this host
    (HPCGRAFT_SLURM_NODES, default 2 here), installing slurm-wlm and munge with apt-get when needed, and
    stops it at the end. Skips only where SLURM cannot run here. Tests that need two nodes skip on a
    reused one-node cluster.
    """
    env = dict(os.environ)
    env.setdefault("HPCGRAFT_SLURM_NODES", "2")
    conf = Path(env.get("HPCGRAFT_SLURM_DIR", "/tmp/hpcgraft-slurm")) / "slurm.conf"
    started = False
    if _slurm_local("status", env=env).returncode != 0:
        if os.geteuid() != 0:
            pytest.skip("the local SLURM cluster needs root (tools/slurm_local.sh start installs and runs slurmd)")
        if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
            pytest.skip("SLURM is not installed and there is no apt-get to install slurm-wlm and munge")
        r = _slurm_local("start", env=env)
        assert r.returncode == 0, f"tools/slurm_local.sh start failed:\n{r.stdout}\n{r.stderr}"
        started = True
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield conf
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if started:
            _slurm_local("stop", env=env)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """In-process tests run small tensors, for which a second thread costs more than it brings (and far
    more on a loaded machine); ranks started by the tests choose their own threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def stop_signals_kept() -> Iterator[None]:
    """For tests that call the training command's main in process: it records SIGUSR1/SIGTERM, and the test
    process gets its own handlers back afterwards."""
    from hpcgraft.comm import failure

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    failure._stop_signal = None  # a signal recorded by an earlier in-process run is not this test's
    yield
    failure._stop_signal = None
    for sig, handler in before.items():
        signal.signal(sig, handler)


NEEDED: set[str] = set()  # strings in the selected tests that use e2e_run: the names of the runs they need


def pytest_collection_finish(session: pytest.Session) -> None:
    """After -m and -k chose the tests: the runs they (or their fixtures) name, so that a session of one
    file, or make test without the slow tier, makes only those ahead of need."""
    for item in session.items:
        if not isinstance(item, pytest.Function) or "e2e_run" not in item._fixtureinfo.names_closure:
            continue
        defs = item._fixtureinfo.name2fixturedefs.values()  # the tests' own fixtures; this module's name every run
        fixtures = [d.func for fixturedefs in defs for d in fixturedefs if d.func.__module__ != __name__]
        for fn in [item.function, *fixtures]:
            NEEDED.update(_strings(getattr(fn, "__code__", None), getattr(fn, "__globals__", {})))
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            NEEDED.update(v for v in callspec.params.values() if isinstance(v, str))


def _strings(code: CodeType | None, names: dict) -> Iterator[str]:
    """The string constants of a function (and of the functions inside it) and the module-level strings it
    reads by name (GRAFTING = "graft2")."""
    if code is None:
        return
    for const in code.co_consts:
        if isinstance(const, str):
            yield const
        elif isinstance(const, CodeType):
            yield from _strings(const, names)
    yield from (names[n] for n in code.co_names if isinstance(names.get(n), str))


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every MPI process this session starts appends the /dev/shm/mpich_shm_* files it mapped to one log
    (HPCGRAFT_SHM_LOG, inherited through the environment); at the end none of them may still exist,
    however its job ended. Only this session's files are checked: other jobs on the machine make them too."""
    from hpcgraft.supervise import SHM_LOG, shared_memory_files

    log = tmp_path_factory.mktemp("shm") / "segments.txt"
    log.touch()
    before = os.environ.get(SHM_LOG)
    os.environ[SHM_LOG] = str(log)
    yield log
    if before is None:
        del os.environ[SHM_LOG]
    else:
        os.environ[SHM_LOG] = before
    # In-process tests initialise MPI in this very process, which finalises (and removes its file) at exit.
    left = sorted({p for p in log.read_text().split() if os.path.exists(p)} - set(shared_memory_files()))
    assert not left, f"jobs of this test session left shared memory behind: {left}"


@pytest.fixture(scope="session")
def run_cache(tmp_path_factory: pytest.TempPathFactory, no_shared_memory_left: Path) -> Iterator[RunCache]:
    cache = RunCache(tmp_path_factory.mktemp("runs"))
    yield cache
    cache.close()


@pytest.fixture(scope="session", autouse=True)
def _runs_ahead(run_cache: RunCache) -> None:
    """From the first test on, the runs the selected tests need are made in the background."""
    ahead = [name for name in E2E_RUNS if name in NEEDED]
    if "hybrid" in NEEDED and horovod_installed():
        ahead.append("hybrid")
    run_cache.prefetch(ahead)


@pytest.fixture(scope="session")
def e2e_run(run_cache: RunCache) -> Callable[[str], RunResult]:
    """``e2e_run(name)``: the finished run ``RUNS[name]`` of tests/runs.py, made once and shared."""
    return run_cache.get
