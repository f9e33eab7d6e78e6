#!/usr/bin/env python
"""Per-message latency and bandwidth of the path a graft round's messages take, on this machine.

Starts ``mpirun -np 2`` of itself. The two ranks time, over message sizes from 8 B to 16 MiB, the fastest
of the calls made in 0.4 s per size, both ranks starting together after a barrier (on a shared machine a
rank that waits for a core adds milliseconds to a microsecond message; the fastest call is the path's own
cost):

  pingpong   Send / Recv and back, half the round trip: the one-way time of one message (what
             published latencies quote);
  sendrecv   one ``Sendrecv`` in both directions at once: the ring round's transfer (each rank sends its
             block's last peer to the next rank and receives from the previous one);
  allreduce  one ``Allreduce`` (SUM, float32): the allreduce topology's call;
  memcpy     one copy of the same bytes inside one process: the floor of a transfer through shared
             memory, for the ratio.

A line t(n) = alpha + n / beta is fitted to each (alpha: the fastest message of <= 1 KiB; beta: the best
rate of the larger ones with alpha taken off). These alpha and beta are the intra-node figures of the cost model
(tools/cost_model.py, docs/performance.md "Scaling the number of peers").

    .venv/bin/python tools/bench_comm.py [--max-mib 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SMALL = 1024  # bytes: messages up to this size measure the latency


def sizes(max_bytes: int) -> list[int]:
    out, n = [], 8
    while n <= max_bytes:
        out.append(n)
        n *= 4
    return out


def timed(fn, comm, budget_s: float = 0.4, most: int = 2000) -> float:  # noqa: ANN001
    """The fastest of repeated calls, repeated for ``budget_s`` (rank 0's clock decides, so both ranks make
    the same calls)."""
    best, i, start = float("inf"), 0, time.perf_counter()
    while True:
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        best, i = min(best, time.perf_counter() - t0), i + 1
        if not comm.bcast(i < 5 or (time.perf_counter() - start < budget_s and i < most), root=0):
            return best


def measure_size(comm, n: int) -> dict[str, float]:  # noqa: ANN001
    from mpi4py import MPI

    rank, other = comm.Get_rank(), 1 - comm.Get_rank()
    send = np.ones(n // 4 or 1, dtype=np.float32)
    recv = np.empty_like(send)

    def pingpong() -> None:
        if rank == 0:
            comm.Send(send, dest=other)
            comm.Recv(recv, source=other)
        else:
            comm.Recv(recv, source=other)
            comm.Send(send, dest=other)

    return {"pingpong": timed(pingpong, comm) / 2,
            "sendrecv": timed(lambda: comm.Sendrecv(send, dest=other, recvbuf=recv, source=other), comm),
            "allreduce": timed(lambda: comm.Allreduce(send, recv, op=MPI.SUM), comm),
            "memcpy": timed(lambda: np.copyto(recv, send), comm)}


def worker(max_bytes: int, out: Path) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rows = []
    for n in sizes(max_bytes):
        mine = measure_size(comm, n)
        both = comm.allgather(mine)
        # the slower rank's figure is what a synchronous round waits for
        rows.append({"bytes": max(n, 4), **{k: max(r[k] for r in both) for k in mine}})
    if comm.Get_rank() == 0:
        out.write_text(json.dumps(rows))


def fit(rows: list[dict], key: str) -> tuple[float, float]:
    """alpha (s) and beta (bytes/s) of t(n) = alpha + n / beta: the smallest time of a small message, and
    the best rate the larger ones reach once alpha is taken off."""
    alpha = min(r[key] for r in rows if r["bytes"] <= SMALL)
    beta = max(r["bytes"] / max(r[key] - alpha, 1e-12) for r in rows if r["bytes"] > SMALL)
    return alpha, beta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-mib", type=int, default=16, help="largest message in MiB (default 16)")
    parser.add_argument("--json", type=Path, help="also write the rows and the fitted alpha/beta here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    max_bytes = args.max_mib << 20
    if args.worker:
        worker(max_bytes, args.worker)
        return
    mpirun = str(Path(sys.executable).parent / "mpirun")
    with open(os.devnull, "w") as null:
        result = Path(f"/tmp/hpcgraft-bench-comm-{os.getpid()}.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([mpirun, "-np", "2", sys.executable, __file__, "--max-mib", str(args.max_mib),
                        "--worker", str(result)], check=True, stdout=null, env=env)
        rows = json.loads(result.read_text())
        result.unlink()
    keys = ("pingpong", "sendrecv", "allreduce", "memcpy")
    print(f"2 ranks on one node ({os.cpu_count()} cores), load average {os.getloadavg()[0]:.1f}; fastest of the "
          "repeats per call (slower rank), GB/s = bytes / time")
    print(f"{'bytes':>10} | " + " | ".join(f"{k:>9} us {'GB/s':>6}" for k in keys) + " | sendrecv/memcpy")
    for r in rows:
        cells = " | ".join(f"{1e6 * r[k]:>12.1f} {r['bytes'] / r[k] / 1e9:>6.2f}" for k in keys)
        print(f"{r['bytes']:>10} | {cells} | {r['sendrecv'] / r['memcpy']:>15.1f}")
    fits = {k: fit(rows, k) for k in keys}
    for k, (alpha, beta) in fits.items():
        print(f"fit {k:<9}: alpha {1e6 * alpha:6.2f} us, beta {beta / 1e9:6.2f} GB/s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "fit": {k: {"alpha_s": a, "beta_Bps": b}
                                                               for k, (a, b) in fits.items()}}, indent=1))


if __name__ == "__main__":
    main()
