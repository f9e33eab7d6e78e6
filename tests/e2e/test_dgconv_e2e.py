"""A DGConv model end to end: 2 peers with ``model.dgconv=true`` graft, log their group counts, stop on
SIGUSR1 (exit 75) and resume to the same bits as an uninterrupted run; export and offline graft keep the
gates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcgraft.cli import report
from hpcgraft.errors import EXIT_REQUEUE
from hpcgraft.models import create_model
from hpcgraft.models.dgconv import apply_dgconv, dgconv_layers
from tests._util import ROOT, env, jsonl, train
from tests.e2e.test_resume import assert_identical, final_trees

OVERRIDES = ("model.dgconv=true", "train.epochs=2")
STOP_AT = 30  # a few steps into epoch 2, after the first graft


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dgconv") / "whole"
    r = train(2, out, *OVERRIDES)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """The same run stopped by SIGUSR1 after step STOP_AT, then resumed by the same command."""
    out = tmp_path_factory.mktemp("dgconv") / "stopped"
    injected = {**env(), "HPCGRAFT_INJECT": f"1:{STOP_AT - 1}:usr1"}
    r = train(2, out, *OVERRIDES, environ=injected)
    assert r.returncode == EXIT_REQUEUE, r.stderr
    r = train(2, out, *OVERRIDES)
    assert r.returncode == 0, r.stderr
    assert "hpcgraft: resuming" in r.stderr
    return out


def test_group_counts_are_logged_per_peer_and_epoch(whole) -> None:
    rows = [r for r in jsonl(whole / "metrics.jsonl") if r.get("peer") is not None]
    assert {(r["epoch"], r["peer"]) for r in rows} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    for r in rows:  # digits_resnet has 5 square power-of-two 3x3 convs (16, 16, 32, 32, 32 channels)
        assert len(r["dgconv_groups"]) == 5
        assert all(g in (1, 2, 4, 8, 16) for g in r["dgconv_groups"][:2])
        assert all(g in (1, 2, 4, 8, 16, 32) for g in r["dgconv_groups"][2:])
    assert len(jsonl(whole / "graft.jsonl")) >= 2  # both peers grafted


@pytest.mark.slow  # the resume matrix: make test resumes grafting runs exactly in tests/e2e/test_resume.py
def test_stopped_run_resumes_bitwise(whole, stopped) -> None:
    assert_identical(final_trees(stopped), final_trees(whole))


def test_export_loads_into_the_same_model_and_offline_graft_keeps_gates(whole, tmp_path) -> None:
    exported = tmp_path / "peer0.pt"
    args = [sys.executable, "-m", "hpcgraft.checkpoint", "export", str(whole), "--peer", "0",
            "--out", str(exported)]
    assert subprocess.run(args, env=env(), cwd=ROOT, capture_output=True, text=True).returncode == 0
    model = create_model("digits_resnet", 10)
    apply_dgconv(model)
    state = torch.load(exported)
    model.load_state_dict(state)  # strict: gates included
    assert all(f"{n}.gate" in state for n in dgconv_layers(model))
    peer1 = sorted((whole / "checkpoints").glob("step-*"))[-1] / "peer-001.h5"
    grafted = tmp_path / "grafted.pt"
    r = subprocess.run([sys.executable, "-m", "hpcgraft.graft", str(exported), str(peer1), "--out", str(grafted)],
                       env=env(), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = torch.load(grafted)
    model.load_state_dict(out)
    gates = [n + ".gate" for n in dgconv_layers(model)]
    assert any(not torch.equal(out[g], state[g]) for g in gates)  # the gates were mixed too


def test_report_plots_the_group_counts(whole, tmp_path) -> None:
    assert report.main([str(whole), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "whole_dgconv_groups.png").stat().st_size > 0
    assert "DGConv groups in" in (tmp_path / "summary.md").read_text()
