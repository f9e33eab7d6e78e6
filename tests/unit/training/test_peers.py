"""Several peers on one rank: each built and seeded as if it had the rank to itself (its draws afterwards:
tests/unit/training/test_peer_streams.py)."""

from __future__ import annotations

import torch

from hpcgraft.comm.world import World
from hpcgraft.config import load_config
from hpcgraft.training.peer import build_peers
from tests.fakes import SoloComm


def world(peer: int, peers: int, per_rank: int) -> World:
    """One process's view, over a fake COMM_SELF, of a run of ``peers`` peers hosting ``per_rank`` from ``peer`` on."""
    self_ = SoloComm()
    return World(comm=self_, rank=0, size=1, local_rank=0, local_size=1, peer=peer, peers=peers, replica=0,
                 replicas=1, graft_comm=self_, peer_comm=self_, per_rank=per_rank)


def test_peers_built_together_are_the_peers_built_alone():
    """Weights, data order and random streams of peer 1 do not depend on sharing its rank with peer 0, and its
    checkpointed random state is its own, not the process's."""
    cfg = load_config(None, ["graft.mode=none", "dist.threads=1"])
    together = build_peers(cfg, world(0, 2, per_rank=2))
    [alone] = build_peers(cfg, world(1, 2, per_rank=1))
    assert [p.index for p in together] == [0, 1] and alone.index == 1
    one = together[1]
    for a, b in zip(one.model.state_dict().values(), alone.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    (xa, ya), (xb, yb) = (next(iter(p.train_loader.epoch(0))) for p in (one, alone))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    own = one.state_dict()["rng"]["torch"]
    assert torch.equal(own, alone.state_dict()["rng"]["torch"])  # where peer 1 alone leaves the process's stream
    torch.manual_seed(12345)  # the process's stream moves on; the peer's does not
    assert torch.equal(one.state_dict()["rng"]["torch"], own)
    assert not torch.equal(together[0].state_dict()["rng"]["torch"], own)
