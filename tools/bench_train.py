#!/usr/bin/env python
"""Does hpcgraft's training loop cost anything over a bare PyTorch loop?

One process, side by side: the loop of ``hpcgraft.train`` (``train_one_epoch`` of a peer built by
``build_peer``: schedule, device transfer, autocast/channels-last switches, metric sums on the device,
the stop-signal Iallreduce, fault hook) against the loop a user would write (forward, cross-entropy,
zero_grad, backward, SGD step), with the same model and initial weights, batch, optimizer settings and
threads. Three variants per model:

- bare: the plain loop over batches already in memory (the floor);
- hpcgraft (same batches): hpcgraft's loop fed the very same batches: the loop's own overhead;
- hpcgraft (its loader): hpcgraft's loop with its own in-memory loader (gather, random crop and flip,
  normalise every batch), i.e. what a run pays end to end.

Runs alternate (bare, hpcgraft, ...) so a slow moment of a shared machine hits both alike; the figure is
the median over rounds of the per-round ratio of throughputs (bare time / hpcgraft time). Target: >= 0.97.

On a GPU (``--device cuda``) both loops move every batch from pinned host memory to the device, the
clock stops only after the device is done, and ``--amp`` runs both under bf16 autocast. ``resnet50``
trains on ImageNet-shaped synthetic batches (224 px; no reader, so no "its loader" column).

    .venv/bin/python tools/bench_train.py [--rounds 5] [--threads 1] [--models resnet32,digits_resnet]
    python tools/bench_train.py --device cuda --amp on,off --models resnet32,resnet50
    python tools/bench_train.py --device cuda --amp on --channels-last --compile off,default \
        --models resnet50 --batch 256
    python tools/bench_train.py --peers 1,2,4,8 [--models digits_resnet,resnet20] [--device cuda]

``--compile`` compiles hpcgraft's side only (``train.compile``; the warm-up run pays the compile): its ratio
to the eager bare loop is the speed-up a run gets from compiling.

``--peers``: aggregate images/s of P peers on one rank, stepped one after another, batched into one
vmapped step (``train.batched``), and as P single-peer processes started together, each against one
peer's rate in the same run.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import write_cifar10  # noqa: E402

from hpcgraft.comm.failure import StopRequest  # noqa: E402
from hpcgraft.comm.world import init_world  # noqa: E402
from hpcgraft.config import load_config  # noqa: E402
from hpcgraft.models import create_model  # noqa: E402
from hpcgraft.training.batched import BatchedPeers  # noqa: E402
from hpcgraft.training.loop import train_one_epoch  # noqa: E402
from hpcgraft.training.peer import build_peer  # noqa: E402

# model -> (config, batch size, steps per timed run); the paper's CIFAR batch and the digits config's batch.
# "linear" (a linear classifier on the digits, ~0.1 ms a step) makes the loop's own cost per step visible.
CASES = {
    "resnet32": ("configs/cifar10_resnet32.yaml", 128, 4),
    "digits_resnet": ("configs/digits.yaml", 64, 60),
    "linear": ("configs/digits.yaml", 64, 400),
    "resnet50": ("configs/digits.yaml", 64, 10),  # the model swapped in, on synthetic 3x224x224 batches
}
SYNTHETIC = {"resnet50": (3, 224, 1000)}  # channels, pixels, classes of the batches made up for the model
PIXELS = 0  # --pixels: smaller synthetic images for a dry run on the CPU
GPU_STEPS = {"resnet32": 40, "digits_resnet": 200, "linear": 400, "resnet50": 20}  # enough to time a GPU


class SameBatches:
    """A loader that yields the given batches (the loop's interface: ``epoch()`` and ``len()``)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, start: int = 0):  # noqa: ANN201 - an iterator of batches
        return iter(self.batches[start:])


def bare_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list, device: torch.device,
              amp: bool, channels_last: bool = False) -> None:
    model.train()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # no-ops on the CPU
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def synthetic_batches(name: str, batch: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    channels, pixels, classes = SYNTHETIC[name]
    pixels = PIXELS or pixels
    gen = torch.Generator().manual_seed(0)
    pin = torch.cuda.is_available()
    return [(torch.randn(batch, channels, pixels, pixels, generator=gen).pin_memory() if pin else
             torch.randn(batch, channels, pixels, pixels, generator=gen),
             torch.randint(0, classes, (batch,), generator=gen)) for _ in range(steps)]


def measure(name: str, data_root: Path, rounds: int, threads: int, extra: list[str], device: str = "cpu",
            amp: bool = False, compile_mode: str = "off", channels_last: bool = False) -> dict[str, float]:
    config, batch, steps = CASES[name]
    dev = torch.device(device)
    if dev.type == "cuda":
        steps = GPU_STEPS[name]
    overrides = [f"data.batch_size={batch}", f"dist.threads={threads}", f"dist.device={dev.type}",
                 "graft.mode=none", "checkpoint.enabled=false", f"dist.amp={str(amp).lower()}",
                 f"train.compile={compile_mode}", f"dist.channels_last={str(channels_last).lower()}", *extra]
    if "cifar" in config:
        overrides.append(f"data.root={data_root}")
    cfg = load_config(config, overrides)
    world = init_world(1)
    peer = build_peer(cfg, world)
    if name in ("linear", *SYNTHETIC):  # swapped in after the peer is built: it does not fit the config's data
        torch.manual_seed(cfg.seed)
        peer.model = (create_model(name, SYNTHETIC[name][2]) if name in SYNTHETIC else
                      torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))).to(dev)
        if channels_last:
            peer.model = peer.model.to(memory_format=torch.channels_last)
        peer.optimizer = torch.optim.SGD(peer.model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                         weight_decay=cfg.train.weight_decay)
    stop = StopRequest(world.comm)
    own_loader = None if name in SYNTHETIC else peer.train_loader
    # The same batches for everyone, drawn once from hpcgraft's loader (augmented as in training).
    batches = synthetic_batches(name, batch, steps) if own_loader is None else list(itertools.islice(
        itertools.chain.from_iterable(own_loader.epoch(e) for e in itertools.count()), steps))
    same = SameBatches(batches)
    model = copy.deepcopy(peer.model)
    t = cfg.train
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                          nesterov=t.nesterov)

    def hpcgraft_run(loader) -> None:  # noqa: ANN001
        peer.train_loader = loader
        peer.progress.start_epoch()
        train_one_epoch(peer, stop)

    class OwnSteps:  # hpcgraft's own loader, run over as many of its epochs as it takes to make ``steps``
        def __len__(self) -> int:
            return steps

        def epoch(self, epoch: int, start: int = 0):  # noqa: ANN202
            every = itertools.chain.from_iterable(own_loader.epoch(e) for e in itertools.count())
            return itertools.islice(every, steps - start)

    variants = {
        "bare": lambda: bare_loop(model, opt, batches, dev, amp and dev.type == "cuda", channels_last),
        "hpcgraft (same batches)": lambda: hpcgraft_run(same),
        "hpcgraft (its loader)": lambda: hpcgraft_run(OwnSteps()),
    }
    if own_loader is None:
        del variants["hpcgraft (its loader)"]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for run in variants.values():  # warm-up: allocator, kernels (cuDNN's choice too), first Iallreduce
        run()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for key in order:
            sync()
            t0 = time.perf_counter()
            variants[key]()
            sync()
            times[key].append(time.perf_counter() - t0)
    stop.close()
    imgs = steps * batch
    result = {f"{k} img/s": imgs / statistics.median(v) for k, v in times.items()}
    for k in list(variants)[1:]:
        result[f"{k} ratio"] = statistics.median(b / h for b, h in zip(times["bare"], times[k], strict=True))
    for k in list(variants)[1:]:
        result[f"{k} us/step"] = 1e6 * statistics.median(h - b for b, h in zip(times["bare"], times[k],
                                                                                strict=True)) / steps
    result["batch"], result["steps"] = batch, steps
    return result


# ------------------------------------------------------------------------------------------ peers per rank
# The peers-per-rank rows: P models of one architecture on one rank, stepped one after another (as the
# sequential loop does), batched (hpcgraft.training.batched: one vmapped forward/backward, one SGD update),
# and as P separate single-peer processes started together (what a rank per peer costs the same machine).
PEER_CASES = {"digits_resnet": ((1, 8, 8), 64, 30), "resnet20": ((3, 32, 32), 32, 3),
              "resnet32": ((3, 32, 32), 128, 3), "resnet56": ((3, 32, 32), 128, 2)}  # image, batch, CPU steps
PEER_GPU_STEPS = 40


def peer_models(name: str, count: int, device: torch.device) -> tuple[list[torch.nn.Module], list]:
    torch.manual_seed(0)
    models = [create_model(name, 10).to(device) for _ in range(count)]
    return models, [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for m in models]


def peer_batches(name: str, count: int, batch: int, device: torch.device) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(1)
    image = PEER_CASES[name][0]
    return ([torch.randn(batch, *image, generator=gen).to(device) for _ in range(count)],
            [torch.randint(0, 10, (batch,), generator=gen).to(device) for _ in range(count)])


def peer_loop(name: str, count: int, batch: int, steps: int, device: torch.device, amp: bool,
              batched: bool) -> Callable[[], None]:
    """``steps`` training steps of ``count`` peers, one after another or batched."""
    models, opts = peer_models(name, count, device)
    xs, ys = peer_batches(name, count, batch, device)
    if batched:
        peers = BatchedPeers(models, opts)
        return lambda: [peers.step(xs, ys, amp=amp) for _ in range(steps)] and None
    return lambda: [bare_loop(m, o, [(x, y)], device, amp) for _ in range(steps)
                    for m, o, x, y in zip(models, opts, xs, ys, strict=True)] and None


def peer_worker(spec: str) -> None:
    """One single-peer process of the "processes" column: warm up, say ready, wait for go, time its steps,
    print its start and end (wall clock: the parent spans all processes)."""
    name, batch, steps, device, amp = spec.split(",")
    dev = torch.device(device)
    run = peer_loop(name, 1, int(batch), int(steps), dev, amp == "on", batched=False)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    run()
    sync()
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    run()
    sync()
    print(json.dumps({"start": t0, "end": time.time()}), flush=True)


def peer_processes(name: str, count: int, batch: int, steps: int, device: str, amp: bool, threads: int) -> float:
    """Aggregate images/s of ``count`` single-peer processes timed together (first start to last end)."""
    spec = f"{name},{batch},{steps},{device},{'on' if amp else 'off'}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = [subprocess.Popen([sys.executable, __file__, "--threads", str(threads), "--peer-worker", spec],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(count)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a peer process of {name} failed (exit {p.wait()})")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        spans = [json.loads(p.stdout.readline()) for p in procs]
    except BaseException:
        for p in procs:
            p.kill()
        raise
    finally:
        for p in procs:
            p.wait()
    return count * batch * steps / (max(s["end"] for s in spans) - min(s["start"] for s in spans))


def measure_peers(name: str, counts: list[int], rounds: int, device: str, amp: bool, threads: int,
                  batch: int | None, steps: int | None) -> list[dict[str, float]]:
    image, default_batch, cpu_steps = PEER_CASES[name]
    batch = batch or default_batch
    steps = steps or (PEER_GPU_STEPS if device.startswith("cuda") else cpu_steps)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for count in counts:
        runs = {"sequential": peer_loop(name, count, batch, steps, dev, amp, batched=False),
                "batched": peer_loop(name, count, batch, steps, dev, amp, batched=True)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for run in runs.values():
            run()  # warm-up
        for r in range(rounds):
            for key in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                sync()
                t0 = time.perf_counter()
                runs[key]()
                sync()
                times[key].append(time.perf_counter() - t0)
        row = {k: count * batch * steps / statistics.median(v) for k, v in times.items()}
        row["processes"] = statistics.median(peer_processes(name, count, batch, steps, device, amp, threads)
                                             for _ in range(max(1, rounds // 2)))
        rows.append({"peers": count, "batch": batch, "steps": steps, **row})
        del runs
    return rows


def print_peers(name: str, amp: str, rows: list[dict[str, float]]) -> None:
    base = next((r["sequential"] for r in rows if r["peers"] == 1), rows[0]["sequential"] / rows[0]["peers"])
    for r in rows:
        cells = " | ".join(f"{r[k]:>10.1f} {r[k] / base:>5.2f}x" for k in ("sequential", "batched", "processes"))
        print(f"{name:<14} {amp:>3} {r['peers']:>5} {r['batch']:>5} {r['steps']:>5} | {cells}", flush=True)


def main_peers(args: argparse.Namespace) -> None:
    counts = [int(c) for c in args.peers.split(",")]
    print(f"peers per rank: aggregate img/s of P peers and its ratio to one peer's (sequential, P=1) in this run; "
          f"median of {args.rounds} alternating rounds")
    header = (f"{'model':<14} {'amp':>3} {'peers':>5} {'batch':>5} {'steps':>5} | {'sequential':>10} {'ratio':>6} | "
              f"{'batched':>10} {'ratio':>6} | {'processes':>10} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    found = []
    for name in args.models.split(","):
        for amp in args.amp.split(","):
            rows = measure_peers(name, counts, args.rounds, args.device, amp == "on", args.threads, args.batch,
                                 args.steps)
            print_peers(name, amp, rows)
            found += [{"model": name, "amp": amp, **r} for r in rows]
    if args.json:
        args.json.write_text(json.dumps(found, indent=1) + "\n")
    print("sequential: one process steps its P peers one after another; batched: one vmapped step for all P "
          "(hpcgraft.training.batched); processes: P single-peer processes started together, "
          f"{args.threads} thread(s) each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed runs per variant (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-core rates)")
    parser.add_argument("--models", "--model", help=f"comma-separated, of {', '.join(CASES)} (default: all); with "
                        f"--peers, of {', '.join(PEER_CASES)} (default: digits_resnet,resnet20)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for hpcgraft's side, e.g. data.prefetch=0")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--amp", default="off", help="bf16 autocast on the GPU: off (default), on, or on,off")
    parser.add_argument("--compile", default="off",
                        help="train.compile of hpcgraft's side (the bare loop stays eager): off (default), default, "
                             "reduce-overhead, max-autotune, or several, e.g. off,default")
    parser.add_argument("--channels-last", action="store_true", help="both loops in NHWC (dist.channels_last)")
    parser.add_argument("--steps", type=int, help="steps per timed run (default: per model and device)")
    parser.add_argument("--batch", type=int, help="batch size (default: per model)")
    parser.add_argument("--pixels", type=int, default=0, help="size of the synthetic images (default 224)")
    parser.add_argument("--peers", help="peers-per-rank rows instead, for these peer counts, e.g. 1,2,4,8")
    parser.add_argument("--json", type=Path, help="with --peers: the rows also as JSON, into this file")
    parser.add_argument("--peer-worker", help=argparse.SUPPRESS)  # one process of the "processes" column
    args = parser.parse_args()
    if args.peer_worker:
        torch.set_num_threads(args.threads)
        peer_worker(args.peer_worker)
        return
    args.models = args.models or ("digits_resnet,resnet20" if args.peers else ",".join(CASES))
    known = PEER_CASES if args.peers else CASES
    unknown = [m for m in args.models.split(",") if m not in known]
    if unknown:
        parser.error(f"--models {unknown[0]}: not a case{' of --peers' if args.peers else ''}; use "
                     f"{', '.join(known)}")
    global PIXELS
    PIXELS = args.pixels
    for name, (config, batch, steps) in list(CASES.items()):  # a dry run (tools/gpu_check.sh --cpu) shrinks them
        CASES[name] = (config, args.batch or batch, args.steps or steps)
        GPU_STEPS[name] = args.steps or GPU_STEPS[name]
    os.chdir(Path(__file__).resolve().parent.parent)  # the configs are relative to the repository
    torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{os.cpu_count()} cores"
    print(f"torch {torch.__version__}, {args.device} ({device}), {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}; median of {args.rounds} alternating rounds"
          f"{'; ' + ' '.join(args.set) if args.set else ''}")
    if args.peers:
        main_peers(args)
        return
    header = (f"{'model':<14} {'amp':>3} {'compile':>15} {'batch':>5} {'steps':>5} | {'bare img/s':>10} "
              f"{'same batches':>12} {'ratio':>6} {'+us/step':>8} | {'its loader':>10} {'ratio':>6} {'+us/step':>8}")
    print(header)
    print("-" * len(header))
    cell = lambda r, key, fmt: format(r[key], fmt) if key in r else "-"  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="hpcgraft-bench-") as tmp:
        write_cifar10(Path(tmp) / "cifar-10-batches-py", per_file=1000)
        for name in args.models.split(","):
            for amp, mode in itertools.product(args.amp.split(","), args.compile.split(",")):
                r = measure(name, Path(tmp), args.rounds, args.threads, args.set, args.device, amp == "on", mode,
                            args.channels_last)
                print(f"{name:<14} {amp:>3} {mode:>15} {r['batch']:>5} {r['steps']:>5} | {r['bare img/s']:>10.1f} "
                      f"{r['hpcgraft (same batches) img/s']:>12.1f} {r['hpcgraft (same batches) ratio']:>6.3f} "
                      f"{r['hpcgraft (same batches) us/step']:>8.0f} | "
                      f"{cell(r, 'hpcgraft (its loader) img/s', '>10.1f'):>10} "
                      f"{cell(r, 'hpcgraft (its loader) ratio', '>6.3f'):>6} "
                      f"{cell(r, 'hpcgraft (its loader) us/step', '>8.0f'):>8}", flush=True)
    print("ratio: bare time / hpcgraft time per round (1.0 = no overhead; target >= 0.97; compiled rows: the "
          "speed-up over the eager bare loop); +us/step: hpcgraft's extra time per step (medians over rounds)"
          + ("; channels-last" if args.channels_last else ""))


if __name__ == "__main__":
    main()
