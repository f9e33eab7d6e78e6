"""Atomic file replacement: a reader (another rank, a plotting script, a resumed run) sees the old file
or the new one, never a part, and an interrupted write leaves no stray temporary behind.

Checkpoints have their own, durable variant (fsync before the rename) in :mod:`hpcgraft.checkpoint`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def replace(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write`` on a temporary path beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    replace(path, lambda tmp: tmp.write_text(text))
