"""The peers one rank hosts (:class:`PeerSet`), and their optimizer steps (:func:`take_steps`).

A rank hosts P peers, a contiguous block of the run's K (``graft.peers``); they take every optimizer step
together, one after another, each with its own data, optimizer, schedule and random streams, so that a
peer computes the same numbers whichever rank hosts it and whichever peers share that rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hpcgraft.comm.exchange import GraftExchange, RoundResult
from hpcgraft.comm.failure import Watchdog
from hpcgraft.comm.logits import PeerLogits
from hpcgraft.comm.peerset import PeerSetExchange
from hpcgraft.comm.world import World
from hpcgraft.config import Config
from hpcgraft.method.cultivation import distillation_loss, mean_of_others
from hpcgraft.models import dgconv
from hpcgraft.training.batched import BatchedPeers, cultivation_loss
from hpcgraft.training.monitors import bn_l1_step
from hpcgraft.training.peer import Peer, Progress

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class PeerSet:
    """This rank's peers, in peer order, and what they share: the world, the device, the watchdog, the
    grafting exchange and the logits gather of cultivation. Their progress counters move together;
    :attr:`progress` is the first peer's."""

    peers: list[Peer]
    exchange: PeerSetExchange | GraftExchange | None = None
    graft_rows: list[dict[str, Any]] = field(default_factory=list)  # rank 0: the rounds not yet logged
    batched: BatchedPeers | None = None  # train.batched: the peers' models and optimizers stepped as one

    @property
    def first(self) -> Peer:
        return self.peers[0]

    @property
    def cfg(self) -> Config:
        return self.first.cfg

    @property
    def world(self) -> World:
        return self.first.world

    @property
    def device(self) -> torch.device:
        return self.first.device

    @property
    def watchdog(self) -> Watchdog:
        return self.first.watchdog

    @property
    def logits(self) -> PeerLogits | None:
        return self.first.logits

    @property
    def progress(self) -> Progress:
        return self.first.progress

    @property
    def indices(self) -> list[int]:
        return [p.index for p in self.peers]

    def graft_round(self) -> list[RoundResult]:
        """One grafting round of every hosted peer (a replica group's single peer shards it over the group)."""
        assert self.exchange is not None
        result = self.exchange.graft(on_wait=self.watchdog.guard)
        return result if isinstance(result, list) else [result]


def as_set(peers: Peer | PeerSet) -> PeerSet:
    """A lone peer (a tool's, or the pruning command's) as the set of one its rank hosts."""
    return peers if isinstance(peers, PeerSet) else PeerSet([peers], exchange=peers.exchange)


def autocast(peer: Peer, x: torch.Tensor) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU with ``dist.amp``; otherwise no context at all (even a disabled one costs
    microseconds per step)."""
    if peer.cfg.dist.amp and x.is_cuda:
        return torch.autocast(x.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def take_steps(ps: PeerSet, batches: list[Batch]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One optimizer step of every hosted peer on its batch: the one place where the rank's peers step, one
    after another, or all at once with ``train.batched``. Returns each peer's (loss, logits, labels), detached."""
    inputs = [_to_device(p, x, y) for p, (x, y) in zip(ps.peers, batches, strict=True)]
    if ps.batched is not None:
        return _take_batched_steps(ps, inputs)
    if ps.logits is None:
        out = []
        for peer, (x, y) in zip(ps.peers, inputs, strict=True):
            with peer.running():
                logits = _forward(peer, x)
                out.append(_finish(peer, x, logits, y, None))
        return out
    # Cultivation distils every peer towards the others' predictions of the same step: all forwards first.
    logits = []
    for peer, (x, _) in zip(ps.peers, inputs, strict=True):
        with peer.running():
            logits.append(_forward(peer, x))
    with ps.watchdog.guard("cultivation: Allgather of logits"):
        everyone = ps.logits.gather(torch.stack([z.detach() for z in logits]))
    out = []
    for peer, (x, y), z in zip(ps.peers, inputs, logits, strict=True):
        target = mean_of_others(everyone, peer.index, peer.cfg.cultivate.temperature)
        with peer.running():
            out.append(_finish(peer, x, z, y, target))
    return out


def _take_batched_steps(ps: PeerSet, inputs: list[Batch]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`take_steps` as one vmapped step (``train.batched``). The models that batch draw no random
    numbers in a step, so the peers' random streams need no switching here."""
    cfg = ps.cfg
    for peer in ps.peers:
        lr = peer.schedule(peer.progress.step)
        for group in peer.optimizer.param_groups:
            group["lr"] = lr
    extra = None
    if ps.logits is not None:
        def everyone(logits: torch.Tensor) -> torch.Tensor:
            with ps.watchdog.guard("cultivation: Allgather of logits"):
                return ps.logits.gather(logits)

        extra = cultivation_loss(everyone, ps.indices, cfg.cultivate.lambda_, cfg.cultivate.temperature)
    def before_update() -> None:
        for peer in ps.peers:
            bn_l1_step(peer.model, cfg)

    xs, ys = [x for x, _ in inputs], [y for _, y in inputs]
    losses, logits = ps.batched.step(xs, ys, label_smoothing=cfg.train.label_smoothing, amp=cfg.dist.amp,
                                     extra_loss=extra, before_update=before_update)
    for peer in ps.peers:
        for hook in peer.after_step:
            hook(peer.model)
    return [(losses[i], logits[i], y) for i, y in enumerate(ys)]


def _to_device(peer: Peer, x: torch.Tensor, y: torch.Tensor) -> Batch:
    x = x.to(peer.device, non_blocking=True)
    y = y.to(peer.device, non_blocking=True)
    if peer.cfg.dist.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _forward(peer: Peer, x: torch.Tensor) -> torch.Tensor:
    lr = peer.schedule(peer.progress.step)
    for group in peer.optimizer.param_groups:
        group["lr"] = lr
    with autocast(peer, x):
        return peer.net(x)


def _finish(peer: Peer, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of the peer's forward (with the distillation ``target``, if any), backward and the step."""
    cfg, model = peer.cfg, peer.model
    with autocast(peer, x):
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.train.label_smoothing)
        if target is not None:
            loss = loss + cfg.cultivate.lambda_ * distillation_loss(logits.float(), target, cfg.cultivate.temperature)
        if cfg.model.dgconv_budget is not None:
            loss = loss * dgconv.budget_scale(model, cfg.model.dgconv_budget, over=cfg.model.dgconv_exponent)
    peer.optimizer.zero_grad()  # sets the gradients to None (Horovod's optimizer takes no arguments here)
    loss.backward()
    bn_l1_step(model, cfg)
    peer.optimizer.step()
    for hook in peer.after_step:
        hook(model)
    return loss.detach(), logits.detach(), y
