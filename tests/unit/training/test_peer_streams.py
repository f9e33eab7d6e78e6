"""A rank's peers draw from their own random streams (Peer.running), so a peer's numbers and its checkpointed
generators do not depend on which peers share its rank."""

from __future__ import annotations

import random

import numpy as np
import torch

from hpcgraft.method import seeding
from hpcgraft.training.peer import Peer, rng_state

CPU = torch.device("cpu")


def _peer(seed: int, own_streams: bool) -> Peer:
    seeding.seed_everything(seed)
    return Peer(None, None, CPU, None, None, None, None, None, None, None, None, None,  # type: ignore[arg-type]
                rng=rng_state(CPU) if own_streams else None)


def _draw() -> tuple[float, float, float]:
    return float(torch.rand(())), float(np.random.rand()), random.random()


def test_interleaved_peers_draw_what_each_draws_alone():
    alone = []
    for seed in (1, 2):
        seeding.seed_everything(seed)
        alone.append([_draw() for _ in range(3)])
    a, b = _peer(1, True), _peer(2, True)
    seeding.seed_everything(99)  # whatever the process's generators hold meanwhile
    got: list[list] = [[], []]
    for _ in range(3):
        for i, peer in enumerate((a, b)):
            with peer.running():
                got[i].append(_draw())
    assert got == alone
    assert not torch.equal(a.rng["torch"], b.rng["torch"])  # each keeps its own stream, advanced by its draws


def test_the_only_peer_of_a_rank_uses_the_process_generators():
    peer = _peer(3, False)
    with peer.running():
        first = _draw()
    seeding.seed_everything(3)
    assert _draw() == first and peer.rng is None
