"""The evidence tools on real runs and real files: hpcgraft.report (plots, summary, the papers' table)
and hpcgraft.analyze (invalid filters by l1 norm and entropy, per layer)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from hpcgraft.cli import analyze, report
from hpcgraft.reporting.plots import graft_matrix
from hpcgraft.reporting.runs import load_run
from tests._util import ROOT, env, jsonl


def module(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", name, *args], capture_output=True, text=True, env=env(), cwd=ROOT,
                          timeout=300)


@pytest.fixture
def runs(e2e_run, tmp_path):
    """A baseline run and a grafted run (grafting every 10 steps: four graft points over two epochs), both
    with their HDF5 checkpoints; copied, since a report writes into its first run's directory by default."""
    return e2e_run("base2").copy(tmp_path / "base"), e2e_run("stepwise2").copy(tmp_path / "graft")


# ------------------------------------------------------------------------------------------ report
@pytest.mark.mpi
def test_report_writes_readable_plots_and_the_papers_table(runs, tmp_path):
    base, graft = runs
    out = tmp_path / "report"
    r = module("hpcgraft.report", str(base), str(graft), "--out", str(out))
    assert r.returncode == 0, r.stderr
    for png in ("accuracy.png", "invalid.png", "training.png", "invalid_layers.png", "graft_alpha.png",
                "graft_h_self.png"):
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
