"""Checkpoint write/load speed of a ResNet-50-sized peer against the raw speed of the same disk.

Every rank plays one peer (its own writer) and saves/loads a ResNet-50 state_dict plus an equal-sized
momentum buffer (~205 MB), then writes and reads the same number of bytes with plain os.write + fsync /
os.read into one file in the same directory, at the same time as the other ranks. Reads are cold: each
file is dropped from the page cache with posix_fadvise(DONTNEED) after its fsync (per file, no root
needed); the cold/warm read speeds printed show whether that worked.

    .venv/bin/python tools/bench_checkpoint.py [--dir DIR] [--repeats 3]
    .venv/bin/mpirun -np 2 .venv/bin/python tools/bench_checkpoint.py     # two writers in parallel
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import h5py
import torch
from mpi4py import MPI

from hpcgraft.storage import atomic
from hpcgraft.storage import checkpoints as ck
from hpcgraft.storage.tree import write_tree

CHUNK = 16 << 20


def resnet50_tree() -> dict:
    """The tree train.py saves for one peer: weights, momentum buffers, progress."""
    try:
        from hpcgraft.models import create_model

        model = create_model("resnet50", num_classes=1000)
        source = "hpcgraft.models resnet50"
    except ValueError:  # no resnet50 in the registry: same parameter count as plain tensors
        model = torch.nn.Linear(2048, 12_500)
        source = "plain tensors (no resnet50 registered)"
    params = dict(model.named_parameters())
    momentum = {name: torch.randn_like(p) for name, p in params.items()}
    tree = {"model": model.state_dict(), "optimizer": {"momentum": momentum},
            "progress": {"epoch": 3, "step": 15_000, "batch": 0}}
    n_params = sum(p.numel() for p in params.values())
    return tree, f"{source}: {n_params / 1e6:.2f} M parameters, {len(tree['model'])} state tensors"


def write_h5(path: Path, tree: dict) -> None:
    with h5py.File(path, "w", track_order=True, locking=False) as f:
        write_tree(f, tree)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_write(path: Path, data: memoryview) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:done + CHUNK])
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - start


def raw_read(path: Path) -> float:
    start = time.perf_counter()
    buffer = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return time.perf_counter() - start


def timed(comm: MPI.Comm, fn) -> tuple[float, object]:
    """Wall time of a step that all ranks start together; the slowest rank's time counts."""
    comm.Barrier()
    start = time.perf_counter()
    result = fn()
    mine = time.perf_counter() - start
    return comm.allreduce(mine, op=MPI.MAX), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("runs/bench-checkpoint"),
                        help="where to write (the disk under test); removed afterwards")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    run_dir = args.dir / f"np{size}"
    if rank == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
    comm.Barrier()

    tree, described = resnet50_tree()
    mgr = ck.CheckpointManager(run_dir, comm, peer=rank, peers=size, writer=True, keep=1, keep_best=False)
    run_tree = {"config": "model:\n  name: resnet50\n", "versions": {"torch": torch.__version__}}
    raw_file = run_dir / f"raw-{rank}.bin"
    rows: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        rows.setdefault(name, []).append(seconds)

    nbytes = 0
    for rep in range(args.repeats):
        step = rep + 1
        t, info = timed(comm, lambda s=step: mgr.save(s, 1, tree, run_tree if rank == 0 else None, metric=0.5))
        record("checkpoint save (collective)", t)
        mine = info.path / ck.peer_file(rank)
        nbytes = mine.stat().st_size
        # The two parts of writing one peer file, outside the collective.
        part = run_dir / f"part-{rank}.h5"
        tmp = part.with_name(f".{part.name}.tmp")
        t, _ = timed(comm, lambda q=tmp: write_h5(q, tree))
        record("  write_tree into the page cache", t)
        t, _ = timed(comm, lambda p=part, q=tmp: atomic.commit(q, p))
        record("  fsync (+ crc32 read-back), rename", t)
        payload = memoryview(os.urandom(nbytes))
        t, _ = timed(comm, lambda p=payload: raw_write(raw_file, p))
        record("raw os.write + fsync", t)

        drop_cache(raw_file)
        t, _ = timed(comm, lambda: raw_read(raw_file))
        record("raw read, cold", t)
        t, _ = timed(comm, lambda: raw_read(raw_file))
        record("raw read, warm", t)
        for p in [mine] + ([info.path / ck.RUN_FILE] if rank == 0 else []):
            drop_cache(p)
        t, _ = timed(comm, lambda i=info: mgr.load_peer(i, rank))
        record("load_peer, cold (read, crc32, parse)", t)
        drop_cache(mine)
        t, latest = timed(comm, mgr.latest)
        record("latest(), cold (verifies all files)", t)
        t, _ = timed(comm, lambda i=latest: mgr.load_peer(i, rank))
        record("load_peer after latest() (no re-check)", t)

    if rank != 0:
        comm.Barrier()
        return
    med = {name: statistics.median(ts) for name, ts in rows.items()}
    total = nbytes * size
    print(f"hpcgraft checkpoint benchmark: {size} rank(s), each one peer of {described}")
    print(f"peer file {nbytes / 1e6:.1f} MB per rank, {total / 1e6:.1f} MB per checkpoint; disk of {run_dir.resolve()}")
    print(f"median of {args.repeats}; times are the slowest rank's; MB/s = bytes of all ranks / time")
    print(f"{'':46} {'seconds':>8} {'MB/s':>8}")
    for name, seconds in med.items():
        print(f"{name:46} {seconds:8.3f} {total / 1e6 / seconds:8.0f}")
    print("ratios against the raw disk (1.00 = as fast as the disk):")
    print(f"  save / raw write          {med['raw os.write + fsync'] / med['checkpoint save (collective)']:.2f}")
    print(f"  load_peer cold / raw read {med['raw read, cold'] / med['load_peer, cold (read, crc32, parse)']:.2f}")
    resume = med["latest(), cold (verifies all files)"] + med["load_peer after latest() (no re-check)"]
    print(f"  resume (latest + load) / raw read {med['raw read, cold'] / resume:.2f}")
    cold, warm = med["raw read, cold"], med["raw read, warm"]
    note = "page cache dropped" if cold > 1.5 * warm else "cold and warm reads are close: the drop may not have worked"
    print(f"cold read {total / 1e6 / cold:.0f} MB/s vs warm {total / 1e6 / warm:.0f} MB/s ({note})")
    shutil.rmtree(run_dir, ignore_errors=True)
    comm.Barrier()


if __name__ == "__main__":
    main()
