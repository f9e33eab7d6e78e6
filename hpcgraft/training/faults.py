"""Test hook: HPCGRAFT_INJECT="RANK:STEP:WHAT[,...]" makes world rank RANK, right after optimizer step
STEP, raise an exception (WHAT=raise), stall (sleep), fill its first weight tensor with NaN (nan) or send
itself SIGUSR1, SIGTERM or SIGINT (usr1, term, int: Ctrl-C). The end-to-end tests cause failures at an
exact point with it.

The variable is read once, when a run starts; unset, the loop holds no hook at all, so a production step
pays nothing for it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import torch
from torch import nn

ENV = "HPCGRAFT_INJECT"
WHATS = ("raise", "sleep", "nan", "usr1", "term", "int")
_SIGNALS = {"usr1": signal.SIGUSR1, "term": signal.SIGTERM, "int": signal.SIGINT}


def fault_hook(rank: int, spec: str | None = None) -> Callable[[nn.Module, int], None] | None:
    """The injector for this rank (called with the model and the step just done), or None when no fault
    is planned for it."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    planned: dict[int, list[str]] = {}
    for item in filter(None, spec.split(",")):
        at_rank, step, what = item.split(":")
        if what not in WHATS:
            raise ValueError(f"{ENV}: unknown fault {what!r}; use {', '.join(WHATS)}")
        if int(at_rank) == rank:
            planned.setdefault(int(step), []).append(what)
    if not planned:
        return None

    def inject(model: nn.Module, step: int) -> None:
        for what in planned.get(step, ()):
            if what == "raise":
                raise RuntimeError(f"injected failure at step {step} ({ENV})")
            if what == "sleep":
                time.sleep(3600)
            elif what == "nan":
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            else:
                os.kill(os.getpid(), _SIGNALS[what])

    return inject
