"""Submit a grafting run with submitit: to SLURM (one task = one MPI rank) or locally.

    python -m hpcgraft.launch --config configs/cifar10_resnet32.yaml --out runs/c10 --nodes 2 --gpus-per-node 4 \\
        [--partition P] [--time MIN] [--executor auto|local|slurm] [--wait] key=value ...

The job, its requeue on a time limit and the waiting are :mod:`hpcgraft.launch.jobs`; this module is the
command line (``hpcgraft submit``; ``python -m hpcgraft.launch``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hpcgraft.cli import add_overrides
from hpcgraft.errors import EXIT_FAILURE, EXIT_USAGE, ConfigError, InputError, LaunchError, report
from hpcgraft.launch.jobs import EXECUTORS, final_metrics, submit, wait
from hpcgraft.slurm.check import parse_nodes
from hpcgraft.storage.follow import JobFollower
from hpcgraft.storage.outputs import check_output_dir
from hpcgraft.text import plural

PROG = "hpcgraft.launch"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m hpcgraft.launch",
        description="Submit a grafting run with submitit: to SLURM (one MPI rank per GPU, formed by srun) "
                    "or to this machine (mpirun).",
    )
    p.add_argument("--config", help="YAML run config (default: the built-in digits defaults)")
    p.add_argument("--out", required=True, help="run directory; a requeued or resubmitted job resumes it")
    add_job_options(p)
    p.add_argument("--restart", action="store_true", help="start over, discarding the run in --out")
    p.add_argument("--wait", action="store_true", help="wait for the run to end, printing the job's state changes "
                   "and its log (epoch rows, progress lines) as they come, then its final metrics")
    add_overrides(p, "config overrides of the run (hpcgraft train's)")
    return p.parse_intermixed_args(argv)


def add_job_options(p: argparse.ArgumentParser) -> None:
    """The job's shape and scheduler options, shared by ``hpcgraft.launch`` and ``hpcgraft.sweep``."""
    p.add_argument("--nodes", type=_node_count, default=1, help="N, or MIN-MAX: start on as many as SLURM can give")
    p.add_argument("--gpus-per-node", type=int, default=0, help="one rank per GPU; 0: CPU ranks (--tasks-per-node)")
    p.add_argument("--tasks-per-node", type=int, help="CPU ranks per node when --gpus-per-node is 0 (default 2)")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit per start in minutes (default 60)")
    p.add_argument("--signal-delay", type=int, default=120, metavar="S",
                   help="seconds before the time limit at which the ranks checkpoint and the job requeues")
    p.add_argument("--max-requeues", type=int, default=20, help="time-outs after which the job is not requeued")
    p.add_argument("--srun-mpi", default="pmi2", help="srun --mpi= value: pmi2 (MPICH wheel) or the site's pmix")
    p.add_argument("--executor", choices=EXECUTORS, default="auto", help="auto: SLURM where srun exists, else local")
    p.add_argument("--logs", help="submitit's folder for job files and logs (default: RUN_DIR/submitit)")


def _node_count(text: str) -> int | str:
    """``--nodes``: N as a number, MIN-MAX as given (both checked)."""
    try:
        low, high = parse_nodes(text)
    except LaunchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return high if low == high else text


def job_options(a: argparse.Namespace) -> dict[str, Any]:
    """:func:`submit`'s keyword arguments from the options of :func:`add_job_options`."""
    tasks_per_node = a.tasks_per_node if a.gpus_per_node > 0 or a.tasks_per_node else 2
    return dict(nodes=a.nodes, gpus_per_node=a.gpus_per_node, tasks_per_node=tasks_per_node,
                cpus_per_task=a.cpus_per_task, partition=a.partition, account=a.account, time_min=a.time,
                executor=a.executor, logs=a.logs, signal_delay_s=a.signal_delay, max_requeues=a.max_requeues,
                srun_mpi=a.srun_mpi)


def main(argv: list[str] | None = None) -> int:
    """Command line: submit, print where things are, optionally wait; 0 on success, 2 on a bad request."""
    a = parse_args(argv)
    try:
        check_output_dir(a.out, "--out")
        job = submit(a.config, a.out, a.overrides, restart=a.restart, **job_options(a))
    except (LaunchError, ConfigError, InputError) as exc:
        return report(PROG, exc, EXIT_USAGE)
    print(f"submitted job {job.job_id} ({type(job).__name__}, {plural(job.num_tasks, 'task')}); "
          f"run dir {Path(a.out).absolute()}")
    print(f"  logs: {job.paths.stdout}")
    if not a.wait:
        return 0
    follower = JobFollower(str(job.job_id), job.paths.stdout)
    try:
        wait(job, on_poll=follower.poll)
    except LaunchError as exc:
        follower.finish("FAILED")
        return report(PROG, exc, EXIT_FAILURE)
    follower.finish("COMPLETED")
    print(final_metrics(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
