"""The end-to-end runs: a declarative table of real ``mpirun`` trainings on the digits data.

Each run is executed at most once per test session, the first time a test asks for it
(``e2e_run("name")``), and its directory and output are shared by every assertion that needs the same
run. A test that has to change a run (stop it, damage it, resume it) copies the directory first.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests._util import jsonl, train

# Every run: no progress bar, one thread per rank (2 cores; the numbers do not depend on it).
QUIET = ("log.progress=off", "dist.threads=1")
TWO_EPOCHS = ("train.epochs=2", *QUIET)
ONE_EPOCH = ("train.epochs=1", "checkpoint.enabled=false", *QUIET)  # the method's options, short
ROUNDS = ("graft.interval_steps=10",)  # two graft rounds in a 22-step epoch


@dataclass(frozen=True)
class RunSpec:
    ranks: int  # 0: one plain process, no mpirun
    overrides: tuple[str, ...]
    without_horovod: bool = False  # ranks where `import horovod` fails, as on a machine without it
    env: dict[str, str] = field(default_factory=dict)


RUNS: dict[str, RunSpec] = {
    # 2 epochs, with checkpoints: the references of the resume tests, the reports, the CLI checks
    "graft2": RunSpec(2, (*TWO_EPOCHS, "graft.mode=peers")),
    "graft2_again": RunSpec(2, (*TWO_EPOCHS, "graft.mode=peers")),  # same seed: the same numbers
    "base2": RunSpec(2, (*TWO_EPOCHS, "graft.mode=none")),
    "base_solo": RunSpec(0, (*TWO_EPOCHS, "graft.mode=none")),  # peer 0 alone trains as in base2
    "base3": RunSpec(3, (*TWO_EPOCHS, "graft.mode=none")),
    "stepwise3": RunSpec(3, (*TWO_EPOCHS, "graft.mode=peers", "graft.interval_steps=10")),
    "stepwise2": RunSpec(2, (*TWO_EPOCHS, "graft.interval_steps=10")),  # four graft points: the heat map
    # 1 epoch, no checkpoints: the method's options
    "cultivate_only": RunSpec(2, (*ONE_EPOCH, "graft.mode=none", "cultivate.lambda=1")),
    "solo_1ep": RunSpec(0, (*ONE_EPOCH, "graft.mode=none")),
    "filter_cultivated": RunSpec(2, (*ONE_EPOCH, "graft.level=filter", "cultivate.lambda=1", *ROUNDS)),
    "noise": RunSpec(2, (*ONE_EPOCH, "graft.mode=noise", *ROUNDS), without_horovod=True),
    "self_filter": RunSpec(2, (*ONE_EPOCH, "graft.mode=self", "graft.level=filter", *ROUNDS)),
    "allreduce3_dlr": RunSpec(3, (*ONE_EPOCH, "graft.topology=allreduce", "train.dlr=true", *ROUNDS)),
    "ring4": RunSpec(4, (*ONE_EPOCH, *ROUNDS)),  # 4 ranks on 2 cores: oversubscribed, kept short
}

# The ranks' program for `without_horovod`: Horovod cannot be imported, and must not be for R = 1.
NO_HOROVOD = ("import sys; sys.modules['horovod'] = None; from hpcgraft.train import main; "
              "rc = main(sys.argv[1:]); assert 'horovod.torch' not in sys.modules; sys.exit(rc)")


@dataclass
class RunResult:
    out: Path
    proc: subprocess.CompletedProcess
    spec: RunSpec

    def metrics(self) -> list[dict]:
        return jsonl(self.out / "metrics.jsonl")

    def grafts(self) -> list[dict]:
        path = self.out / "graft.jsonl"
        return jsonl(path) if path.exists() else []

    def copy(self, dest: Path) -> Path:
        """A private copy of the run directory, for a test that changes it."""
        shutil.copytree(self.out, dest)
        return dest


def launch(spec: RunSpec, out: Path) -> subprocess.CompletedProcess:
    if spec.without_horovod:
        from tests._util import ROOT, mpirun

        return mpirun(spec.ranks, "-c", NO_HOROVOD, "--config", str(ROOT / "configs/digits.yaml"), "--out", str(out),
                      *spec.overrides)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in spec.env.items():
            mp.setenv(key, value)
        return train(spec.ranks, out, *spec.overrides)


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], RunResult]:
    """``e2e_run(name)``: the finished run ``RUNS[name]``, executed on first use and then shared."""
    done: dict[str, RunResult] = {}

    def get(name: str) -> RunResult:
        if name not in done:
            spec = RUNS[name]
            out = tmp_path_factory.mktemp(f"e2e-{name}") / "run"
            proc = launch(spec, out)
            assert proc.returncode == 0, f"run {name} failed:\n{proc.stderr[-3000:]}"
            done[name] = RunResult(out, proc, spec)
        return done[name]

    return get
