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

``--compile`` compiles hpcgraft's side only (``train.compile``; the warm-up run pays the compile): its ratio
to the eager bare loop is the speed-up a run gets from compiling.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import write_cifar10  # noqa: E402

from hpcgraft.comm.failure import StopRequest  # noqa: E402
from hpcgraft.comm.world import init_world  # noqa: E402
from hpcgraft.config import load_config  # noqa: E402
from hpcgraft.models import create_model  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed runs per variant (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-core rates)")
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
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
    args = parser.parse_args()
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
