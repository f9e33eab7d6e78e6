"""Packing an ImageNet folder tree into the HDF5 shards that :mod:`hpcgraft.data.imagenet` reads
(``tools/pack_imagenet.py`` is its command line). The layout is described there, next to its reader.
"""

from __future__ import annotations

import io
import itertools
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hpcgraft.data.imagenet import DECODE_ERRORS, FORMAT, MODES, SPLITS, VERSION, center_view, list_folder, shard_name
from hpcgraft.errors import DataError
from hpcgraft.storage import atomic


def _pack_item(job: tuple[str, str, int]) -> np.ndarray:
    """What one image becomes in a shard (module level so a process pool can run it)."""
    path, mode, array_size = job
    try:
        if mode == "jpeg":
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as img:  # structure check: fail now, not mid-training
                img.verify()
            return np.frombuffer(data, dtype=np.uint8)
        with Image.open(path) as img:
            return center_view(img, array_size, array_size).transpose(2, 0, 1)
    except DECODE_ERRORS as exc:
        raise DataError(f"{path}: cannot read the image ({exc}); replace or remove it and re-pack") from None


def _counted(items: Iterator[np.ndarray], split: str, total: int,
             progress: Callable[[str, int, int, int], None] | None) -> Iterator[np.ndarray]:
    nbytes = 0
    for done, item in enumerate(items, 1):
        nbytes += item.nbytes
        if progress is not None:
            progress(split, done, total, nbytes)
        yield item


def _write_shard(path: Path, attrs: dict[str, Any], classes: list[str], names: np.ndarray, labels: np.ndarray,
                 items: Iterator[np.ndarray]) -> None:
    import h5py

    n = len(labels)

    def write(tmp: Path) -> None:  # renamed when complete: a killed pack leaves no valid-looking shard
        with h5py.File(tmp, "w") as f:
            f.attrs.update(format=FORMAT, version=VERSION, count=n, **attrs)
            text = h5py.string_dtype()
            f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=text)
            f.create_dataset("labels", data=labels)
            f.create_dataset("names", data=np.array([os.fsdecode(p) for p in names], dtype=object), dtype=text)
            if attrs["mode"] == "jpeg":
                images = f.create_dataset("images", (n,), dtype=h5py.vlen_dtype(np.uint8))
            else:
                shape = (3, attrs["array_size"], attrs["array_size"])
                images = f.create_dataset("images", (n, *shape), dtype=np.uint8, chunks=(1, *shape))
            for i, item in enumerate(items):
                images[i] = item

    atomic.replace(path, write)


@dataclass
class PackSummary:
    images: int
    bytes: int
    seconds: float


def pack_imagenet(root: str | os.PathLike, out_dir: str | os.PathLike, *, mode: str = "jpeg",
                  shard_size: int = 10000, array_size: int = 256, jobs: int = 1,
                  progress: Callable[[str, int, int, int], None] | None = None) -> PackSummary:
    """Write the HDF5 shards of the layout above; ``progress(split, done, total, bytes)`` after each image."""
    if mode not in MODES:
        raise DataError(f"--mode {mode} is not known; use jpeg or array")
    if shard_size < 1 or array_size < 1 or jobs < 1:
        raise DataError("--shard-size, --array-size and --jobs must be positive")
    t0 = time.perf_counter()
    classes, listings = list_folder(root)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("train-*.h5")) or any(out.glob("val-*.h5")):
        raise DataError(f"{out} already holds packed shards; choose an empty folder or delete them first")
    pool = multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else None
    try:
        for split in SPLITS:
            lst = listings[split]
            total = len(lst.labels)
            num_shards = (total + shard_size - 1) // shard_size
            work = [(os.path.join(lst.directory, os.fsdecode(p)), mode, array_size) for p in lst.paths]
            items = _counted(pool.imap(_pack_item, work, chunksize=8) if pool else map(_pack_item, work),
                             split, total, progress)
            for shard in range(num_shards):
                a, b = shard * shard_size, min(total, (shard + 1) * shard_size)
                attrs = dict(split=split, mode=mode, shard=shard, num_shards=num_shards, start=a, total=total,
                             array_size=array_size if mode == "array" else 0)
                _write_shard(out / shard_name(split, shard), attrs, classes, lst.paths[a:b], lst.labels[a:b],
                             itertools.islice(items, b - a))
    finally:
        if pool is not None:
            pool.terminate()
    written = sum(p.stat().st_size for s in SPLITS for p in out.glob(f"{s}-*.h5"))
    return PackSummary(sum(len(x.labels) for x in listings.values()), written, time.perf_counter() - t0)
