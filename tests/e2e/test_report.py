"""The evidence tools on real runs and real files: hpcgraft.report (plots, summary, the papers' table)
and hpcgraft.analyze (invalid filters by l1 norm and entropy, per layer)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from hpcgraft import analyze, report
from hpcgraft.method.grafting import count_invalid_filters
from hpcgraft.method.validity import analyze_state, totals
from hpcgraft.models import create_model
from hpcgraft.report import graft_matrix, load_run
from tests._util import ROOT, env, jsonl, train

FAST = ("train.epochs=2", "log.progress=off", "dist.threads=1")


def module(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", name, *args], capture_output=True, text=True, env=env(), cwd=ROOT,
                          timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A baseline run and a grafted run (grafting every 10 steps: four graft points over two epochs), both
    with their HDF5 checkpoints."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("base", ["graft.mode=none"]), ("graft", ["graft.interval_steps=10"])):
        r = train(2, root / name, *FAST, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    return root / "base", root / "graft"


# ------------------------------------------------------------------------------------------ report
@pytest.mark.mpi
def test_report_writes_readable_plots_and_the_papers_table(runs, tmp_path):
    base, graft = runs
    out = tmp_path / "report"
    r = module("hpcgraft.report", str(base), str(graft), "--out", str(out))
    assert r.returncode == 0, r.stderr
    for png in ("accuracy.png", "invalid.png", "invalid_layers.png", "graft_alpha.png", "graft_h_self.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 250
    assert not (out / "base_alpha.png").exists()  # nothing was grafted in the baseline
    md = (out / "summary.md").read_text()
    metrics = jsonl(graft / "metrics.jsonl")
    best0 = max(row["test_acc"] for row in metrics if row["peer"] == 0)
    final_ens = [row["ensemble_acc"] for row in metrics if row["peer"] is None][-1]
    base_best0 = max(row["test_acc"] for row in jsonl(base / "metrics.jsonl") if row["peer"] == 0)
    table = md.split("## Baseline vs method")[1]
    assert "| | base: baseline (independent peers) | graft: grafting (layer level, ring) |" in table
    assert f"| best top-1, peer 0 | {base_best0:.2f} | {best0:.2f} ({best0 - base_best0:+.2f}) |" in table
    assert "| final top-1, ensemble | " in table and f"{final_ens:.2f}" in table
    inv = [row["invalid_0.01"] for row in metrics if row["peer"] == 1][-1]
    assert "| invalid filters @0.01, peer 1 | " in table and f"{inv}/176 |" in table.split("@0.01, peer 1")[1]
    assert "![alpha per layer and graft point](graft_alpha.png)" in md
    assert "![invalid filters per layer](invalid_layers.png)" in md.split("## Invalid filters per layer")[1]


@pytest.mark.mpi
def test_report_heat_map_holds_the_logged_coefficients(runs):
    run = load_run(runs[1])
    rows = sorted((g for g in jsonl(runs[1] / "graft.jsonl") if g["peer"] == 1), key=lambda g: g["step"])
    names, points, values = graft_matrix(run, 1, "alpha")
    assert points == [(g["epoch"], g["step"]) for g in rows] and len(points) == 4
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight"
    assert values == [[g["layers"][i]["alpha"] for g in rows] for i in range(len(names))]
    assert run.method == "grafting (layer level, ring)" and not run.is_baseline and run.filters == 176


@pytest.mark.mpi
def test_report_without_a_baseline_explains_the_missing_table(runs, tmp_path):
    assert report.main([str(runs[1]), "--out", str(tmp_path / "rep")]) == 0
    assert "Give a baseline run (graft.mode=none" in (tmp_path / "rep" / "summary.md").read_text()


def test_report_of_a_directory_that_is_no_run(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "holds no config.yaml and metrics.jsonl" in err


# ------------------------------------------------------------------------------------------ analyze
@pytest.fixture
def damaged_state():
    """resnet20 with 3 zeroed filters and 2 scaled to l1 norm 0.05 in one layer, 1 scaled to 0.005 in another."""
    torch.manual_seed(0)
    state = create_model("resnet20", 10).state_dict()
    w = state["layers.0.conv1.weight"]
    w[:3] = 0
    w[3:5] *= 0.05 / w[3:5].abs().sum(dim=(1, 2, 3), keepdim=True)
    v = state["layers.4.conv2.weight"]
    v[7] *= 0.005 / v[7].abs().sum()
    return state


def test_analyze_counts_invalid_filters_per_layer(damaged_state):
    stats = {s.name: s for s in analyze_state(damaged_state, [0.1, 0.01], entropy_below=0.5)}
    assert len(stats) == 19 + 0  # resnet20: 19 conv layers (option-A shortcuts have no weights)
    assert (stats["layers.0.conv1.weight"].invalid, stats["layers.0.conv1.weight"].low_entropy) == (
        {"0.1": 5, "0.01": 3}, 3)  # zero filters have entropy 0; scaled ones keep their histogram
    assert stats["layers.4.conv2.weight"].invalid == {"0.1": 1, "0.01": 1}
    assert stats["layers.4.conv2.weight"].low_entropy == 0
    tot = totals(list(stats.values()))
    assert tot["filters"] == 688 and tot["invalid"] == {"0.1": 6, "0.01": 4} and tot["low_entropy"] == 3
    # The same totals the training loop logs as invalid_0.1 / invalid_0.01.
    assert count_invalid_filters(damaged_state, (0.1, 0.01)) == {0.1: 6, 0.01: 4}


def test_analyze_command_reads_a_plain_and_a_nested_state_dict(damaged_state, tmp_path, capsys):
    torch.save(damaged_state, tmp_path / "plain.pt")
    torch.save({"net": damaged_state, "acc": 91.0}, tmp_path / "nested.pt")
    r = module("hpcgraft.analyze", str(tmp_path / "plain.pt"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("plain.pt: 6/688 below l1 0.1, 4/688 below l1 0.01, 3/688 below entropy 0.5")
    assert any(line.split()[:6] == ["layers.0.conv1.weight", "16x16x3x3", "16", "5", "3", "3"]
               for line in r.stdout.splitlines())
    assert analyze.main([str(tmp_path / "nested.pt"), "--json", "--thresholds", "0.02", "--entropy-below", "3"]) == 0
    total = json.loads(capsys.readouterr().out)["nested.pt"]["total"]
    assert total == {"layers": 19, "filters": 688, "invalid": {"0.02": 4}, "low_entropy": 688}  # ln 10 < 3


def test_analyze_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "junk.pt").write_text("not a tensor file")
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    for path, message in ((tmp_path / "junk.pt", "cannot be read as a tensor file with weights_only=True"),
                          (tmp_path / "nostate.pt", "holds no state dict"),
                          (tmp_path / "missing.pt", "does not exist")):
        assert analyze.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err


@pytest.mark.mpi
def test_analyze_reads_the_peers_of_an_hpcgraft_checkpoint(runs, capsys):
    graft = runs[1]
    rows = jsonl(graft / "metrics.jsonl")
    final = {row["peer"]: row for row in rows if row["epoch"] == 2 and row["peer"] is not None}
    assert analyze.main([str(graft), "--json"]) == 0  # the run directory: its newest checkpoint
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["peer 0 (step-000000044, epoch 2)", "peer 1 (step-000000044, epoch 2)"]
    for p, label in enumerate(out):
        # The same counts the training loop logged for that epoch.
        assert out[label]["total"]["invalid"] == {"0.1": final[p]["invalid_0.1"], "0.01": final[p]["invalid_0.01"]}
        assert out[label]["total"]["filters"] == 176 and out[label]["layers"][0]["name"] == "conv1.weight"
    step = graft / "checkpoints" / "step-000000022"
    assert analyze.main([str(step / "peer-001.h5")]) == 0
    assert capsys.readouterr().out.startswith("peer 1 (step-000000022, epoch 1): ")
    assert analyze.main([str(step), "--peer", "2"]) == 2
    assert "has peers 0..1; --peer 2 does not exist" in capsys.readouterr().err
