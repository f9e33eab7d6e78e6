"""A small tmpfs for the full-disk tests: a real file system that runs out of space (root only)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """``where`` as a tmpfs of ``size`` (e.g. ``1m``) for the block; skips the test where mounting is not
    permitted (not root, or a container without CAP_SYS_ADMIN)."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def resize(where: Path, size: str) -> None:
    """Grow (or shrink) a mounted tmpfs: space freed without touching its files."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)
