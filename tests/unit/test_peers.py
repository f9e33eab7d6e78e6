"""Several peers on one rank: each built, seeded and grafted as if it had the rank to itself."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI
from torch import nn

from hpcgraft.comm.peerset import PeerSetExchange
from hpcgraft.comm.world import World, check_peer_layout
from hpcgraft.config import load_config
from hpcgraft.errors import LayoutError
from hpcgraft.method import grafting
from hpcgraft.training.peer import build_peer, build_peers


def world(peer: int, peers: int, hosted: int) -> World:
    """One process's view, over COMM_SELF, of a run of ``peers`` peers hosting ``hosted`` from ``peer`` on."""
    self_ = MPI.COMM_SELF
    return World(comm=self_, rank=0, size=1, local_rank=0, local_size=1, peer=peer, peers=peers, replica=0,
                 replicas=1, graft_comm=self_, peer_comm=self_, hosted=hosted)


def test_peers_built_together_are_the_peers_built_alone():
    """Weights, data order and random streams of peer 1 do not depend on sharing its rank with peer 0, and its
    checkpointed random state is its own, not the process's."""
    cfg = load_config(None, ["graft.mode=none", "dist.threads=1"])
    together = build_peers(cfg, world(0, 2, hosted=2))
    alone = build_peer(cfg, world(1, 2, hosted=1))
    assert [p.world.peer for p in together] == [0, 1]
    one, other = together[1], alone
    for a, b in zip(one.model.state_dict().values(), other.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    (xa, ya), (xb, yb) = (next(iter(p.train_loader.epoch(0))) for p in (one, other))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    own = one.state_dict()["rng"]["torch"]
    assert torch.equal(own, other.state_dict()["rng"]["torch"])  # where peer 1 alone leaves the process's stream
    torch.manual_seed(12345)  # the process's stream moves on; the peer's does not
    assert torch.equal(one.state_dict()["rng"]["torch"], own)
    assert not torch.equal(together[0].state_dict()["rng"]["torch"], own)
    with one.streams():  # the peer draws from its own stream, and keeps where it got to
        drawn = torch.rand(3)
    torch.set_rng_state(own)
    assert torch.equal(torch.rand(3), drawn)
    assert not torch.equal(one.state_dict()["rng"]["torch"], own)


def small_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("level", ["layer", "filter"])
def test_a_rank_of_peers_grafts_each_from_its_predecessor_in_the_ring(level):
    """Four peers on one rank: peer i from peer i-1 as it was before the round (peer 0 from peer 3), each the
    graft of its pair done offline."""
    before = [small_state(seed) for seed in range(4)]
    states = [{k: v.clone() for k, v in s.items()} for s in before]
    math = grafting.GraftMath(level=level)
    results = PeerSetExchange(states, MPI.COMM_SELF, 4, math).graft()
    for i, (state, result) in enumerate(zip(states, results, strict=True)):
        expected, report = grafting.graft_state(before[i], before[i - 1], math)
        assert result.report is not None and result.report.alpha_mean == pytest.approx(report.alpha_mean)
        for k in state:
            torch.testing.assert_close(state[k], expected[k], rtol=0, atol=1e-6, msg=f"peer {i} {k}")


def test_a_non_finite_peer_is_skipped_by_its_successor_and_itself():
    states = [small_state(seed) for seed in range(3)]
    next(iter(states[1].values())).fill_(float("nan"))
    results = PeerSetExchange(states, MPI.COMM_SELF, 3, topology="allreduce").graft()
    assert [r.report is None for r in results] == [False, True, False]
    assert all(r.nonfinite_peers == (1,) for r in results)
    assert all(torch.isfinite(t).all() for i in (0, 2) for t in states[i].values() if t.is_floating_point())


def test_layouts_that_cannot_be_are_one_line():
    assert check_peer_layout(4, 1, None) == 1 and check_peer_layout(2, 1, 8) == 4
    with pytest.raises(LayoutError, match=r"^graft\.peers=6 peers cannot be shared evenly by 4 ranks; start one of "
                                          r"1, 2, 3, 6 ranks \(mpirun -np N\) or set graft\.peers to a multiple of 4$"):
        check_peer_layout(4, 1, 6)
    with pytest.raises(LayoutError, match=r"^graft\.peers=4 on 4 ranks with dist\.replicas=2 puts 2 peers on each "
                                          r"replica group, and replicas train one peer each; start mpirun -np 8 or "
                                          r"set dist\.replicas=1$"):
        check_peer_layout(4, 2, 4)
