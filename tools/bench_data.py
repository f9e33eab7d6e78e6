#!/usr/bin/env python
"""Can the data readers feed the models?  Images per second of each reader for one rank, beside the
training rate of the model it feeds (forward + backward + SGD step), measured side by side here.

Readers: digits and CIFAR-10 (in memory; CIFAR from a synthetic 50,000-image set written in the standard
pickle format), ImageNet from a generated JPEG tree (image folders) and from its HDF5 packs (jpeg and array
mode), each with 0 and 2 loader workers. Rates are steady state, best of two interleaved runs: timing
starts when the first batch arrives, so worker start-up (paid once per epoch) is not counted. A ratio
reader/model below 1 means the reader is the bottleneck on this machine; on an accelerator the model
rates are many times higher. The load average is printed because other processes on the cores slow the
multi-threaded model steps far more than the single-threaded decoding (compare runs at low load).

    .venv/bin/python tools/bench_data.py [--image-size 128] [--images 512] [--seconds 1.0] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hpcgraft.data import BatchLoader, build_datasets
from hpcgraft.data.imagenet import resize_size
from hpcgraft.data.pack import pack_imagenet
from hpcgraft.models import create_model, list_models


def write_cifar10(folder: Path, per_file: int = 10000) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_file).tolist()}
        with (folder / name).open("wb") as f:
            pickle.dump(entry, f, protocol=4)


def write_jpeg_tree(root: Path, images: int, classes: int = 8) -> int:
    """Photo-like JPEGs of about 400x350 (smooth colour fields plus grain, so they compress like photos)."""
    rng = np.random.default_rng(0)
    nbytes = 0
    for split, count in (("train", images), ("val", max(classes, images // 8))):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = int(rng.integers(350, 451)), int(rng.integers(300, 401))
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
            grain = rng.normal(0, 12, (h, w, 3))
            pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
            path = folder / f"img_{i:05d}.JPEG"
            Image.fromarray(pixels).save(path, quality=90)
            nbytes += path.stat().st_size
    return nbytes


def reader_rate(dataset, batch: int, workers: int, seconds: float) -> float:
    loader = BatchLoader(dataset, batch, shuffle=True, augment=True, seed=0, workers=workers)
    count, t0 = 0, None
    for epoch in itertools.count():
        for _, y in loader.epoch(epoch):
            if t0 is None:
                t0 = time.perf_counter()
                continue
            count += len(y)
            if time.perf_counter() - t0 > seconds:
                return count / (time.perf_counter() - t0)
    raise AssertionError("unreachable")


def model_rate(name: str, shape: tuple[int, ...], batch: int, classes: int, seconds: float) -> float:
    torch.manual_seed(0)
    model = create_model(name, classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up
    steps, t0 = 0, time.perf_counter()
    while steps < 1 or time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128, help="ImageNet crop size (default 128: CPU-sized)")
    parser.add_argument("--images", type=int, default=512, help="training JPEGs to generate (default 512)")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing window per measurement")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this process (default 1: rates per core, which hold up when other "
                             "jobs share the cores; threads waiting on busy cores slow model steps many times)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.image_size
    imagenet_model = "resnet18" if "resnet18" in list_models() else "resnet32"
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hpcgraft-bench-") as tmp:
        tmp_path = Path(tmp)
        write_cifar10(tmp_path / "cifar-10-batches-py")
        jpeg_bytes = write_jpeg_tree(tmp_path / "imagenet", args.images)
        packs = {}
        for mode in ("jpeg", "array"):
            s = pack_imagenet(tmp_path / "imagenet", tmp_path / f"h5-{mode}", mode=mode, shard_size=256,
                              array_size=resize_size(size), jobs=2)
            packs[mode] = s
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}; "
              f"{args.images} train JPEGs ({jpeg_bytes / 2**20:.1f} MiB incl. val), image size {size}; packing: "
              + ", ".join(f"{m} {s.bytes / 2**20:.1f} MiB in {s.seconds:.1f} s" for m, s in packs.items()))
        rows = [  # reader, data set, root, batch, model, model input shape, model batch
            ("digits", "digits", None, 128, "digits_resnet", (1, 8, 8), 128),
            ("cifar10 (memory)", "cifar10", tmp_path, 128, "resnet32", (3, 32, 32), 128),
            ("imagenet folder", "imagenet", tmp_path / "imagenet", 32, imagenet_model, (3, size, size), 4),
            ("imagenet_h5 jpeg", "imagenet_h5", tmp_path / "h5-jpeg", 32, imagenet_model, (3, size, size), 4),
            ("imagenet_h5 array", "imagenet_h5", tmp_path / "h5-array", 32, imagenet_model, (3, size, size), 4),
        ]
        models: dict[tuple, float] = {}
        header = (f"{'reader':<18} {'workers':>7} {'batch':>5} {'reader img/s':>12}   {'model (train step)':<26} "
                  f"{'model img/s':>11} {'reader/model':>12}")
        print(header)
        print("-" * len(header))
        for label, name, root, batch, model, shape, model_batch in rows:
            train, _ = build_datasets(name, None if root is None else str(root), size)
            # Interleaved, best of two: this machine is shared, and a slow moment should not pass as a rate.
            readers = {0: 0.0, 2: 0.0}
            key = (model, shape, model_batch)
            for _ in range(2):
                for workers in readers:
                    readers[workers] = max(readers[workers], reader_rate(train, batch, workers, args.seconds))
            models[key] = max(models.get(key, 0.0), model_rate(model, shape, model_batch, train.num_classes,
                                                               args.seconds))
            for workers, rate in readers.items():
                desc = f"{model} {shape[1]}px b{model_batch}"
                print(f"{label:<18} {workers:>7} {batch:>5} {rate:>12.0f}   {desc:<26} {models[key]:>11.1f} "
                      f"{rate / models[key]:>12.1f}", flush=True)
    if imagenet_model != "resnet18":
        print("note: resnet18 is not in the model registry yet; the ImageNet rows use resnet32 at that size")
    print(f"total {time.perf_counter() - t_start:.0f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
