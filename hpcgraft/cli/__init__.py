"""The commands, one module each: it parses its command line and calls the layers below.

    hpcgraft <command> [options] [key=value ...]      (also: python -m hpcgraft <command> ...)

This module is the dispatcher and stays standard library only: ``hpcgraft train`` under a launcher must
become the rank's supervisor (:mod:`hpcgraft.supervise`) before MPI or torch are imported.
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from collections.abc import Sequence

#: name -> (module, what it does); the order of ``hpcgraft --help``.
COMMANDS = {
    "train": ("train", "train K peers with filter grafting (mpirun -np K hpcgraft train ...); re-running resumes"),
    "evaluate": ("evaluate", "top-1/top-5 of a run's peers and of their ensemble, offline"),
    "prune": ("prune", "prune a run's peers by a criterion, optionally fine-tune, measure top-1"),
    "analyze": ("analyze", "invalid filters per conv layer (l1 norm, entropy, pruning criteria), offline"),
    "graft": ("graft", "graft two saved models offline with a training run's math"),
    "checkpoint": ("checkpoint", "inspect a checkpoint or export a peer's model as a PyTorch state dict"),
    "report": ("report", "plots and a Markdown summary of runs, or a sweep's table"),
    "sweep": ("sweep", "every arm of a comparison, several seeds each, one run per pair"),
    "submit": ("submit", "submit a run with submitit: to SLURM (one task per rank) or locally"),
    "slurm": ("slurm", "write the sbatch scripts out of the installed package"),
}
#: Every command's options come first; config overrides follow as ``key=value`` words.
OVERRIDES_HELP = ("Overrides: dotted config keys after the options, e.g. train.epochs=3 graft.level=filter; "
                  "every key's resolved value: hpcgraft train --config CONFIG key=value ... --print-config.")
PROG = "hpcgraft"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} <command> [options] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, (_module, line) in COMMANDS.items()]
    lines += ["", f"'{PROG} <command> --help' lists a command's options. {OVERRIDES_HELP}"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """The ``hpcgraft`` command: run one command with the rest of the arguments; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        (sys.stdout if args else sys.stderr).write(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"{PROG}: error: no command '{name}'; one of: {', '.join(COMMANDS)} ({PROG} --help)\n")
        return 2
    module = f"hpcgraft.cli.{COMMANDS[name][0]}"
    if name == "train":
        from hpcgraft.supervise import supervise_module

        supervise_module(module, rest)
    return importlib.import_module(module).main(rest)


def add_overrides(parser: argparse.ArgumentParser, what: str = "config overrides") -> None:
    """The ``key=value`` words every command that reads a config takes after its options, and where to see
    what they resolve to."""
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=what)
    parser.epilog = f"{parser.epilog} {OVERRIDES_HELP}" if parser.epilog else OVERRIDES_HELP


def forward(name: str, module: str) -> None:
    """Keep an older module path working: ``python -m`` of it runs ``module``; importing it gives ``module``
    itself (so that patching an attribute patches the command's)."""
    if name == "__main__":
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.modules[name] = importlib.import_module(module)
