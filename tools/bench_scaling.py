#!/usr/bin/env python
"""What does grafting cost per epoch, and how do K = 2, 3, 4 peers share this machine?

1. Graft share, the paper's CIFAR configs (configs/cifar10_*.yaml: model, level, topology as there):
   one graft round (``GraftExchange.graft``, the code the training loop calls) under ``mpirun -np K``,
   K = 2, 3, 4, median of repeats on the slowest rank, against a full CIFAR epoch of the same model on
   this CPU (391 steps of batch 128, the step timed on one rank alone). The round must stay under 1 % of
   the epoch. For accelerators, where epochs are far shorter, the table gives the break-even epoch:
   100 x the round, the shortest epoch for which one round per epoch stays under 1 %.
2. Scaling: the real ``python -m hpcgraft.train`` (ResNet-32, batch 128, synthetic CIFAR-10 of a few
   steps per epoch, 2 epochs, one graft at the end of epoch 1) under ``mpirun -np K``, K = 2, 3, 4:
   per-rank and total training images/s (metrics.jsonl) and the graft round's wall time (graft.jsonl).
   With 2 cores, K > 2 oversubscribes: ranks get 1 thread each and share the cores, so per-rank
   throughput falls as 2/K while the total stays flat; a rank waiting in MPI also spins on a core.

    .venv/bin/python tools/bench_scaling.py [--peers 2 3 4] [--repeats 5] [--models resnet32 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import write_cifar10  # noqa: E402

from hpcgraft.config import Config, load_config  # noqa: E402
from hpcgraft.models import create_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"resnet32": "cifar10_resnet32", "resnet56": "cifar10_resnet56", "resnet110": "cifar10_resnet110",
           "mobilenetv2": "cifar10_mobilenetv2", "vgg16": "cifar10_vgg16"}
EPOCH_STEPS = 50000 // 128  # a CIFAR-10 epoch at the paper's batch (incomplete last batch dropped)


def paper_config(name: str) -> Config:
    return load_config(ROOT / "configs" / f"{CONFIGS[name]}.yaml")


def mpirun() -> str:
    local = Path(sys.executable).parent / "mpirun"
    found = str(local) if local.exists() else shutil.which("mpirun")
    if found is None:
        sys.exit("bench_scaling: mpirun not found; run `make setup` first")
    return found


# ------------------------------------------------------------------ part 1, inside mpirun: graft rounds
def rounds_main(models: list[str], repeats: int, out: str) -> None:
    from mpi4py import MPI

    from hpcgraft.comm.exchange import GraftExchange
    from hpcgraft.method.grafting import GraftMath

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    torch.set_num_threads(1)
    result = {}
    for name in models:
        cfg = paper_config(name)
        g = cfg.graft
        torch.manual_seed(100 + rank)
        state = create_model(cfg.model.name, 10).state_dict()
        ex = GraftExchange(state, comm, GraftMath.from_config(cfg), topology=g.topology)
        ex.graft()  # warm-up
        times = []
        for _ in range(repeats):
            comm.Barrier()
            t0 = time.perf_counter()
            ex.graft()
            times.append(time.perf_counter() - t0)
        result[name] = max(comm.allgather(statistics.median(times)))
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def step_seconds(name: str, steps: int = 2) -> float:
    """One training step (forward, backward, SGD) of the config's model at batch 128, one thread."""
    model = create_model(paper_config(name).model.name, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def graft_share(models: list[str], peers: list[int], repeats: int, tmp: Path) -> None:
    torch.set_num_threads(1)
    epoch = {name: step_seconds(name) * EPOCH_STEPS for name in models}
    rounds: dict[int, dict[str, float]] = {}
    for k in peers:
        out = tmp / f"rounds-{k}.json"
        subprocess.run([mpirun(), "-np", str(k), sys.executable, __file__, "--rounds-only", str(out),
                        "--repeats", str(repeats), "--models", *models], check=True, cwd=ROOT)
        rounds[k] = json.loads(out.read_text())
    print(f"\n1. graft round vs a CIFAR-10 epoch ({EPOCH_STEPS} steps x 128) on this CPU, one thread per rank")
    head = f"{'config':<20} {'level':<6} {'CPU epoch s':>11} |" + "".join(
        f" {f'K={k} round ms':>13} {'share':>7} {'break-even s':>12} |" for k in peers)
    print(head)
    print("-" * len(head))
    for name in models:
        level = paper_config(name).graft.level
        cells = "".join(f" {rounds[k][name] * 1e3:>13.1f} {100 * rounds[k][name] / epoch[name]:>6.3f}% "
                        f"{100 * rounds[k][name]:>12.2f} |" for k in peers)
        print(f"{CONFIGS[name]:<20} {level:<6} {epoch[name]:>11.0f} |{cells}", flush=True)
    print("share: round / CPU epoch; break-even: the shortest epoch (s) for which one round stays under 1 % "
          "(a GPU epoch longer than this keeps grafting under 1 %)")


# -------------------------------------------------------------------------- part 2: real training runs
def scaling(peers: list[int], tmp: Path, steps: int) -> None:
    data = tmp / "cifar"
    write_cifar10(data / "cifar-10-batches-py", per_file=steps * 128 // 5 + 1)
    print(f"\n2. python -m hpcgraft.train, resnet32, batch 128, {steps} steps/epoch, 2 epochs, graft after epoch 1")
    head = (f"{'K':>2} {'threads/rank':>12} {'img/s per rank':>14} {'img/s total':>11} {'graft round s':>13} "
            f"{'round / epoch':>13}")
    print(head)
    print("-" * len(head))
    for k in peers:
        out = tmp / f"run-{k}"
        cmd = [mpirun(), "-np", str(k), sys.executable, "-m", "hpcgraft.train", "--config",
               "configs/cifar10_resnet32.yaml", "--out", str(out), f"data.root={data}", "train.epochs=2",
               "checkpoint.enabled=false", "data.test_batch_size=128", "log.progress=off"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"bench_scaling: K={k} failed:\n{r.stderr[-2000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first = [row for row in rows if row["epoch"] == 1 and row["peer"] is not None]
        rates = [steps * 128 / row["seconds"] for row in first]
        grafts = [json.loads(line) for line in (out / "graft.jsonl").read_text().splitlines()]
        round_s = max(g["seconds"] for g in grafts)
        epoch_s = max(row["seconds"] for row in first)
        threads = max(1, len(os.sched_getaffinity(0)) // k)
        print(f"{k:>2} {threads:>12} {statistics.mean(rates):>14.1f} {sum(rates):>11.1f} {round_s:>13.3f} "
              f"{100 * round_s / (epoch_s * EPOCH_STEPS / steps):>12.3f}%", flush=True)
    print(f"round / epoch: the graft round against a full {EPOCH_STEPS}-step epoch at the measured rate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=5, help="graft rounds timed per model and K (median)")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=4, help="training steps per epoch in part 2 (default 4)")
    parser.add_argument("--skip-share", action="store_true", help="only part 2")
    parser.add_argument("--rounds-only", metavar="JSON", help=argparse.SUPPRESS)  # part 1's mpirun ranks
    args = parser.parse_args()
    if args.rounds_only:
        rounds_main(args.models, args.repeats, args.rounds_only)
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="hpcgraft-bench-") as tmp:
        if not args.skip_share:
            graft_share(args.models, args.peers, args.repeats, Path(tmp))
        scaling(args.peers, Path(tmp), args.steps)


if __name__ == "__main__":
    main()
