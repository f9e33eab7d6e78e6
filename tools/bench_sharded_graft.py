"""The sharded graft exchange of a ResNet-50-sized model (R = 2) against the unsharded one (R = 1).

Side by side, on the same machine and model: 2 ranks as 2 peers of one rank each (GraftExchange), then
4 ranks as 2 peers x 2 replicas (the exchange with a ShardedTransport, each replica moving half of the weights between
peers and the peer reassembling them within its ranks). Prints the time of one round split into its
phases (the watchdog guards of the exchange name them), the bytes each rank sends to the other peer,
and the sharded/unsharded ratios.

    .venv/bin/python tools/bench_sharded_graft.py [--rounds 5] [--topology ring|allreduce] [--level layer]

The driver starts both configurations with the venv's mpirun; ``--worker`` is the rank program.
On a machine with fewer cores than 4 ranks the sharded run is oversubscribed: every replica still
computes the whole model's entropies, and ranks waiting in MPI spin on cores that others need, so its
times here are an upper bound. What carries over to a cluster, where each replica has its own GPU or
cores and peers talk over the network, is the halved inter-peer traffic per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    from functools import partial

    import torch
    from mpi4py import MPI

    from hpcgraft.comm.exchange import GraftExchange
    from hpcgraft.comm.replicas import ShardedTransport
    from hpcgraft.comm.world import init_world, torch_threads
    from hpcgraft.method.grafting import GraftMath
    from hpcgraft.models import create_model

    world = init_world(args.replicas, MPI.COMM_WORLD)
    torch.set_num_threads(torch_threads(world.local_size))
    torch.manual_seed(world.peer)  # replicas of a peer hold the same weights
    state = create_model("resnet50", 1000).state_dict()
    options = dict(math=GraftMath(level=args.level), topology=args.topology)
    if world.replicas > 1:
        exchange = GraftExchange(state, world.graft_comm, **options,
                                 transport=partial(ShardedTransport, peer_comm=world.peer_comm))
    else:
        exchange = GraftExchange(state, world.graft_comm, **options)

    phases: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def timed(what: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            phases[what.removeprefix("graft: ")] += time.perf_counter() - start

    rounds = []
    for i in range(args.rounds + 1):  # the first round warms up
        phases.clear()
        world.comm.Barrier()
        start = time.perf_counter()
        result = exchange.graft(on_wait=timed)
        elapsed = time.perf_counter() - start
        row = world.comm.allreduce(elapsed, op=MPI.MAX)  # a round lasts as long as its slowest rank
        if i:
            rounds.append((row, dict(phases), result.bytes_sent))
    if world.rank == 0:
        totals = sorted(r[0] for r in rounds)
        median = rounds[[r[0] for r in rounds].index(totals[len(totals) // 2])]
        n_params = sum(t.numel() for t in exchange.tensors)
        print(json.dumps({"ranks": world.size, "replicas": world.replicas, "round_s": statistics.median(totals),
                          "min_s": totals[0], "phases": median[1], "bytes_sent": median[2], "elements": n_params}))


def run_worker(tool: str, ranks: int, *args: str) -> dict:
    """``mpirun -np ranks`` of ``tool --worker ARGS`` (one thread per rank): the JSON of rank 0's last line."""
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-np", str(ranks), sys.executable, tool, "--worker", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if out.returncode:
        sys.exit(f"{Path(tool).stem}: {ranks} ranks ({' '.join(args)}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_or_work(p: argparse.ArgumentParser, work: Callable[[argparse.Namespace], None]
                  ) -> argparse.Namespace | None:
    """The driver's arguments; started as a rank (``--worker``), runs ``work`` instead and returns None."""
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        work(args)
        return None
    return args


def run(replicas: int, args: argparse.Namespace) -> dict:
    return run_worker(__file__, 2 * replicas, "--replicas", str(replicas), "--rounds", str(args.rounds),
                      "--topology", args.topology, "--level", args.level)


def _rest(result: dict) -> float:
    return result["round_s"] - sum(result["phases"].values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--topology", choices=("ring", "allreduce"), default="ring")
    p.add_argument("--level", choices=("layer", "filter"), default="layer")
    p.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    args = parse_or_work(p, worker)
    if args is None:
        return
    plain, sharded = run(1, args), run(2, args)
    print(f"graft round of a ResNet-50 ({plain['elements'] / 1e6:.1f} M weights), 2 peers, {args.topology}/"
          f"{args.level}, median of {args.rounds} rounds, {os.cpu_count()} cores here")
    names = sorted(set(plain["phases"]) | set(sharded["phases"]))
    print(f"  {'':44s} {'R=1 (2 ranks)':>14s} {'R=2 (4 ranks)':>14s} {'ratio':>7s}")
    for label, a, b in [("round (slowest rank)", plain["round_s"], sharded["round_s"]),
                        *[(name, plain["phases"].get(name, 0.0), sharded["phases"].get(name, 0.0)) for name in names],
                        ("rest: entropies, packing, mixing, copies", _rest(plain), _rest(sharded))]:
        ratio = f"{b / a:7.2f}" if a else "      -"
        print(f"  {label + ' [s]':44s} {a:14.3f} {b:14.3f} {ratio}")
    a, b = plain["bytes_sent"], sharded["bytes_sent"]
    print(f"  {'bytes each rank sends to the other peer [MB]':44s} {a / 1e6:14.1f} {b / 1e6:14.1f} {b / a:7.2f}")
    print(f"sharded/unsharded round time: {sharded['round_s'] / plain['round_s']:.2f}")
    if (os.cpu_count() or 1) < 4:
        print(f"note: 4 ranks on {os.cpu_count()} cores are oversubscribed; the R=2 times are an upper bound "
              "(each replica also computes the whole model's entropies on shared cores)")


if __name__ == "__main__":
    main()
