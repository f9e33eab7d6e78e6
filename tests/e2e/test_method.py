"""The method's options end to end, with real mpirun ranks on the digits data (runs of
tests/runs.py): cultivation, the information sources, the topologies and K."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.mpi

A = 0.4  # configs/digits.yaml's graft.a: alphas lie in (0.5 - A/2, 0.5 + A/2)


def peers_of(metrics: list[dict]) -> list[dict]:
    return [row for row in metrics if row["peer"] is not None]


def check_alphas(grafts: list[dict]) -> None:
    for g in grafts:
        assert g["layers"], g
        for layer in g["layers"]:
            assert 0.5 - A / 2 < layer["alpha_min"] <= layer["alpha"] <= layer["alpha_max"] < 0.5 + A / 2, layer
            assert math.isfinite(layer["h_self"]) and math.isfinite(layer["h_source"])


# ------------------------------------------------------------------------------------------ cultivation
def test_cultivation_without_grafting_changes_only_the_loss(e2e_run):
    """Peer 0 reads data stream 0 whether cultivating or not and starts from the same weights, so next to a
    lone uncultivated peer 0 the only difference is the distillation term."""
    cultivated, alone = e2e_run("cultivate_only"), e2e_run("solo_1ep")
    assert cultivated.grafts() == []
    c0 = [row for row in cultivated.metrics() if row["peer"] == 0][0]
    a0 = [row for row in alone.metrics() if row["peer"] == 0][0]
    assert math.isfinite(c0["train_loss"]) and math.isfinite(a0["train_loss"])
    assert c0["train_loss"] != a0["train_loss"]
    assert len(peers_of(cultivated.metrics())) == 2 and 0 <= cultivated.metrics()[-1]["ensemble_acc"] <= 100


def test_filter_level_grafting_with_cultivation_end_to_end(e2e_run):
    run = e2e_run("filter_cultivated")
    grafts = run.grafts()
    assert len(peers_of(run.metrics())) == 2
    assert sorted((g["step"], g["peer"], g["source"]) for g in grafts) == [
        (10, 0, "peer 1"), (10, 1, "peer 0"), (20, 0, "peer 1"), (20, 1, "peer 0")]
    assert {g["level"] for g in grafts} == {"filter"}
    check_alphas(grafts)
    layers = {layer["name"]: layer for layer in grafts[0]["layers"]}
    assert layers["conv1.weight"]["filters"] == 16 and layers["layers.1.conv1.weight"]["filters"] == 32
    assert layers["fc.weight"]["filters"] == 10
    # One coefficient per filter: within a layer they differ.
    assert sum(layer["alpha_min"] < layer["alpha_max"] for g in grafts for layer in g["layers"]) > 0


# ------------------------------------------------------------------------------------ information sources
def test_noise_source_in_ranks_without_horovod(e2e_run):
    """Also the check that one rank per peer never imports Horovod (the run's ranks cannot)."""
    run = e2e_run("noise")
    assert len(peers_of(run.metrics())) == 2
    grafts = run.grafts()
    assert sorted((g["step"], g["peer"]) for g in grafts) == [(10, 0), (10, 1), (20, 0), (20, 1)]
    assert {(g["source"], g["mode"], g["level"]) for g in grafts} == {("noise", "noise", "layer")}
    check_alphas(grafts)
    assert any(layer["h_self"] != layer["h_source"] for g in grafts for layer in g["layers"])


def test_self_source_at_filter_level(e2e_run):
    grafts = e2e_run("self_filter").grafts()
    assert len(grafts) == 4 and {(g["source"], g["level"]) for g in grafts} == {("self", "filter")}
    check_alphas(grafts)
    # The source is the layer's own filters shifted by one: the same values, hence the same mean entropy
    # over the layer, but filter against filter the coefficients differ.
    for layer in (layer for g in grafts for layer in g["layers"]):
        assert layer["h_source"] == pytest.approx(layer["h_self"], abs=1e-5)
    assert sum(layer["alpha_min"] < layer["alpha_max"] for g in grafts for layer in g["layers"]) > 0


# ------------------------------------------------------------------------------------ topologies and K
def test_allreduce_topology_with_three_peers(e2e_run):
    run = e2e_run("allreduce3_dlr")
    grafts = run.grafts()
    assert sorted(row["peer"] for row in peers_of(run.metrics())) == [0, 1, 2]
    assert sorted((g["step"], g["peer"]) for g in grafts) == [(s, p) for s in (10, 20) for p in range(3)]
    assert {g["source"] for g in grafts} == {"mean of others"}
    check_alphas(grafts)


def test_dlr_gives_each_of_three_peers_its_rate(e2e_run):
    metrics = e2e_run("allreduce3_dlr").metrics()
    for row in peers_of(metrics):
        i, k, steps = row["peer"] + 1, 3, row["step"]
        base = 0.1 * (1 + math.cos(math.pi * (k - i) / k)) / 2  # docs/method.md, "Diversity"
        # cosine annealing per step over the run's `steps` steps; the row holds the rate of the last step
        assert row["lr"] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * (steps - 1) / steps)), rel=1e-9)
    assert [r["lr"] for r in sorted(peers_of(metrics), key=lambda r: r["peer"])] == sorted(
        r["lr"] for r in peers_of(metrics))


def test_ring_of_four_peers(e2e_run):
    run = e2e_run("ring4")
    grafts = run.grafts()
    assert sorted(row["peer"] for row in peers_of(run.metrics())) == [0, 1, 2, 3]
    assert sorted({(g["peer"], g["source"]) for g in grafts}) == [
        (0, "peer 3"), (1, "peer 0"), (2, "peer 1"), (3, "peer 2")]
    assert len(grafts) == 8
    check_alphas(grafts)
