"""Helpers for tests that start real processes (mpirun ranks, the training command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MPIRUN = str(BIN / "mpirun")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PATH"] = str(BIN) + os.pathsep + e.get("PATH", "")
    # The sbatch scripts run the tests' interpreter, also from a checkout without its own .venv (a worktree).
    e.setdefault("HPCGRAFT_PYTHON", sys.executable)
    # A rank whose MPI start-up hangs (SLURM's pmi2 wire-up now and then, under load) is ended in 2 minutes, not
    # the default 10, so that the sbatch scripts' new start of the step fits the tests' waits.
    e.setdefault("HPCGRAFT_START_TIMEOUT", "120")
    return e


def mpirun(np: int, *args: str, timeout: float = 300, cwd: Path | None = None,
           environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``mpirun -np N python ARGS...`` with the test interpreter; output captured as text. ``environ``:
    the processes' whole environment (default: :func:`env`, from this process's)."""
    cmd = [MPIRUN, "-np", str(np), sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environ or env(),
                          cwd=cwd or ROOT)


def train(np: int, out: Path, *overrides: str, config: str = "configs/digits.yaml", restart: bool = False,
          timeout: float = 300, environ: dict[str, str] | None = None,
          command: tuple[str, ...] = ("-m", "hpcgraft.train")) -> subprocess.CompletedProcess:
    """The training command (``command``: its Python arguments, e.g. ``-m hpcgraft train``) on ``np`` ranks."""
    args = [*command, *(["--restart"] if restart else []), "--config", str(ROOT / config), "--out", str(out),
            *overrides]
    if np == 0:  # a plain process, no mpirun
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                              env=environ or env(), cwd=ROOT)
    return mpirun(np, *args, timeout=timeout, environ=environ)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
