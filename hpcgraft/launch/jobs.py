"""A grafting run as a submitit job: to SLURM (one task = one MPI rank) or locally; submitting it, waiting
for it, and its final metrics. The submit command (:mod:`hpcgraft.cli.submit`) is its command line;
``hpcgraft.launch.submit(...)`` is the same from Python.

On SLURM every task supervises one training rank (``python -m hpcgraft.train``, :mod:`hpcgraft.supervise`),
started by ``srun --mpi=pmi2`` (or the site's PMI, ``--srun-mpi``), so the tasks form one MPI world through
SLURM's PMI, exactly like ranks started by mpirun or by the sbatch scripts: a rank killed by a signal is
named, its shared memory removed, and a rank that cannot start MPI in time (``HPCGRAFT_START_TIMEOUT``) is
ended; the job is then requeued, ``HPCGRAFT_START_RETRIES`` times (default 2) at most.
The local executor runs one task that starts ``mpirun -np K``.

Time limits and preemption: SLURM sends SIGUSR1 to every rank ``signal_delay_s`` before the limit. The
training catches it, every rank checkpoints at the same step and the rank returns 75; the task then
hands over to submitit's own requeue handler (the one it installed for SIGUSR1 before the training
replaced it), which calls :meth:`GraftRun.checkpoint` and requeues the job, counting time-outs against
``max_requeues``. The requeued job runs the same call, which resumes from the run directory's last
checkpoint, so no epoch is lost or repeated. submitit's default preemption signal is SIGUSR2; jobs
submitted here are told to use SIGUSR1 (``SUBMITIT_PREEMPT_SIGNAL``), the signal the training stops on.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission, environment_variables

from hpcgraft.config import load_config, resolve_config
from hpcgraft.errors import EXIT_NO_START, EXIT_REQUEUE, LaunchError
from hpcgraft.slurm import SCRIPTS_DIR
from hpcgraft.slurm.check import LAUNCH_OPTIONS, check_node_range, check_slurm_request, parse_nodes
from hpcgraft.storage.run import read_config
from hpcgraft.storage.runlog import METRICS, epoch_table, read_jsonl
from hpcgraft.supervise import should_supervise, start_retries, start_timeout, supervise

PREEMPT_SIGNAL = "USR1"  # what hpcgraft.train checkpoints and stops on (besides SIGTERM)
CLEAN_SHM = SCRIPTS_DIR / "clean_mpich_shm.sh"  # package data: there in an installed package too
EXECUTORS = ("auto", "local", "slurm")


# ------------------------------------------------------------------------------------------ the job
@dataclasses.dataclass
class GraftRun(Checkpointable):
    """The callable submitit runs in every task: one training rank, or (``mpirun_np`` > 0) an mpirun.

    Checkpointable: its state is the run directory, so :meth:`checkpoint` resubmits the same call and
    the training resumes from its own last checkpoint.
    """

    config: str | None
    out: str
    overrides: list[str] = dataclasses.field(default_factory=list)
    restart: bool = False
    mpirun_np: int = 0  # 0: this task is a rank of a world formed by srun; K: start K ranks with mpirun

    def argv(self) -> list[str]:
        """Arguments of ``python -m hpcgraft.train``."""
        args = ["--out", self.out, *(["--config", self.config] if self.config else [])]
        return args + (["--restart"] if self.restart else []) + list(self.overrides)

    def __call__(self) -> int:
        requeue_handler = _submitit_requeue_handler()
        rc = self._run_training()
        if rc == EXIT_REQUEUE or (rc == EXIT_NO_START and _start_retries_left()):
            # Every rank wrote its checkpoint, or none got as far as MPI (nothing was trained). MPI ends
            # cleanly first where this process runs the rank itself: the requeue kills this step, and ranks
            # killed inside MPI leave shared memory that the next start would trip over. Then rank 0 asks
            # submitit to requeue (it calls checkpoint(), requeues and exits); the other ranks leave without
            # a result, as submitit's own do.
            mpi4py = sys.modules.get("mpi4py.MPI")
            if mpi4py is not None and mpi4py.Is_initialized() and not mpi4py.Is_finalized():
                mpi4py.Finalize()
            if callable(requeue_handler):
                signal.signal(signal.SIGUSR1, requeue_handler)
                requeue_handler(signal.SIGUSR1, None)
            sys.exit(EXIT_REQUEUE)
        if rc != 0:
            raise RuntimeError(f"hpcgraft.train exited with status {rc}; the reason is in this task's stderr")
        return rc

    def _run_training(self) -> int:
        if not self.mpirun_np:
            if should_supervise():
                return supervise([sys.executable, "-m", "hpcgraft.train", *self.argv()])
            from hpcgraft.training.entry import train_rank

            return train_rank(self.config, self.overrides, self.out, restart=self.restart)
        proc = subprocess.Popen(mpirun_command(self.mpirun_np, self.argv()))
        # mpirun passes USR1/TERM on to the ranks, which checkpoint and exit 75.
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
        return proc.wait()

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """The same call without ``--restart``: the run directory holds everything needed to resume."""
        return DelayedSubmission(dataclasses.replace(self, restart=False), *args, **kwargs)


def _start_retries_left() -> bool:
    """Whether a job whose ranks could not start MPI may be requeued once more (``HPCGRAFT_START_RETRIES``,
    default 2, against the job's restarts so far)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) < start_retries()  # checked at submit


def mpirun_command(ranks: int, train_argv: Sequence[str]) -> list[str]:
    """``mpirun -np RANKS python -m hpcgraft.train ARGV`` with this interpreter and its environment's mpirun."""
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None:
        raise LaunchError("mpirun not found next to this python or on PATH; install the mpich wheel (make setup)")
    return [mpirun, "-np", str(ranks), sys.executable, "-m", "hpcgraft.train", *train_argv]


def _submitit_requeue_handler() -> Any:
    """submitit's handler for its preemption signal, which must be the training's SIGUSR1."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None  # called directly, not by submitit
    from submitit import JobEnvironment

    if JobEnvironment.USR_SIG != PREEMPT_SIGNAL:
        raise LaunchError(f"submitit's preemption signal is SIG{JobEnvironment.USR_SIG}, but hpcgraft.train "
                          f"checkpoints on SIGUSR1; submit with hpcgraft.launch or set SUBMITIT_PREEMPT_SIGNAL=USR1")
    return signal.getsignal(signal.SIGUSR1)


# ------------------------------------------------------------------------------------------ submission
def submit(config: str | None, out: str | Path, overrides: Sequence[str] = (), *, nodes: int | str = 1,
           gpus_per_node: int = 0, tasks_per_node: int | None = None, cpus_per_task: int = 1,
           partition: str | None = None, account: str | None = None, time_min: int = 60,
           executor: str = "auto", logs: str | Path | None = None, restart: bool = False,
           signal_delay_s: int = 120, max_requeues: int = 20, srun_mpi: str = "pmi2") -> submitit.Job:
    """Submit one grafting run: ``nodes`` x ranks per node, one rank per GPU (or ``tasks_per_node`` CPU
    ranks with ``gpus_per_node=0``). Returns the submitit Job (``job.job_id``, ``job.paths.stdout``,
    one sub-job per task); :func:`wait` waits for it. ``nodes`` may be ``"MIN-MAX"``: SLURM starts the job on
    as many nodes of the range as it can at once, and ``graft.peers`` must fit every node count in it.

    The config and overrides are checked here, and on SLURM the request against the partition, so that a
    mistake costs seconds rather than a queue wait. ``max_requeues`` bounds the time-outs submitit
    requeues (preemptions do not count); ``signal_delay_s`` is how long before the time limit the ranks
    are told to checkpoint.
    """
    if executor not in EXECUTORS:
        raise LaunchError(f"executor '{executor}' is not one of {', '.join(EXECUTORS)}")
    cfg = load_config(config, list(overrides))  # raises ConfigError naming the bad key
    try:  # the job's ranks read them, from the environment submitit copies from this one
        start_timeout(), start_retries()
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    config = config and str(resolve_config(config).absolute())  # a packaged config's name: its file
    ranks = gpus_per_node if gpus_per_node > 0 else (tasks_per_node or 0)
    if ranks < 1:
        raise LaunchError("no ranks: give --gpus-per-node N (one rank per GPU) or --gpus-per-node 0 with "
                          "--tasks-per-node N (CPU ranks)")
    if tasks_per_node is not None and gpus_per_node > 0 and tasks_per_node != gpus_per_node:
        raise LaunchError(f"--tasks-per-node {tasks_per_node} with --gpus-per-node {gpus_per_node}: GPU runs use one "
                          "rank per GPU; leave --tasks-per-node out")
    cluster = None if executor == "auto" else executor
    if cluster is None and shutil.which("srun") is None:
        cluster = "local"
    low, high = parse_nodes(str(nodes))
    check_node_range(cfg, (low, high), ranks, LAUNCH_OPTIONS)
    if cluster != "local":
        check_slurm_request(partition, high, gpus_per_node, ranks, cpus_per_task)
    elif high != 1:
        raise LaunchError(f"--nodes {nodes} with the local executor: it runs on this machine only (--nodes 1)")
    out = str(Path(out).absolute())
    folder = Path(logs).absolute() if logs else Path(out) / "submitit"
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_requeues,
                               local_max_num_timeout=max_requeues)
    if ex.cluster == "local":
        run = GraftRun(config and str(Path(config).absolute()), out, list(overrides), restart, mpirun_np=ranks)
        # submitit's local controller signals 30 s before the limit; signal_delay_s applies to SLURM.
        ex.update_parameters(timeout_min=time_min, tasks_per_node=1, nodes=1, gpus_per_node=gpus_per_node,
                             name=Path(out).name)
    else:
        run = GraftRun(config and str(Path(config).absolute()), out, list(overrides), restart)
        ex.update_parameters(
            timeout_min=time_min, nodes=high, tasks_per_node=ranks, cpus_per_task=cpus_per_task,
            name=f"graft-{Path(out).name}", slurm_partition=partition, slurm_account=account,
            slurm_srun_args=[f"--mpi={srun_mpi}", "--kill-on-bad-exit=0", f"--cpus-per-task={cpus_per_task}"],
            slurm_setup=[f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}",
                         *([f'[ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ] && bash {shlex.quote(str(CLEAN_SHM))}']
                           if CLEAN_SHM.exists() else [])],
            slurm_additional_parameters={"signal": f"{PREEMPT_SIGNAL}@{signal_delay_s}", "requeue": True,
                                         **({"nodes": f"{low}-{high}"} if low < high else {})},
            **({"slurm_gpus_per_task": 1} if gpus_per_node > 0 else {}),
        )
    # The local controller (and sbatch's exported environment) must use the training's stop signal.
    with environment_variables(SUBMITIT_PREEMPT_SIGNAL=PREEMPT_SIGNAL):
        return ex.submit(run)


def _slurm_state(job_id: str) -> str | None:
    """The job's state while SLURM still lists it (no accounting database needed), else None."""
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    state = r.stdout.strip()
    return state or None


def wait(job: submitit.Job, timeout_s: float | None = None, poll_s: float = 2.0,
         on_poll: Callable[[str | None], None] | None = None) -> list[Any]:
    """Wait until the run is over (through its requeues) and return the tasks' results; ``on_poll`` is
    handed the job's state at every poll (None once SLURM no longer lists it).

    submitit's own wait asks ``sacct``, which clusters without an accounting database lack; a SLURM job is
    also over here once ``squeue`` no longer lists it. Raises :class:`LaunchError` if a task failed or
    ``timeout_s`` passed (the job keeps running then).
    """
    tasks = [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    if isinstance(job, submitit.SlurmJob):
        # Over when SLURM no longer lists the job: results are written before the ranks leave MPI, and a
        # job cancelled in that moment would leave MPI's shared memory behind. A job gone without
        # results gets a grace period, as results can lag on shared filesystems.
        gone_since = None
        while True:
            state = _slurm_state(job.job_id)
            if on_poll is not None:
                on_poll(state)
            if state is None:
                gone_since = gone_since or time.monotonic()
                if all(t.paths.result_pickle.exists() for t in tasks) or time.monotonic() - gone_since > 15:
                    break
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"job {job.job_id} still runs after {timeout_s:g} s; see {job.paths.stderr}")
            time.sleep(poll_s)
    elif deadline is not None or on_poll is not None:
        while not job.done():
            if on_poll is not None:
                on_poll(job.state)
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"job {job.job_id} still runs after {timeout_s:g} s; see {job.paths.stderr}")
            time.sleep(poll_s)
    results = []
    for t in tasks:
        if t.task_id and isinstance(job, submitit.SlurmJob) and not t.paths.stdout.exists():
            continue  # never started: a MIN-MAX job that SLURM gave fewer nodes
        if not t.paths.result_pickle.exists() and isinstance(job, submitit.SlurmJob):
            raise LaunchError(f"job {job.job_id} task {t.task_id} ended without a result (killed, cancelled or out "
                              f"of requeues); see {t.paths.stderr}")
        try:
            results.append(t.result())
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as exc:
            last = str(exc).strip().splitlines()
            raise LaunchError(f"job {job.job_id} task {t.task_id} failed: {last[-1] if last else exc}; "
                              f"see {t.paths.stderr}") from None
    return results


def final_metrics(out: str | Path) -> str:
    """The last epoch's rows of RUN_DIR/metrics.jsonl as the training prints them."""
    rows = read_jsonl(Path(out) / METRICS)
    if not rows:
        return f"{Path(out) / METRICS}: no metrics yet"
    last = rows[-1]["epoch"]
    peers = [r for r in rows if r["epoch"] == last and r.get("peer") is not None]
    ensemble = next((r["ensemble_acc"] for r in rows if r["epoch"] == last and r.get("peer") is None), None)
    cfg = read_config(Path(out)).cfg
    return epoch_table(peers, ensemble, cfg.train.epochs, cfg.log.thresholds, header=True)
