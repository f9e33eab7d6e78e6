"""The one rule for where a command writes, checked when it starts, before any training, pruning or evaluation.

A path that cannot take the output (a file where a directory goes, a directory or a device where a file goes,
a file in the way of a folder to be made, a folder that cannot be written) would otherwise surface as a
traceback after the work, minutes or hours later, with the result lost. Missing folders are fine: the
command makes them when it writes, as it always did. Every refusal is one line (an InputError, exit 2).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hpcgraft.config import Config
from hpcgraft.errors import InputError


def check_output_dir(path: str | Path, flag: str) -> Path:
    """``path`` will be a directory the command writes into: an existing directory, or one it can make."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is an existing file, not a directory; pass a directory path")
    _check_folder(path, path, flag)
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """``path`` will be a file the command writes (or replaces, by rename): nothing but a regular file may
    stand there, since a rename would put the output in place of a directory's name or a device."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; pass the path of the file to write")
    if path.exists() or path.is_symlink():
        mode = os.lstat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise InputError(f"{flag} {path} exists and is not a regular file; pass the path of a file to write")
    _check_folder(path.parent, path, flag)
    return path


def check_run_outputs(run_dir: Path, cfg: Config) -> None:
    """A training run's ``--out``: a directory, or one it can make (checked before the lock is taken and the
    data loaded). What may stand inside it is the run directory's rule (hpcgraft.training.rundir)."""
    check_output_dir(run_dir, "--out")


def _check_folder(folder: Path, path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``folder`` (itself when it exists) is a writable directory."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {path}: {existing} is a file, not a folder; pass a path whose folders are folders")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {existing} cannot be written (permission denied); pass a writable place")
