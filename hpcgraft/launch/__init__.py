"""Runs started as jobs: a run submitted with submitit to SLURM or this machine (:mod:`.jobs`) and a sweep's
arms and seeds, one run each (:mod:`.arms`). Above training (a submitit task is a training rank), below
the commands that parse for them (``hpcgraft submit``, ``hpcgraft sweep``).

From Python: ``hpcgraft.launch.submit(config, out, overrides, nodes=..., gpus_per_node=...)`` returns the
submitit job and ``hpcgraft.launch.wait(job)`` waits for it; ``python -m hpcgraft.launch`` is the submit
command."""

from hpcgraft.launch.jobs import GraftRun, final_metrics, mpirun_command, submit, wait

__all__ = ["GraftRun", "final_metrics", "mpirun_command", "submit", "wait"]
