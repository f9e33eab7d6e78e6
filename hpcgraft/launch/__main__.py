"""Kept for `python -m hpcgraft.launch`: the submit command, :mod:`hpcgraft.cli.submit` (run, not imported:
the jobs' package sits below the commands)."""
import runpy

if __name__ == "__main__":
    runpy.run_module("hpcgraft.cli.submit", run_name="__main__", alter_sys=True)
