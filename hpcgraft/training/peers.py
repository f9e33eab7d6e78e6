"""The rank's set of peers (``graft.peers``: P = K / groups of them per rank) and the step they take together.

A rank is only a place where peers run: each :class:`~hpcgraft.training.peer.Peer` keeps its own model,
optimizer, schedule, data order, progress and random streams, and :func:`step_peers` is the one place where
the rank's peers take a training step (one after another; a batched execution of the same step replaces
that function alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hpcgraft.comm.exchange import RoundResult
from hpcgraft.comm.failure import Watchdog
from hpcgraft.comm.logits import PeerLogits
from hpcgraft.comm.peerset import PeerSetExchange
from hpcgraft.comm.world import World
from hpcgraft.method import grafting, seeding
from hpcgraft.method.cultivation import distillation_loss, mean_of_others
from hpcgraft.models import dgconv
from hpcgraft.training.monitors import bn_l1_step
from hpcgraft.training.peer import Peer, make_exchange


@dataclass
class RankPeers:
    """The peers one rank hosts, in peer order, and what they share: the rank's view of the world (its
    block of peers), the cultivation logits, the watchdog and the grafting exchange."""

    peers: list[Peer]
    world: World  # the rank's: ``peer_ids`` its block, ``hosted`` P
    exchange: PeerSetExchange | None = None  # between ranks of one replica each; else each peer's own
    graft_rows: list[dict[str, Any]] = field(default_factory=list)  # rank 0: the rounds' rows not yet logged

    @classmethod
    def of(cls, peer: Peer) -> RankPeers:
        """One peer alone on its rank (tools and commands that build a single peer)."""
        return cls([peer], peer.world)

    @property
    def lead(self) -> Peer:
        """The rank's first peer: whose progress the rank's loop follows (every peer's is the same)."""
        return self.peers[0]

    @property
    def logits(self) -> PeerLogits | None:
        return self.lead.logits

    @property
    def watchdog(self) -> Watchdog:
        return self.lead.watchdog

    def graft_round(self) -> list[RoundResult]:
        """COLLECTIVE: one grafting round, a result per hosted peer."""
        if self.exchange is not None:
            return self.exchange.graft(on_wait=self.watchdog.guard)
        assert self.lead.exchange is not None
        return [self.lead.exchange.graft(on_wait=self.watchdog.guard)]


def make_peer_exchange(host: RankPeers) -> None:
    """The rounds for ``graft.mode``: replicas graft through each peer's own (sharded) exchange, one peer per
    replica group; otherwise the rank's peers graft together (:class:`PeerSetExchange`)."""
    cfg, world = host.lead.cfg, host.world
    if cfg.graft.mode == "none":
        return
    if world.replicas > 1:
        host.lead.exchange = make_exchange(host.lead)
        return
    source_fns = None
    if cfg.graft.mode == "noise":
        source_fns = [_noise_source(peer) for peer in host.peers]
    elif cfg.graft.mode == "self":
        source_fns = [grafting.self_source] * len(host.peers)
    host.exchange = PeerSetExchange([p.model.state_dict() for p in host.peers], world.graft_comm, world.peers,
                                    grafting.GraftMath.from_config(cfg), topology=cfg.graft.topology,
                                    on_nonfinite=cfg.graft.on_nonfinite, source_fns=source_fns)


def _noise_source(peer: Peer):  # noqa: ANN202 - a closure over the peer
    def source(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        gen = seeding.generator(seeding.NOISE, peer.cfg.seed, peer.world.peer, peer.progress.step)
        return grafting.noise_source(tensors, gen)
    return source


# ------------------------------------------------------------------------------------------ one step
Batch = tuple[torch.Tensor, torch.Tensor]
Forward = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # logits, loss, labels


def step_peers(host: RankPeers, batches: Sequence[Batch]) -> list[Forward]:
    """One optimizer step of each of the rank's peers on its own batch; each peer's (logits, loss, labels),
    detached. Peers step one after another; while cultivating, every peer's forward pass comes first (each
    distils towards the others' logits of this step, gathered in peer order over all ranks)."""
    if host.logits is None:
        return [_update(p, *_forward(p, x, y)) for p, (x, y) in zip(host.peers, batches, strict=True)]
    forwards = [_forward(p, x, y) for p, (x, y) in zip(host.peers, batches, strict=True)]
    with host.watchdog.guard("cultivation: Allgather of logits"):
        everyone = host.logits.gather([logits for logits, _, _ in forwards])
    return [_update(p, *f, everyone) for p, f in zip(host.peers, forwards, strict=True)]


def _forward(peer: Peer, x: torch.Tensor, y: torch.Tensor) -> Forward:
    cfg = peer.cfg
    lr = peer.schedule(peer.progress.step)
    for group in peer.optimizer.param_groups:
        group["lr"] = lr
    x = x.to(peer.device, non_blocking=True)
    y = y.to(peer.device, non_blocking=True)
    if cfg.dist.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with peer.streams(), autocast(peer, x):
        logits = peer.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.train.label_smoothing)
    return logits, loss, y


def _update(peer: Peer, logits: torch.Tensor, loss: torch.Tensor, y: torch.Tensor,
            everyone: torch.Tensor | None = None) -> Forward:
    cfg, model = peer.cfg, peer.model
    with peer.streams():
        with autocast(peer, logits):
            if everyone is not None:
                target = mean_of_others(everyone, peer.world.peer, cfg.cultivate.temperature)
                if target is not None:
                    loss = loss + cfg.cultivate.lambda_ * distillation_loss(logits.float(), target,
                                                                            cfg.cultivate.temperature)
            if cfg.model.dgconv_budget is not None:
                loss = loss * dgconv.budget_scale(model, cfg.model.dgconv_budget, over=cfg.model.dgconv_exponent)
        peer.optimizer.zero_grad()  # sets the gradients to None (Horovod's optimizer takes no arguments here)
        loss.backward()
        bn_l1_step(model, cfg)
        peer.optimizer.step()
    for hook in peer.after_step:
        hook(model)
    return logits.detach(), loss.detach(), y


def autocast(peer: Peer, x: torch.Tensor) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU with ``dist.amp``; otherwise no context at all (even a disabled one costs
    microseconds per step)."""
    if peer.cfg.dist.amp and x.is_cuda:
        return torch.autocast(x.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
