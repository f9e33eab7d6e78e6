"""The papers' tables in one command: every arm of a comparison, several seeds each, one run per pair.

    python -m hpcgraft.sweep CONFIG [--arms baseline,grafting,grafting+cultivation] [--seeds 3] [--out DIR]
        [--np K] [--arm NAME key=value ...] [--restart] [--submitit|--slurm [job options] [--wait]] [key=value ...]

What a sweep is and does (its runs in ``DIR/<arm>/seed<k>``, locally under mpirun or one job each, resumed
by re-running the command) is :mod:`hpcgraft.launch.arms`; this module is its command line.
``python -m hpcgraft.report DIR`` turns ``DIR/sweep.json`` into the table.
"""

from __future__ import annotations

import argparse
import sys

from hpcgraft.cli import add_overrides
from hpcgraft.cli.submit import add_job_options, job_options
from hpcgraft.errors import EXIT_USAGE, ConfigError, InputError, LaunchError, report
from hpcgraft.launch.arms import ARMS, DEFAULT_ARMS, PROG, open_sweep, run_locally, submit_all


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m hpcgraft.sweep",
        description="Train every arm of a comparison with several seeds (one run per arm and seed, locally "
                    "with mpirun or as SLURM/submitit jobs); re-running resumes what is unfinished.",
        epilog="Arms: " + "; ".join(f"{k} = {' '.join(v)}" for k, v in ARMS.items()) + ". Then: python -m "
               "hpcgraft.report DIR writes the table (mean +- std over seeds).")
    p.add_argument("config", metavar="CONFIG", help="YAML config: a file or a packaged name (cifar10_resnet32)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated (default {','.join(DEFAULT_ARMS)})")
    p.add_argument("--arm", action="append", nargs="+", default=[], metavar="NAME key=value",
                   help="define an arm: --arm filter graft.level=filter cultivate.lambda=1 (repeatable; the words "
                        "up to the next option are the arm's; 'NAME=key=value ...' is the older spelling)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm: 0..N-1 (default 3)")
    p.add_argument("--out", help="sweep directory (default: runs/sweep-<config name>)")
    p.add_argument("--np", type=int, help="ranks (peers) per run (default 2; with --submitit the job options decide)")
    p.add_argument("--restart", action="store_true", help="start every run over, finished ones too")
    p.add_argument("--submitit", action="store_true", help="one job per run through hpcgraft.launch (submitit)")
    p.add_argument("--slurm", action="store_true", help="--submitit with --executor slurm")
    p.add_argument("--wait", action="store_true", help="with --submitit: wait for the jobs, then print the table")
    jobs = p.add_argument_group("job options (with --submitit/--slurm, as python -m hpcgraft.launch)")
    add_job_options(jobs)
    add_overrides(p, "config overrides for every run")
    a = p.parse_intermixed_args(argv)
    if a.slurm:
        a.submitit, a.executor = True, "slurm"
    return a


def main(argv: list[str] | None = None) -> int:
    """Command line; 0 when every run finished (or was submitted), 2 on bad input, 1 when a run failed."""
    a = parse_args(argv)
    try:
        sweep = open_sweep(a.config, a.out, a.arms, a.arm, a.seeds, list(a.overrides), np=a.np, restart=a.restart,
                           submitted=a.submitit, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                           tasks_per_node=a.tasks_per_node)
    except (ConfigError, LaunchError, InputError) as exc:
        return report(PROG, exc, EXIT_USAGE)
    if not a.submitit:
        return run_locally(sweep)
    a.tasks_per_node = sweep.tasks_per_node
    return submit_all(sweep, job_options(a), a.wait)


if __name__ == "__main__":
    sys.exit(main())
