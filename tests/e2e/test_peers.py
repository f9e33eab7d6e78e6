"""Peers as data: K=4 peers on 4, 2 or 1 ranks (``graft.peers=4``) train, graft and report bit for bit alike,
uninterrupted and when a run stopped on one rank count resumes on another (digits, one thread per rank)."""

from __future__ import annotations

import h5py
import pytest

from hpcgraft.errors import EXIT_REQUEUE, EXIT_USAGE
from tests._util import jsonl, train
from tests.e2e.test_resume import assert_same_run, checkpoints, final_trees, injected
from tests.runs import PEERS4

pytestmark = pytest.mark.mpi

K = 4


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_four_peers_on_4_2_and_1_ranks_are_bitwise_the_same_run(e2e_run):
    runs = [e2e_run(name).out for name in ("peers4_r4", "peers4_r2", "peers4_r1")]
    first = runs[0]
    metrics = jsonl(first / "metrics.jsonl")
    assert [(r["epoch"], r["peer"]) for r in metrics] == [(e, p) for e in (1, 2) for p in [*range(K), None]]
    assert not any("rank" in row for row in metrics + jsonl(first / "graft.jsonl"))
    assert {(g["step"], g["peer"]) for g in jsonl(first / "graft.jsonl")} == {
        (s, p) for s in (10, 20, 30, 40) for p in range(K)}
    newest = first / "checkpoints" / f"step-{max(checkpoints(first)):09d}"
    assert sorted(p.name for p in newest.glob("peer-*.h5")) == [f"peer-{p:03d}.h5" for p in range(K)]
    with h5py.File(newest / "run.h5", "r") as f:
        assert int(f.attrs["hpcgraft.peers"]) == K
    # each peer drew its own data order and weights: the layout did not make them alike
    trees = final_trees(first)
    assert len({float(t["model"]["fc.weight"].sum()) for t in trees}) == K
    for other in runs[1:]:
        assert_same_run(other, first)


def test_a_ring_with_cultivation_is_the_same_on_2_ranks_and_on_1(e2e_run):
    """Two peers a rank: the ring crosses ranks at the blocks' edges and stays inside them; cultivation
    distils towards the logits of all four."""
    a, b = (e2e_run(name) for name in ("peers4_ring_r2", "peers4_ring_r1"))
    assert untimed(a.metrics()) == untimed(b.metrics())
    assert untimed(a.grafts()) == untimed(b.grafts())
    assert [g["source"] for g in a.grafts()[:K]] == [f"peer {(p - 1) % K}" for p in range(K)]


def test_a_run_resumes_on_any_rank_count_that_divides_its_peers(tmp_path, e2e_run):
    """4 ranks -> 2 -> 1 -> 4, each start stopped by a signal a few steps on (mid-epoch and across the
    epoch end), ends as the uninterrupted run did."""
    reference = e2e_run("peers4_r4").out
    out = tmp_path / "run"
    for ranks, stop in ((4, 6), (2, 20), (1, 30)):
        with injected(f"0:{stop}:usr1"):
            r = train(ranks, out, *PEERS4)
        assert r.returncode == EXIT_REQUEUE, r.stderr
    r = train(4, out, *PEERS4)
    assert r.returncode == 0, r.stderr
    assert "hpcgraft: resuming" in r.stderr and "4 peers (1 per rank)" in r.stderr
    assert_same_run(out, reference)


def test_resuming_with_another_number_of_peers_is_one_line(tmp_path, e2e_run):
    run = e2e_run("peers4_r2").copy(tmp_path / "run")
    overrides = [o for o in PEERS4 if not o.startswith("graft.peers")]
    r = train(0, run, *overrides, "graft.peers=2", "--extend", "train.epochs=3")
    assert r.returncode == EXIT_USAGE, r.stderr
    [line] = [x for x in r.stderr.splitlines() if "peers" in x and "checkpoint" in x]
    assert "has 4 peers, this run 2; resume it with graft.peers=4 on one of 1, 2, 4 ranks" in line, line


def test_peers_that_do_not_share_evenly_are_refused_before_training(tmp_path):
    r = train(3, tmp_path / "run", *PEERS4)
    assert r.returncode == EXIT_USAGE, r.stderr
    assert ("graft.peers=4 peers cannot be shared evenly by 3 ranks; start one of 1, 2, 4 ranks (mpirun -np N) "
            "or set graft.peers to a multiple of 3") in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
