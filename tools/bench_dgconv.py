#!/usr/bin/env python
"""What does DGConv cost per training step? A DGConv ResNet-20 against the plain one, side by side.

The masked dense conv does the same convolution arithmetic as the plain conv; the extra work is the
mask (K Kronecker products per layer) and one elementwise W * U per layer and step, forward and
backward. If that overhead were large, an eval-time grouped conv (``groups=``) for block-diagonal masks
would be worth building; this measures whether it is. Steps alternate (plain, DGConv, ...) so a slow
moment of a shared machine hits both; the figure is the median over rounds of the per-round ratio
DGConv time / plain time (training step: forward, cross-entropy, backward, SGD step; eval: forward only).

    .venv/bin/python tools/bench_dgconv.py [--rounds 7] [--steps 5] [--batch 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hpcgraft.models import create_model
from hpcgraft.models.dgconv import apply_dgconv


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def eval_step() -> None:
        with torch.no_grad():
            model(x)

    model.train(train)
    return train_step if train else eval_step


def timed(fn: Callable[[], None], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = create_model("resnet20", 10)
    dg = create_model("resnet20", 10)
    dg.load_state_dict(plain.state_dict())
    apply_dgconv(dg)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    for mode in ("train", "eval"):
        fns = [step_fn(m, x, y, mode == "train") for m in (plain, dg)]
        for fn in fns:  # warm-up
            fn()
        ratios, times = [], []
        for _ in range(args.rounds):
            t_plain, t_dg = (timed(fn, args.steps) for fn in fns)
            ratios.append(t_dg / t_plain)
            times.append((t_plain / args.steps, t_dg / args.steps))
        ms_plain = statistics.median(t[0] for t in times) * 1e3
        ms_dg = statistics.median(t[1] for t in times) * 1e3
        print(f"{mode:5s} step, ResNet-20, batch {args.batch}, {args.threads} thread(s): plain {ms_plain:.1f} ms, "
              f"DGConv {ms_dg:.1f} ms, ratio DGConv/plain {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
