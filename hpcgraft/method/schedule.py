"""Learning rates as a pure function of the optimizer step, so a resumed run needs only the step count.

Schedules (docs/method.md, "Diversity"): cosine annealing per step (the reference's diversity option), a
step schedule (x gamma at milestone epochs; the paper's baseline), or constant; an optional linear
warm-up; and ``dlr``, which gives peer i of K the initial rate lr * (1 + cos(pi * (K - i) / K)) / 2.
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcgraft.config import TrainConfig


def peer_base_lr(lr: float, peer: int, peers: int, dlr: bool) -> float:
    """Initial learning rate of ``peer`` (0-based) out of ``peers``; the same for all without ``dlr``."""
    if not dlr:
        return lr
    i = peer + 1
    return lr * (1.0 + math.cos(math.pi * (peers - i) / peers)) / 2.0


class LRSchedule:
    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, peer: int = 0, peers: int = 1) -> None:
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total = max(1, cfg.epochs * self.steps_per_epoch)
        self.base = peer_base_lr(cfg.lr, peer, peers, cfg.dlr)
        self.warmup = cfg.warmup_epochs * self.steps_per_epoch

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based, counted over the whole run)."""
        if step < self.warmup:
            return self.base * (step + 1) / self.warmup
        if self.cfg.schedule == "cosine":
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
            return self.base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if self.cfg.schedule == "step":
            epoch = step // self.steps_per_epoch
            return self.base * self.cfg.gamma ** bisect.bisect_right(sorted(self.cfg.milestones), epoch)
        return self.base
