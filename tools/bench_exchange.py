"""Benchmark of the grafting exchange: bytes per second of hpcgraft's ring and allreduce
transfers for a ResNet-50 state, against raw MPI operations on the same number of bytes.

    .venv/bin/python tools/bench_exchange.py [--ranks 2 3 4] [--repeats 15]

For each K it starts `mpirun -np K` of itself. Each rank holds a ResNet-50 state (25.6 M float32 values,
97.7 MiB) and measures, all ranks starting together after a barrier:
  ring       GraftExchange's transfer (PackedTensors.sendrecv: small tensors packed, large ones straight
             from their storage) vs one raw Sendrecv of a preallocated buffer of the same bytes;
  allreduce  the allreduce topology's transfer (entropy-weighted packing + Allreduce) vs one raw
             Allreduce (SUM) of a preallocated float32 buffer of the same size; "its call" is the
             Allreduce call alone on hpcgraft's buffers (the rest is the weighting pass over the state);
  round      a whole GraftExchange.graft() of each topology (entropies, mixing and all), for scale.
Figures: median per rank; "slowest" is the maximum over ranks (what a synchronous round waits for).
GB/s = bytes of the state / time: what each rank sends (and receives) per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))


def worker(repeats: int) -> None:
    from bench_graft import resnet50_state
    from mpi4py import MPI

    from hpcgraft.comm.exchange import GraftExchange
    from hpcgraft.method import grafting

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    state = resnet50_state(1000 + rank)
    ring = GraftExchange(state, comm, topology="ring")
    allred = GraftExchange(state, comm, topology="allreduce")
    nbytes = ring.packed.nbytes
    succ, pred = (rank + 1) % size, (rank - 1) % size

    # the allreduce topology's weights, as its round computes them (H + eps per layer)
    h = grafting.layer_entropies(state, allred.plan)
    member_w = grafting.per_member(allred.plan, [x.double() + grafting.WEIGHT_EPS for x in h])
    weights = [grafting.broadcast_to_filters(w.to(t.dtype), t) for t, w in zip(allred.tensors, member_w, strict=True)]

    raw_send = np.ones(nbytes // 4, dtype=np.float32)
    raw_recv = np.zeros_like(raw_send)

    def timed(fns: dict[str, Callable[[], object]], repeats: int = repeats) -> dict[str, float]:
        """Median seconds of each; the functions take turns (alternating order) after a barrier, so that
        a change in the machine's load hits ours and raw alike."""
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():  # warm-up
            fn()
        for i in range(repeats):
            for key in list(fns)[:: 1 if i % 2 else -1]:
                comm.Barrier()
                t = time.perf_counter()
                fns[key]()
                times[key].append(time.perf_counter() - t)
        return {k: statistics.median(v) for k, v in times.items()}

    def ring_ours() -> None:
        ring.packed.sendrecv(comm, succ, pred)

    def ring_raw() -> None:
        comm.Sendrecv(raw_send, dest=succ, recvbuf=raw_recv, source=pred)

    def allreduce_ours() -> None:
        allred.packed.pack(weights)
        allred.packed.allreduce(comm)

    def allreduce_call() -> None:  # the MPI call alone, on the buffers packed last
        allred.packed.allreduce(comm)

    def allreduce_raw() -> None:
        comm.Allreduce(raw_send, raw_recv)

    mine = {**timed({"ring_ours": ring_ours, "ring_raw": ring_raw}),
            **timed({"allreduce_ours": allreduce_ours, "allreduce_raw": allreduce_raw}),
            **{k.replace("raw", "call_raw"): v for k, v in
               timed({"allreduce_call": allreduce_call, "allreduce_raw": allreduce_raw}).items()},
            **timed({"round_ring": ring.graft, "round_allreduce": allred.graft}, max(3, repeats // 3))}
    per_rank = comm.gather(mine)
    if rank == 0:
        print(json.dumps({"ranks": size, "bytes": nbytes, "per_rank": per_rank}), flush=True)


def run(k: int, repeats: int) -> dict:
    mpirun = Path(sys.executable).parent / "mpirun"
    cmd = [str(mpirun), "-np", str(k), sys.executable, __file__, "--worker", "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"bench_exchange: mpirun -np {k} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    cores = len(os.sched_getaffinity(0))
    gbs = lambda n, t: n / t / 1e9  # noqa: E731
    lines = [f"ResNet-50 state, {results[0]['bytes'] / 2**20:.1f} MiB per rank, {cores} cores, "
             "1 torch thread per rank; times in ms (median per rank; slowest rank), GB/s = state bytes / time",
             "",
             f"{'K':>2} {'operation':<10} {'ours (slowest)':>15} {'raw (slowest)':>14} {'ours GB/s':>10} "
             f"{'raw GB/s':>9} {'ours/raw':>9}  per rank ours | raw"]
    for res in results:
        k, n, ranks = res["ranks"], res["bytes"], res["per_rank"]
        for op, key, raw_key in (("ring", "ring_ours", "ring_raw"), ("allreduce", "allreduce_ours", "allreduce_raw"),
                                 ("  its call", "allreduce_call", "allreduce_call_raw")):
            ours = [r[key] for r in ranks]
            raw = [r[raw_key] for r in ranks]
            detail = " ".join(f"{t * 1e3:.0f}" for t in ours) + " | " + " ".join(f"{t * 1e3:.0f}" for t in raw)
            lines.append(f"{k:>2} {op:<10} {max(ours) * 1e3:15.1f} {max(raw) * 1e3:14.1f} {gbs(n, max(ours)):10.2f} "
                         f"{gbs(n, max(raw)):9.2f} {max(ours) / max(raw):9.2f}  {detail}")
        rounds = [f"{op} {max(r[f'round_{op}'] for r in ranks) * 1e3:.0f}" for op in ("ring", "allreduce")]
        lines.append(f"{k:>2} {'round':<10} whole GraftExchange.graft(), slowest rank (ms): {', '.join(rounds)}")
    lines += ["", f"K > {cores}: more ranks than cores. MPICH ranks spin while they wait, so ranks take turns on the "
              "cores and each figure includes time spent descheduled; per-rank numbers then show scheduling "
              "noise rather than link speed, and ours/raw (measured the same way, side by side) is the "
              "meaningful figure."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=15, help="of each transfer (whole rounds: a third)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.repeats)
        return 0
    if any(k < 2 for k in args.ranks):
        parser.error("--ranks: the exchange needs at least 2 ranks")
    results = [run(k, args.repeats) for k in args.ranks]
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
