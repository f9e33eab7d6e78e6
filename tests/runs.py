"""The end-to-end runs: a declarative table of real trainings on the digits data (``mpirun`` ranks).

Each run is executed at most once per test session and its directory and output are shared by every
assertion that needs it (fixture ``e2e_run("name")`` in tests/conftest.py). A test that has to change a
run (damage it, report into it) copies it first. While the first tests run, a background thread runs the
table ahead of need, one run at a time, so that a 2-core machine is busy while tests wait on single
processes; a run a test asks for before the thread reached it runs in the test's own thread instead.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests._util import ROOT, env, jsonl, mpirun, train

# Every run: no progress bar, one thread per rank (2 cores; the numbers do not depend on it).
QUIET = ("log.progress=off", "dist.threads=1")
TWO_EPOCHS = ("train.epochs=2", *QUIET)
ONE_EPOCH = ("train.epochs=1", "checkpoint.enabled=false", *QUIET)  # the method's options, short
ROUNDS = ("graft.interval_steps=10",)  # two graft rounds in a 22-step epoch
EB_BN = ("train.epochs=4", *QUIET, "graft.mode=peers", "prune.monitor=bn", "prune.bn_l1=1e-4", "prune.window=3",
         "prune.threshold=0.15")  # early-bird monitors, short windows (tests/e2e/test_earlybird_e2e.py)
EB_SPLINE = ("train.epochs=4", *QUIET, "graft.mode=none", "prune.monitor=spline", "prune.spline_grid=20",
             "prune.spline_lookback=2")
HYBRID = ("train.epochs=3", "log.progress=off", "dist.replicas=2", "graft.interval_steps=10")


@dataclass(frozen=True)
class RunSpec:
    ranks: int  # 0: one plain process, no mpirun
    overrides: tuple[str, ...]
    without_horovod: bool = False  # ranks where `import horovod` fails, as on a machine without it
    env: dict[str, str] = field(default_factory=dict)  # e.g. HPCGRAFT_INJECT: a fault at an exact step
    status: int | None = 0  # the exit status the run must end with; None: any failure (not 0)


RUNS: dict[str, RunSpec] = {
    # 1 epoch, no checkpoints: the method's options (tests/e2e/test_method.py)
    "cultivate_only": RunSpec(2, (*ONE_EPOCH, "graft.mode=none", "cultivate.lambda=1")),
    "solo_1ep": RunSpec(0, (*ONE_EPOCH, "graft.mode=none")),
    "filter_cultivated": RunSpec(2, (*ONE_EPOCH, "graft.level=filter", "cultivate.lambda=1", *ROUNDS)),
    "noise": RunSpec(2, (*ONE_EPOCH, "graft.mode=noise", *ROUNDS), without_horovod=True),
    "self_filter": RunSpec(2, (*ONE_EPOCH, "graft.mode=self", "graft.level=filter", *ROUNDS)),
    "allreduce3_dlr": RunSpec(3, (*ONE_EPOCH, "graft.topology=allreduce", "train.dlr=true", *ROUNDS)),
    "ring4": RunSpec(4, (*ONE_EPOCH, *ROUNDS)),  # 4 ranks on 2 cores: oversubscribed, kept short
    # 2 epochs, with checkpoints: the references of the resume tests, the reports, the command's outputs
    "base2": RunSpec(2, (*TWO_EPOCHS, "graft.mode=none")),
    "stepwise2": RunSpec(2, (*TWO_EPOCHS, "graft.interval_steps=10")),  # four graft points: the heat map
    "stepwise3": RunSpec(3, (*TWO_EPOCHS, "graft.mode=peers", "graft.interval_steps=10")),
    "graft2": RunSpec(2, (*TWO_EPOCHS, "graft.mode=peers")),
    # same seed: the same numbers; also watched (log.progress=auto off a terminal: plain progress lines)
    "graft2_again": RunSpec(2, ("train.epochs=2", "dist.threads=1", "graft.mode=peers", "log.every_s=0.05")),
    "base_solo": RunSpec(0, (*TWO_EPOCHS, "graft.mode=none")),  # peer 0 alone trains as in base2
    # faults at exact steps (HPCGRAFT_INJECT, hpcgraft/training/faults.py): tests/e2e/test_resume.py
    "stepwise3_stopped": RunSpec(3, (*TWO_EPOCHS, "graft.mode=peers", "graft.interval_steps=10"),
                                 env={"HPCGRAFT_INJECT": "2:21:usr1"}, status=75),  # stops after step 22
    "base2_stopped": RunSpec(2, (*TWO_EPOCHS, "graft.mode=none"),
                             env={"HPCGRAFT_INJECT": "1:32:term"}, status=75),  # stops after step 33
    "nan_skipped": RunSpec(2, ("train.epochs=3", *QUIET, "graft.mode=peers", "checkpoint.keep=1"),
                           env={"HPCGRAFT_INJECT": "1:30:nan"}),
    "nan_stop": RunSpec(2, (*TWO_EPOCHS, "graft.mode=peers", "graft.on_nonfinite=stop", "graft.interval_steps=5"),
                        env={"HPCGRAFT_INJECT": "1:3:nan"}, status=1),
    "watchdog": RunSpec(2, (*TWO_EPOCHS, "graft.mode=peers", "dist.watchdog_s=5"),
                        env={"HPCGRAFT_INJECT": "1:3:sleep"}, status=None),
    # log.tensorboard=true; rank 1 fails in epoch 4, after epoch 3 was logged but only epoch 2 checkpointed
    # (checkpoint.interval=2): tests/e2e/test_tracking.py resumes it
    "tracked_killed": RunSpec(2, ("train.epochs=4", *QUIET, "graft.interval_steps=10", "checkpoint.interval=2",
                                  "log.tensorboard=true"), env={"HPCGRAFT_INJECT": "1:70:raise"}, status=1),
    # early-bird monitors, and the same runs stopped mid-epoch 3 (after step 51) to resume
    "eb_bn": RunSpec(2, EB_BN),
    "eb_bn_stopped": RunSpec(2, EB_BN, env={"HPCGRAFT_INJECT": "1:50:usr1"}, status=75),
    "eb_spline": RunSpec(2, EB_SPLINE),
    "eb_spline_stopped": RunSpec(2, EB_SPLINE, env={"HPCGRAFT_INJECT": "0:50:usr1"}, status=75),
    # DGConv (1 epoch, one checkpoint): every command reads its run (tests/e2e/test_run_reader.py)
    "dgconv_1ep": RunSpec(2, ("train.epochs=1", *QUIET, "model.dgconv=true")),
    # K=4 peers on 2 ranks, 3 epochs of 11 steps: what the two-node SLURM job that loses a node must end as
    # (tests/cluster/test_slurm_elastic.py)
    "peers4_3ep": RunSpec(2, ("graft.peers=4", "train.epochs=3", "data.batch_size=128", "graft.interval_steps=4",
                              *QUIET)),
    # 2 peers x 2 replicas (Horovod); the loop compares the replicas after every step, buffer sync and graft
    "hybrid": RunSpec(4, HYBRID, env={"HPCGRAFT_CHECK_REPLICAS": "1"}),
}
# Made ahead, in the order the tests first need them (tests/e2e, alphabetically); "hybrid" is for
# tests/cluster. The runs with faults are made when asked for: beside the resume tests' own runs, more
# ranks than cores spin in MPI and the whole suite got slower, not faster.
E2E_RUNS = ["cultivate_only", "solo_1ep", "filter_cultivated", "noise", "self_filter", "allreduce3_dlr", "ring4",
            "base2", "stepwise2", "stepwise3", "graft2", "graft2_again", "base_solo", "eb_bn", "eb_spline",
            "dgconv_1ep"]

# The ranks' program for `without_horovod`: Horovod cannot be imported, and must not be for R = 1.
NO_HOROVOD = ("import sys; sys.modules['horovod'] = None; from hpcgraft.cli.train import main; "
              "rc = main(sys.argv[1:]); assert 'horovod.torch' not in sys.modules; sys.exit(rc)")
# Variables the tests set around their own runs (fault injection, replica checks): never inherited.
TEST_VARIABLES = ("HPCGRAFT_INJECT", "HPCGRAFT_CHECK_REPLICAS")


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


class RunCache:
    """Each run of :data:`RUNS` once: on demand, or ahead of need in one background thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Taken once, here: the background thread must not see what a test sets around its own runs.
        self.environ = {k: v for k, v in env().items() if k not in TEST_VARIABLES}
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def prefetch(self, names: list[str]) -> None:
        """Queue ``names`` for the background thread (those not started or done yet)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="e2e-runs")
            for name in names:
                if name not in self._futures:
                    self._futures[name] = self._pool.submit(self._launch, name)

    def get(self, name: str) -> RunResult:
        """The finished run ``name``; it must have ended with status 0."""
        with self._lock:
            future = self._futures.get(name)
            mine = future is None or future.cancel()  # not started in the background: run it here
            if mine:
                future = self._futures[name] = Future()
        if mine:
            try:
                future.set_result(self._launch(name))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the run
                future.set_exception(exc)
        result = future.result()
        want, got = result.spec.status, result.proc.returncode
        assert got == want if want is not None else got != 0, f"run {name} ended {got}:\n{result.proc.stderr[-3000:]}"
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def _launch(self, name: str) -> RunResult:
        spec = RUNS[name]
        out = self.root / name / "run"
        out.parent.mkdir(parents=True)
        environ = {**self.environ, **spec.env}
        if spec.without_horovod:
            proc = mpirun(spec.ranks, "-c", NO_HOROVOD, "--config", str(ROOT / "configs/digits.yaml"), "--out",
                          str(out), *spec.overrides, environ=environ)
        else:
            proc = train(spec.ranks, out, *spec.overrides, environ=environ, timeout=120 if spec.status is None else 300)
        return RunResult(out, proc, spec)


def horovod_installed() -> bool:
    """Without importing it (that loads its MPI library into this process)."""
    return importlib.util.find_spec("horovod") is not None
