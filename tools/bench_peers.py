"""The graft round's time against the number of peers K, hosted K / ranks to a rank (``graft.peers``).

For each K, the driver starts ``--ranks`` ranks (default 2) of the rank program, which builds K / ranks
digits nets (the models training builds, seeded per peer) on every rank and times one round of the
peers' exchange (:class:`hpcgraft.comm.peerset.PeerSetExchange`) as the training loop calls it: the
median of ``--rounds`` rounds after a warm-up one, each as long as its slowest rank.

    .venv/bin/python tools/bench_peers.py [--ranks 2] [--peers 2,4,8,16,32] [--topology ring] [--model digits_resnet]

``--worker`` is the rank program. With one thread per rank, the round is mostly the per-peer work
(entropies, mixing), which grows with the peers a rank hosts; the bytes between ranks do not (ring: one
peer's weights per rank pair; allreduce: one sum travelling along the ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from bench_sharded_graft import parse_or_work, run_worker  # tools/ is the script's own folder, first on sys.path


def worker(args: argparse.Namespace) -> None:
    import torch
    from mpi4py import MPI

    from hpcgraft.comm.peerset import PeerSetExchange
    from hpcgraft.comm.world import init_world
    from hpcgraft.config import load_config
    from hpcgraft.method import seeding
    from hpcgraft.method.grafting import GraftMath
    from hpcgraft.storage.run import build_model

    torch.set_num_threads(1)
    cfg = load_config(None, [f"model.name={args.model}", f"graft.topology={args.topology}"])
    world = init_world(1, MPI.COMM_WORLD, peers=args.k)
    models = []
    for index in world.local_peers:
        seeding.seed_everything(seeding.derive_seed(seeding.INIT, cfg.seed, index))
        models.append(build_model(cfg, 10, torch.device("cpu")))
    exchange = PeerSetExchange([m.state_dict() for m in models], world.graft_comm, world.peer,
                               GraftMath.from_config(cfg), topology=args.topology)
    rounds = []
    for i in range(args.rounds + 1):  # the first round warms up
        world.comm.Barrier()
        start = time.perf_counter()
        exchange.graft()
        elapsed = world.comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
        if i:
            rounds.append(elapsed)
    if world.rank == 0:
        params = sum(t.numel() for t in exchange.tensors[0])
        print(json.dumps({"k": args.k, "ranks": world.size, "per_rank": world.per_rank,
                          "round_s": statistics.median(rounds), "min_s": min(rounds), "elements": params}))


def run(k: int, args: argparse.Namespace) -> dict:
    return run_worker(__file__, args.ranks, "--k", str(k), "--rounds", str(args.rounds), "--topology",
                      args.topology, "--model", args.model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--peers", default="2,4,8,16,32", help="the values of K, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--topology", choices=("ring", "allreduce"), default="ring")
    p.add_argument("--model", default="digits_resnet")
    p.add_argument("--k", type=int, default=2, help=argparse.SUPPRESS)
    args = parse_or_work(p, worker)
    if args is None:
        return
    results = [run(int(k), args) for k in args.peers.split(",")]
    print(f"graft round of {args.model} ({results[0]['elements'] / 1e3:.1f} k weights per peer), {args.topology}/"
          f"layer, {args.ranks} ranks, median of {args.rounds} rounds, {os.cpu_count()} cores here")
    print(f"  {'K':>4s} {'per rank':>8s} {'round ms':>9s} {'ms/peer':>8s}")
    for r in results:
        print(f"  {r['k']:4d} {r['per_rank']:8d} {1e3 * r['round_s']:9.1f} {1e3 * r['round_s'] / r['k']:8.2f}")


if __name__ == "__main__":
    main()
