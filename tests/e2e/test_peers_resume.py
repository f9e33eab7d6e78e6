"""A run started with one peer per rank goes on with graft.peers=K on fewer ranks (a job that lost nodes)."""

from __future__ import annotations

import pytest
import yaml

from hpcgraft.errors import EXIT_USAGE
from tests._util import jsonl, train
from tests.runs import RUNS

pytestmark = pytest.mark.mpi


def test_a_run_of_one_peer_per_rank_continues_with_graft_peers_on_one_rank(tmp_path, e2e_run):
    """base2: 2 peers (no grafting) on 2 ranks, no graft.peers. Without the key, one rank is refused with a line
    saying how to go on; with graft.peers=2 it continues both peers from their files."""
    run = e2e_run("base2").copy(tmp_path / "run")
    more = ("--extend", "train.epochs=3")
    r = train(0, run, *RUNS["base2"].overrides, *more)
    assert r.returncode == EXIT_USAGE, r.stderr
    assert ("has 2 peers; start with mpirun -np 2 to resume it, or with graft.peers=2 on a rank count that divides "
            "2") in r.stderr
    r = train(0, run, *RUNS["base2"].overrides, *more, "graft.peers=2")
    assert r.returncode == 0, r.stderr
    assert "hpcgraft: resuming" in r.stderr and "2 peers" in r.stderr
    rows = jsonl(run / "metrics.jsonl")
    assert [(row["epoch"], row["peer"]) for row in rows] == [(e, p) for e in (1, 2, 3) for p in (0, 1, None)]
    assert yaml.safe_load((run / "config.yaml").read_text())["graft"]["peers"] == 2  # the run's K, from now on
