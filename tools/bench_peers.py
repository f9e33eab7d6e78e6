"""The graft round's time against the number of peers K (``graft.peers``), the peers shared by the ranks.

For each K (default 2, 4, 8, 16, 32) the driver starts ``--ranks`` ranks (default 2, K/ranks peers each; K
below the rank count runs on K ranks) with the venv's mpirun; every rank builds its block of peers (the
model of ``--model``, seeded per peer as a run does) and times ``--rounds`` grafting rounds of the exchange the
training loop uses (``hpcgraft.comm.peerset.PeerSetExchange``), ring and allreduce. Prints one row per K:
the median round in milliseconds and per peer.

    .venv/bin/python tools/bench_peers.py [--ranks 2] [--peers 2 4 8 16 32] [--model digits_resnet] [--rounds 5]

``--worker`` is the rank program. One thread per rank (OMP_NUM_THREADS=1), as the tests run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch
    from mpi4py import MPI

    from hpcgraft.comm.peerset import PeerSetExchange
    from hpcgraft.comm.world import init_world
    from hpcgraft.method import seeding
    from hpcgraft.method.grafting import GraftMath
    from hpcgraft.models import create_model

    torch.set_num_threads(1)
    world = init_world(1, MPI.COMM_WORLD, args.k)
    states = []
    for peer in world.peer_ids:
        seeding.seed_everything(seeding.derive_seed(seeding.INIT, 0, peer))
        states.append(create_model(args.model, 10).state_dict())
    row = {"k": args.k, "ranks": world.size, "per_rank": world.hosted}
    for topology in ("ring", "allreduce"):
        exchange = PeerSetExchange(states, world.graft_comm, world.peers, GraftMath(), topology=topology)
        times = []
        for _ in range(args.rounds + 1):  # the first round allocates the buffers: not counted
            world.comm.Barrier()
            started = time.perf_counter()
            exchange.graft()
            world.comm.Barrier()
            times.append(time.perf_counter() - started)
        row[topology] = statistics.median(times[1:])
    if world.is_root:
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--model", default="digits_resnet")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    mpirun = str(Path(sys.executable).parent / "mpirun")
    print(f"{'K':>4} {'ranks':>5} {'per rank':>8} {'ring ms':>9} {'ms/peer':>8} {'allreduce ms':>12} {'ms/peer':>8}")
    for k in args.peers:
        ranks = min(args.ranks, k)
        cmd = [mpirun, "-np", str(ranks), sys.executable, __file__, "--worker", "--k", str(k),
               "--model", args.model, "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        ring, allreduce = row["ring"] * 1e3, row["allreduce"] * 1e3
        print(f"{k:>4} {row['ranks']:>5} {row['per_rank']:>8} {ring:>9.1f} {ring / k:>8.2f} {allreduce:>12.1f} "
              f"{allreduce / k:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
