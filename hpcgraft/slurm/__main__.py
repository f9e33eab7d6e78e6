"""Kept for `python -m hpcgraft.slurm DIR`: the command is :mod:`hpcgraft.cli.slurm` (run, not imported: the
scripts' package sits below the commands)."""
import runpy

if __name__ == "__main__":
    runpy.run_module("hpcgraft.cli.slurm", run_name="__main__", alter_sys=True)
