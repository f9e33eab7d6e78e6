"""The exchange of several peers hosted on one rank (hpcgraft.comm.peerset), in process on MPI.COMM_SELF:
neighbours on the same rank are read before anyone mixes, and sums run in peer order."""

from __future__ import annotations

import pytest
import torch

from hpcgraft.comm.peerset import PeerSetExchange, ordered_sum
from hpcgraft.method import grafting
from hpcgraft.models import create_model

pytestmark = pytest.mark.process  # a real communicator in this process: MPI.COMM_SELF


@pytest.fixture
def comm():
    from mpi4py import MPI

    return MPI.COMM_SELF


def _states(k: int) -> list[dict[str, torch.Tensor]]:
    states = []
    for i in range(k):
        torch.manual_seed(i)
        states.append(create_model("digits_resnet", num_classes=10).state_dict())
    return states


@pytest.mark.parametrize("level", ["layer", "filter"])
def test_a_ring_on_one_rank_grafts_every_peer_from_its_predecessor_before_it_changed(level, comm):
    states = _states(3)
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    math = grafting.GraftMath(level=level)
    results = PeerSetExchange(states, comm, 0, math, topology="ring").graft()
    assert len(results) == 3 and all(r.report is not None for r in results)
    for i in range(3):
        expected, _ = grafting.graft_state(before[i], before[i - 1], math)  # peer 0 from peer 2, as around a ring
        for key in grafting.member_keys(math.plan(before[i])):
            torch.testing.assert_close(states[i][key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_allreduce_on_one_rank_grafts_from_the_weighted_mean_of_the_others(comm):
    states = _states(3)
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    math = grafting.GraftMath()
    PeerSetExchange(states, comm, 0, math, topology="allreduce").graft()
    plan = math.plan(before[0])
    h = [math.entropies(s, plan) for s in before]
    for i in range(3):
        others = [j for j in range(3) if j != i]
        source = {}
        for g, group in enumerate(plan):
            w = {j: float(h[j][g]) + grafting.WEIGHT_EPS for j in others}
            for key in grafting.member_keys([group]):
                source[key] = sum(w[j] * before[j][key].double() for j in others) / sum(w.values())
        expected, _ = grafting.graft_state(before[i], {**before[i], **{k: v.float() for k, v in source.items()}}, math)
        for key in grafting.member_keys(plan):
            torch.testing.assert_close(states[i][key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_ordered_sum_adds_left_to_right(comm):
    parts = [torch.tensor([1e8], dtype=torch.float32), torch.tensor([1.0]), torch.tensor([-1e8])]
    out = torch.empty(1)
    assert ordered_sum(comm, parts, out)
    assert out.item() == 0.0  # (1e8 + 1) - 1e8 in float32: the 1 is lost; any other order keeps it
