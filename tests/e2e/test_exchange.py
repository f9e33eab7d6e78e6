"""The MPI grafting exchange under real ``mpirun -np 2`` and ``-np 3``, checked against the offline math.

Each rank of a real MPI job runs a list of scenarios and saves its state before and after the round;
the tests here recompute every peer's result offline from the saved pre-round states with
:func:`hpcgraft.method.grafting.graft_state` (ring: the same bits; allreduce: the same values up to rounding).
This file is also the rank script: ``mpirun -np K python tests/test_exchange.py OUT_DIR``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from hpcgraft.method import grafting
from tests._util import env
from tests.reference import entropy_weighted_mean

pytestmark = pytest.mark.mpi
ROOT = Path(__file__).resolve().parents[2]
NAN_PEER = 1  # the peer whose weights hold a NaN in the non-finite scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    topology: str = "ring"
    level: str = "layer"
    mixed: bool = False  # float32 and float64 tensors in one model
    nan: bool = False  # NAN_PEER holds a NaN
    on_nonfinite: str = "skip"
    a: float = 0.4


SCENARIOS = [Scenario(f"{t}-{lv}", t, lv) for t in ("ring", "allreduce") for lv in ("layer", "filter")] + [
    Scenario("ring-mixed", mixed=True), Scenario("allreduce-mixed", "allreduce", mixed=True),
    Scenario("ring-filter-mixed", level="filter", mixed=True),
    Scenario("ring-nan-skip", nan=True), Scenario("allreduce-nan-skip", "allreduce", nan=True),
    Scenario("ring-nan-stop", nan=True, on_nonfinite="stop"),
    Scenario("allreduce-nan-stop", "allreduce", nan=True, on_nonfinite="stop"),
    Scenario("ring-a0", a=0.0),
]
BY_NAME = {s.name: s for s in SCENARIOS}


class Net(nn.Module):
    """Conv+BN layers, a linear layer large enough (>= 1 MiB) to travel from its own storage in the
    ring, and a small head; ``mixed`` puts bn2, the large layer and the head in float64."""

    def __init__(self, mixed: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.bn2 = nn.BatchNorm2d(8)
        self.big = nn.Linear(520, 512) if not mixed else nn.Linear(260, 512)
        self.head = nn.Linear(512, 10)
        if mixed:
            for m in (self.bn2, self.big, self.head):
                m.double()


def make_state(scenario: Scenario, peer: int) -> dict[str, torch.Tensor]:
    """Peer ``peer``'s weights: random everywhere (BN statistics too), different per peer, the same in
    every scenario with the same model (so that topologies can be compared)."""
    seed = 1000 * (1 + scenario.mixed) + peer
    torch.manual_seed(seed)
    state = Net(scenario.mixed).state_dict()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in state.items():
            if k.endswith("num_batches_tracked"):
                t.fill_(10 + peer)
            elif k.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
            else:
                scale = torch.rand(t.shape[0], generator=gen, dtype=t.dtype) + 0.1  # filters differ
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * scale.view(-1, *[1] * (t.dim() - 1)))
        if scenario.nan and peer == NAN_PEER:
            state["conv2.weight"][2, 1, 0, 0] = float("nan")
    return state


# ------------------------------------------------------------------------------------- rank script
def run_ranks(out_dir: Path) -> None:
    """Every scenario on every rank; pre/post states and the round's result go to ``out_dir``."""
    from mpi4py import MPI

    from hpcgraft.comm.exchange import GraftExchange
    from hpcgraft.comm.failure import abort_on_error
    from hpcgraft.errors import NonFiniteWeightsError

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    torch.set_num_threads(1)
    with abort_on_error(comm):
        for sc in SCENARIOS:
            folder = out_dir / sc.name
            folder.mkdir(parents=True, exist_ok=True)
            state = make_state(sc, rank)
            torch.save(state, folder / f"pre{rank}.pt")
            ex = GraftExchange(state, comm, grafting.GraftMath(level=sc.level, a=sc.a), topology=sc.topology,
                               on_nonfinite=sc.on_nonfinite)
            result: dict = {"error": None, "dir": str(folder)}
            try:
                r = ex.graft()
                result.update(report=r.report.to_dict() if r.report else None, skipped=r.skipped_reason,
                              nonfinite=list(r.nonfinite_peers), bytes_sent=r.bytes_sent)
            except NonFiniteWeightsError as exc:
                result.update(error=type(exc).__name__, message=str(exc))
            torch.save(state, folder / f"post{rank}.pt")
            if sc.topology == "allreduce" and result.get("report"):  # the source this peer grafted from
                torch.save(dict(zip(ex.keys, (t.clone() for t in ex.packed.received()), strict=True)),
                           folder / f"source{rank}.pt")
            (folder / f"result{rank}.json").write_text(json.dumps(result))
            comm.Barrier()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda k: f"np{k}")
def world(request, tmp_path_factory):
    """Runs the rank script once per rank count; returns (K, loader of saved states and results)."""
    k = request.param
    out = tmp_path_factory.mktemp(f"exchange_np{k}")
    mpirun = Path(sys.executable).parent / "mpirun"
    proc = subprocess.run([str(mpirun), "-np", str(k), sys.executable, __file__, str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def load(name: str) -> tuple[list[dict], list[dict], list[dict]]:
        folder = out / name
        pre = [torch.load(folder / f"pre{r}.pt", weights_only=True) for r in range(k)]
        post = [torch.load(folder / f"post{r}.pt", weights_only=True) for r in range(k)]
        results = [json.loads((folder / f"result{r}.json").read_text()) for r in range(k)]
        return pre, post, results

    return k, load


def assert_close_state(got: dict, want: dict, tol: float = 1e-5, equal_nan: bool = False) -> None:
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=tol, atol=tol, equal_nan=equal_nan,
                                   msg=lambda m, key=key: f"{key}: {m}")


def assert_same_bits(got: dict, want: dict) -> None:
    assert_close_state(got, want, tol=0.0, equal_nan=True)


def float_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if t.is_floating_point())


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ["ring-layer", "ring-filter", "ring-mixed", "ring-filter-mixed"])
def test_ring_gives_each_peer_the_offline_graft_of_its_predecessor(world, name):
    k, load = world
    pre, post, results = load(name)
    sc = BY_NAME[name]
    for r in range(k):
        want, report = grafting.graft_state(pre[r], pre[(r - 1) % k], level=sc.level, a=sc.a)
        assert_same_bits(post[r], want)
        assert results[r]["report"] == json.loads(json.dumps(report.to_dict()))
        assert results[r]["bytes_sent"] == float_bytes(pre[r])
    if sc.mixed:
        assert {t.dtype for t in post[0].values() if t.is_floating_point()} == {torch.float32, torch.float64}


@pytest.mark.parametrize("name", ["allreduce-layer", "allreduce-filter", "allreduce-mixed"])
def test_allreduce_grafts_the_entropy_weighted_mean_of_the_others(world, name):
    """The source each peer received (saved by the rank script) is the entropy-weighted mean of the
    other peers, up to the rounding of a sum taken in another order; the peer's new weights are the
    offline graft of that source, bit for bit. (Going fully offline is only close, not equal: moving a
    value by one ulp across a histogram edge changes an entropy, and c = 500 magnifies that in alpha.)"""
    k, load = world
    pre, post, results = load(name)
    sc = BY_NAME[name]
    for r in range(k):
        received = torch.load(Path(results[r]["dir"]) / f"source{r}.pt", weights_only=True)
        mean = entropy_weighted_mean(pre, r, level=sc.level)
        assert_close_state(received, {key: mean[key] for key in received}, tol=1e-6)
        source = {**pre[r], **received}
        want, report = grafting.graft_state(pre[r], source, level=sc.level, a=sc.a)
        assert_same_bits(post[r], want)
        assert results[r]["report"] == json.loads(json.dumps(report.to_dict()))
        if sc.level == "layer":  # layer entropies are robust enough to go fully offline here
            offline, _ = grafting.graft_state(pre[r], mean, level=sc.level, a=sc.a)
            assert_close_state(post[r], offline)


@pytest.mark.parametrize("level", ["layer", "filter"])
def test_two_peers_ring_and_allreduce_agree(world, level):
    k, load = world
    if k != 2:
        pytest.skip("ring and allreduce coincide only for two peers")
    (pre_r, post_r, _), (pre_a, post_a, _) = load(f"ring-{level}"), load(f"allreduce-{level}")
    for r in range(2):
        assert_same_bits(pre_r[r], pre_a[r])
        assert_close_state(post_r[r], post_a[r])


def test_a_zero_makes_two_peers_identical(world):
    k, load = world
    pre, post, _ = load("ring-a0")
    if k == 2:
        floats = [key for key, t in post[0].items() if t.is_floating_point()]
        assert_same_bits({key: post[0][key] for key in floats}, {key: post[1][key] for key in floats})
    for r in range(k):
        for key, t in pre[r].items():
            if t.is_floating_point():
                mean = ((t.double() + pre[(r - 1) % k][key].double()) / 2).to(t.dtype)
                assert torch.equal(post[r][key], mean), key


@pytest.mark.parametrize("topology", ["ring", "allreduce"])
def test_a_peer_holding_nan_is_skipped(world, topology):
    k, load = world
    pre, post, results = load(f"{topology}-nan-skip")
    for r in range(k):
        assert results[r]["error"] is None
        assert results[r]["nonfinite"] == [NAN_PEER]
        if topology == "ring":
            affected = r == NAN_PEER or (r - 1) % k == NAN_PEER
            source = pre[(r - 1) % k]
        else:  # every finite peer grafts the mean of the other finite peers
            finite = [j for j in range(k) if j != NAN_PEER]
            affected = r == NAN_PEER or len(finite) < 2
            source = entropy_weighted_mean([pre[j] for j in finite], finite.index(r)) if not affected else None
        if affected:
            assert results[r]["report"] is None and results[r]["skipped"], r
            assert_same_bits(post[r], pre[r])  # untouched, the NaN peer included
        else:
            assert results[r]["report"] is not None and results[r]["skipped"] is None
            want, _ = grafting.graft_state(pre[r], source)
            (assert_same_bits if topology == "ring" else assert_close_state)(post[r], want)
            assert all(torch.isfinite(t).all() for t in post[r].values() if t.is_floating_point())
    assert any(results[r]["report"] is None for r in range(k))
    if k == 3:  # a peer away from the NaN still grafts
        assert any(results[r]["report"] is not None for r in range(k))


@pytest.mark.parametrize("topology", ["ring", "allreduce"])
def test_a_peer_holding_nan_stops_every_peer(world, topology):
    k, load = world
    pre, post, results = load(f"{topology}-nan-stop")
    for r in range(k):
        assert results[r]["error"] == "NonFiniteWeightsError"
        assert f"peer(s) [{NAN_PEER}] hold NaN/Inf weights" in results[r]["message"]
        assert "graft.on_nonfinite=skip" in results[r]["message"]
        assert_same_bits(post[r], pre[r])


def test_packing_mixed_dtypes_round_trips():
    """PackedTensors on its own: one buffer per dtype, views shaped like the tensors, the large ones
    outside the packed block; packing and weighting keep every value."""
    from hpcgraft.comm.exchange import DIRECT_BYTES, PackedTensors

    state = make_state(BY_NAME["ring-mixed"], 0)
    tensors = [t for t in state.values() if t.is_floating_point()]
    packed = PackedTensors(tensors, host_staging=True)
    assert set(packed.send) == {torch.float32, torch.float64}
    assert packed.nbytes == float_bytes(state)
    big = [t for t in tensors if t.numel() * t.element_size() >= DIRECT_BYTES]
    assert big and sum(packed.packed_numel.values()) == sum(t.numel() for t in tensors) - sum(t.numel() for t in big)
    weights = [torch.tensor(0.5 + i, dtype=t.dtype) for i, t in enumerate(tensors)]
    packed.pack(weights)
    for t, w, v in zip(tensors, weights, packed.received(into_send=True), strict=True):
        assert v.shape == t.shape and v.dtype == t.dtype
        assert torch.equal(v, t * w)
    packed.clear()
    assert all(bool((b == 0).all()) for b in packed.send.values())


if __name__ == "__main__":
    run_ranks(Path(sys.argv[1]))
