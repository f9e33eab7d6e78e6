"""Early-bird monitors in real mpirun runs: the fields in metrics.jsonl, and a resumed run that reports
exactly what an uninterrupted one does."""

from __future__ import annotations

import pytest

from tests._util import jsonl, train
from tests.runs import RUNS

PEER_FIELDS = ("eb_monitor", "eb_dist_prev", "eb_dist_max", "eb_flag", "eb_epoch")
RUN_FIELDS = ("eb_peer_dist", "eb_peer_dist_mean")


def monitor_records(rows: list[dict]) -> list[dict]:
    keep = ("epoch", "peer", "test_acc", *PEER_FIELDS, *RUN_FIELDS)
    return [{k: r[k] for k in keep if k in r} for r in rows]


@pytest.mark.parametrize(("name", "kind", "window"), [
    ("eb_bn", "bn", 3),
    # the spline monitor's numbers: tests/unit/method/test_earlybird.py; its 4-epoch run only in make test-all
    pytest.param("eb_spline", "spline", 3, marks=pytest.mark.slow)])
def test_monitor_fields_in_metrics(e2e_run, name, kind, window):
    rows = e2e_run(name).metrics()
    peers = [r for r in rows if r["peer"] is not None]
    assert sorted((r["epoch"], r["peer"]) for r in peers) == [(e, p) for e in range(1, 5) for p in (0, 1)]
    for r in peers:
        assert r["eb_monitor"] == kind and isinstance(r["eb_flag"], bool)
        assert (r["eb_dist_prev"] is None) == (r["epoch"] == 1)
        assert (r["eb_dist_max"] is None) == (r["epoch"] < window)
        assert r["eb_dist_prev"] is None or 0 <= r["eb_dist_prev"] <= 1
        if r["eb_epoch"] is not None:  # the first flagged epoch, kept afterwards
            first = min(q["epoch"] for q in peers if q["peer"] == r["peer"] and q["eb_flag"])
            assert r["eb_epoch"] == first <= r["epoch"]
    for r in (r for r in rows if r["peer"] is None):
        d = r["eb_peer_dist"]
        assert len(d) == 2 and d[0][0] == d[1][1] == 0 and d[0][1] == d[1][0] == r["eb_peer_dist_mean"]
        assert 0 <= d[0][1] <= 1
    if kind == "spline":  # independent peers (graft.mode=none) keep different partitions
        assert all(r["eb_peer_dist_mean"] > 0 for r in rows if r["peer"] is None)


@pytest.mark.slow  # the resume matrix: the monitors' state round trip is in tests/unit/method/test_earlybird.py
@pytest.mark.parametrize("name", ["eb_bn", "eb_spline"])
def test_resumed_monitor_reports_as_uninterrupted(e2e_run, tmp_path, name):
    stopped = e2e_run(f"{name}_stopped").copy(tmp_path / "run")
    assert max(r["epoch"] for r in jsonl(stopped / "metrics.jsonl")) == 2
    r = train(RUNS[name].ranks, stopped, *RUNS[name].overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hpcgraft: resuming" in r.stderr
    got = monitor_records(jsonl(stopped / "metrics.jsonl"))
    want = monitor_records(e2e_run(name).metrics())
    assert got == want
    assert [r for r in got if r.get("eb_dist_max") is not None]  # the window filled across the resume
