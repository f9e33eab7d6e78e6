"""The one atomic writer: a reader (another rank, a plotting script, a resumed run) sees the old file or
the new one, never a part, and an interrupted write leaves no stray temporary behind.

Two strengths of the same write: :func:`replace` for the run's small files (config, status, logs,
offline outputs), and :func:`replace_durable` for checkpoints, which also fsyncs the file and its
directory and returns the size and CRC-32 the manifest records.
"""

from __future__ import annotations

import contextlib
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CHUNK = 16 << 20  # bytes per os.write / os.read call


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A unique temporary name beside ``path`` (same file system, so the rename is atomic), removed
    whatever happens unless it was renamed into place. A leftover of that name goes first: a symlink planted
    there would otherwise take the write to the file it points to."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def replace(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write`` on a temporary path beside ``path``, then rename it over ``path``."""
    path = Path(path)
    with _temporary(path) as tmp:
        write(tmp)
        os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    replace(path, lambda tmp: tmp.write_text(text))


def replace_durable(path: Path, write: Callable[[Path], object]) -> dict[str, Any]:
    """Like :func:`replace`, and the file is on disk before it gets its name; returns its manifest
    entry (size and CRC-32 of exactly the bytes written)."""
    with _temporary(path) as tmp:
        write(tmp)
        return commit(tmp, path)


def write_bytes_durable(path: Path, data: bytes | memoryview) -> dict[str, Any]:
    """Bytes through :func:`replace_durable` (the manifest, exported models)."""
    view = memoryview(data).cast("B")

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:done + CHUNK])
        finally:
            os.close(fd)

    return replace_durable(path, write)


def crc_of(path: Path) -> tuple[int, int]:
    """(size, CRC-32) of a file, streamed: a thread reads the next chunk while this one is checksummed
    (both release the GIL), so a cold file costs about one read of the disk."""
    crc = size = 0
    buffers = (bytearray(CHUNK), bytearray(CHUNK))
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="hpcgraft-read") as reader:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        pending = reader.submit(f.readinto, buffers[0])
        turn = 0
        while n := pending.result():
            pending = reader.submit(f.readinto, buffers[1 - turn])
            crc = zlib.crc32(memoryview(buffers[turn])[:n], crc)
            size += n
            turn = 1 - turn
    return size, crc


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> dict[str, Any]:
    """Make the written file ``tmp`` durable under the name ``path``; returns its manifest entry.

    The checksum is computed by reading the file back while fsync runs in a thread: it comes from the
    page cache, so it is nearly free while the disk is busy, and it covers exactly the bytes written.
    """
    fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
    try:
        failure: list[OSError] = []

        def sync() -> None:
            try:
                os.fsync(fd)
            except OSError as exc:
                failure.append(exc)

        syncer = threading.Thread(target=sync, name="hpcgraft-fsync")
        syncer.start()
        try:
            size, crc = crc_of(tmp)
        finally:
            syncer.join()
        if failure:
            raise failure[0]
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return {"size": size, "crc32": f"{crc:08x}"}
