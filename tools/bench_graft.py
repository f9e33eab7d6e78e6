"""Benchmark of one grafting round: hpcgraft's in-memory exchange against the floor (a raw
MPI Sendrecv of the same bytes) and against the file-based round of the authors' code.

    .venv/bin/python tools/bench_graft.py            (re-launches itself as `mpirun -np 2`)
    .venv/bin/mpirun -np 2 .venv/bin/python tools/bench_graft.py

Side by side, on 2 ranks of this machine, for resnet56 (CIFAR) and resnet50 (ImageNet):
  (a) GraftExchange.graft: entropies, allgather, pack, ring Sendrecv, mixing (the whole round), and
      its transfer alone (pack + Sendrecv, timed inside the real round);
  (b) a raw mpi4py Sendrecv of the same number of bytes between preallocated buffers (the floor);
  (c) the reference's round re-implemented: torch.save of the whole state to a directory, torch.load
      of the peer's file, the entropy of every layer of both models with a Python loop over bins (one
      masked comparison pass over the tensor per bin), and the mixing. The reference's polling sleeps
      are replaced by a barrier and not counted; files sit in the page cache (its best case).
Also: the entropy of all layers, ours against the per-bin loop, one thread.
Every figure is the median of the repeats on each rank, then the slowest rank.

``--device cuda``: the states live on the GPU (each rank on the same or its own GPU), the round stages
its buffers through pinned host memory as a run does, the raw Sendrecv moves host buffers (the floor
for an MPI that is not CUDA-aware), and every timing waits for the device to finish.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcgraft.supervise import launcher_rank

RANKS = 2


def relaunch(argv: list[str]) -> int:
    mpirun = Path(sys.executable).parent / "mpirun"
    launcher = str(mpirun) if mpirun.exists() else shutil.which("mpirun")
    if launcher is None:
        print("bench_graft: mpirun not found; run `make setup` or start it as mpirun -np 2 python tools/bench_graft.py",
              file=sys.stderr)
        return 2
    os.execv(launcher, [launcher, "-np", str(RANKS), sys.executable, __file__, *argv])
    return 0  # not reached


if __name__ == "__main__" and launcher_rank() is None:
    # Relaunch before MPI starts here: a singleton MPI that exec replaces leaves its /dev/shm segment behind.
    sys.exit(relaunch(sys.argv[1:]))

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from hpcgraft.comm.exchange import GraftExchange  # noqa: E402
from hpcgraft.method import grafting  # noqa: E402
from hpcgraft.models import create_model  # noqa: E402


# ------------------------------------------------------------------------------------------ models
def resnet50_state(seed: int) -> dict[str, torch.Tensor]:
    """ImageNet ResNet-50 (hpcgraft.models): 25.6 M floating values in 320 tensors."""
    torch.manual_seed(seed)
    return create_model("resnet50", 1000).state_dict()


def resnet56_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return create_model("resnet56", 10).state_dict()


MODELS: dict[str, Callable[[int], dict[str, torch.Tensor]]] = {
    "resnet56": resnet56_state, "resnet50": resnet50_state}


# ---------------------------------------------------------------------------- the reference's round
def loop_entropy(x: torch.Tensor, bins: int = 10) -> float:
    """The reference's way: a Python loop over bins, one masked comparison pass over the tensor per bin
    (here with the maximum counted in the last bin, so that it agrees with hpcgraft's definition)."""
    x = x.reshape(-1)
    lo, hi = x.min(), x.max()
    width = (hi - lo) / bins
    h = 0.0
    for k in range(bins):
        upper = (x <= hi) if k == bins - 1 else (x < lo + (k + 1) * width)
        p = float(torch.sum((x >= lo + k * width) & upper, dtype=torch.float)) / x.numel()
        if p > 0:
            h -= p * math.log(p)
    return h


def loop_entropies(state: dict[str, torch.Tensor], plan: list[grafting.LayerGroup]) -> list[float]:
    return [loop_entropy(state[g.anchor]) for g in plan]


def file_round(state: dict[str, torch.Tensor], plan: list[grafting.LayerGroup], comm: MPI.Comm, folder: Path,
               rnd: int) -> None:
    """Save, wait for the peer's file (barrier: no polling sleeps), load, entropies by loop, mix."""
    rank, size = comm.Get_rank(), comm.Get_size()
    torch.save({"net": state}, folder / f"ckpt{rank}_{rnd % 2}.t7")  # two names: no disk growth
    with paused():
        comm.Barrier()
    peer = torch.load(folder / f"ckpt{(rank - 1) % size}_{rnd % 2}.t7", weights_only=True)["net"]
    h_self, h_peer = loop_entropies(state, plan), loop_entropies(peer, plan)
    mixed = dict(state)
    for g, hs, hp in zip(plan, h_self, h_peer, strict=True):
        w = grafting.coefficient(hs, hp)
        for k in g.members:
            mixed[k] = state[k] * w + peer[k] * (1 - w)
    for k, v in mixed.items():  # what load_state_dict does
        state[k].copy_(v)


# ---------------------------------------------------------------------------------------- timing
class Clock:
    """Wall time with named pauses (the barrier that stands in for the reference's polling)."""

    excluded = 0.0


@contextmanager
def paused() -> Iterator[None]:
    t = time.perf_counter()
    yield
    Clock.excluded += time.perf_counter() - t


def sync() -> None:
    """Wait for the GPU (when there is one): its work is asynchronous, and a timing must include it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fns: dict[str, Callable[[], object]], comm: MPI.Comm, repeats: int) -> dict[str, float]:
    """Median seconds of each function, minus paused time. The functions take turns (in alternating
    order) so that a change in the machine's load hits all of them alike; all ranks start together."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        for key in list(fns)[:: 1 if i % 2 else -1]:
            sync()
            comm.Barrier()
            Clock.excluded = 0.0
            t = time.perf_counter()
            fns[key]()
            sync()
            times[key].append(time.perf_counter() - t - Clock.excluded)
    return {k: statistics.median(v) for k, v in times.items()}


def slowest(comm: MPI.Comm, value: float) -> float:
    return max(comm.allgather(value))


# --------------------------------------------------------------------------------------- benchmark
def bench_model(name: str, comm: MPI.Comm, repeats: int, folder: Path, device: torch.device) -> dict[str, float]:
    rank = comm.Get_rank()
    state = {k: v.to(device) for k, v in MODELS[name](1000 + rank).items()}
    plan = grafting.plan_layers(state)
    ex = GraftExchange(state, comm, grafting.GraftMath(level="layer"), topology="ring")
    succ, pred = (rank + 1) % comm.Get_size(), (rank - 1) % comm.Get_size()
    r = {"params": sum(t.numel() for t in ex.tensors), "bytes": ex.packed.nbytes}
    send = torch.ones(ex.packed.nbytes, dtype=torch.uint8).numpy()
    recv = torch.zeros(ex.packed.nbytes, dtype=torch.uint8).numpy()
    few = max(1, repeats // 3) if r["params"] > 5e6 else repeats  # the slow parts of the big model
    rounds = iter(range(2 * repeats))
    fns = {
        "a_round": ex.graft,
        "a_transfer": lambda: ex.packed.sendrecv(comm, succ, pred),  # staging copy included
        "a_send": lambda: ex.packed.sendrecv(comm, succ, pred, staged=True),  # as in the round, after the check
        "b_sendrecv": lambda: comm.Sendrecv(send, dest=succ, recvbuf=recv, source=pred),
        "c_round": lambda: file_round(state, plan, comm, folder, next(rounds)),
    }
    for fn in fns.values():  # warm-up: first touch of buffers and files
        fn()
    r.update({k: slowest(comm, v) for k, v in timed({k: fns[k] for k in ("a_transfer", "a_send", "b_sendrecv")},
                                                     comm, repeats).items()})
    r.update({k: slowest(comm, v) for k, v in timed({k: fns[k] for k in ("a_round", "c_round")}, comm,
                                                     few).items()})

    # entropy of all layers, one thread, rank 0 alone
    r["h_ours"] = r["h_loop"] = r["h_maxdiff"] = float("nan")
    if rank == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        r.update(timed({"h_ours": lambda: grafting.layer_entropies(state, plan),
                        "h_loop": lambda: loop_entropies(state, plan)}, MPI.COMM_SELF, few))
        ours = torch.stack(grafting.layer_entropies(state, plan)).double().cpu()
        r["h_maxdiff"] = float((ours - torch.tensor(loop_entropies(state, plan), dtype=torch.float64)).abs().max())
        torch.set_num_threads(threads)
    idle_barrier(comm)
    return r


def idle_barrier(comm: MPI.Comm) -> None:
    """A barrier that sleeps instead of spinning (MPICH's spins), so waiting ranks leave the cores to
    the one that measures."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.005)


def report(results: dict[str, dict[str, float]]) -> str:
    ms = lambda s: f"{s * 1e3:9.1f}"  # noqa: E731
    lines = [
        f"one graft round, K={RANKS} ranks on this machine, torch threads/rank={torch.get_num_threads()}, "
        "median of repeats, slowest rank (ms)",
        "",
        f"{'model':<16}{'params':>11}{'MB':>8} | {'(a) round':>10}{'(a) xfer':>10}{'(b) raw':>10}"
        f"{'(c) file':>10} | {'xfer a/b':>9}{'round c/a':>10}",
    ]
    for name, r in results.items():
        lines.append(
            f"{name:<16}{int(r['params']):>11,}{r['bytes'] / 2**20:8.1f} | {ms(r['a_round']):>10}"
            f"{ms(r['a_transfer']):>10}{ms(r['b_sendrecv']):>10}{ms(r['c_round']):>10} | "
            f"{r['a_transfer'] / r['b_sendrecv']:9.2f}{r['c_round'] / r['a_round']:10.1f}")
    lines += ["", "(a) xfer = GraftExchange's ring transfer (PackedTensors.sendrecv): copy of the small tensors into "
              "one block, that block as one message, the large tensors (>= 1 MiB) as messages from their own storage.",
              "In the round the copy doubles as the input of the NaN/Inf check, so the round's transfer is only:"]
    lines += [f"  {name}: {ms(r['a_send']).strip()} ms (send / raw = {r['a_send'] / r['b_sendrecv']:.2f})"
              for name, r in results.items()]
    lines += ["", "entropy of all layers, one thread, rank 0 (ms):",
              f"{'model':<16}{'ours':>10}{'bin loop':>10}{'loop/ours':>10}{'max |dH|':>11}"]
    lines += [f"{name:<16}{ms(r['h_ours'])}{ms(r['h_loop']):>10}{r['h_loop'] / r['h_ours']:10.1f}"
              f"{r['h_maxdiff']:11.1e}" for name, r in results.items()]
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    rs = results.values()
    worst = lambda key: max(r[key] / r["b_sendrecv"] for r in rs)  # noqa: E731
    lines += ["", "targets:",
              f"  transfer (a) within 1.5x of (b): with the staging copy {met(worst('a_transfer') <= 1.5)} "
              f"(worst {worst('a_transfer'):.2f}x); the round's send {met(worst('a_send') <= 1.5)} "
              f"(worst {worst('a_send'):.2f}x)",
              f"  round (a) >= 5x faster than (c): {met(all(r['c_round'] >= 5 * r['a_round'] for r in rs))} "
              f"(worst {min(r['c_round'] / r['a_round'] for r in rs):.1f}x)",
              f"  entropy >= 4x faster than the loop: {met(all(r['h_loop'] >= 4 * r['h_ours'] for r in rs))} "
              f"(worst {min(r['h_loop'] / r['h_ours'] for r in rs):.1f}x)"]
    try:
        lines.append(f"  (load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    except OSError:
        pass
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: the GPU of the local rank")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:  # imported and called without a launcher
        return relaunch(sys.argv[1:] if argv is None else argv)
    if comm.Get_size() != RANKS:
        print(f"bench_graft: runs on {RANKS} ranks, got {comm.Get_size()}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.Get_size()))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", comm.Get_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
        if comm.Get_rank() == 0:
            print(f"bench_graft: states on {torch.cuda.get_device_name(device)} "
                  f"({torch.cuda.device_count()} GPU(s) for {comm.Get_size()} ranks)", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="bench_graft_")) if comm.Get_rank() == 0 else None
    folder = Path(comm.bcast(str(folder)))
    try:
        results = {name: bench_model(name, comm, args.repeats, folder, device) for name in args.models}
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)
    if comm.Get_rank() == 0:
        print(report(results), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
