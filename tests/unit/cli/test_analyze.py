"""hpcgraft.analyze (invalid filters by l1 norm and entropy, per layer) and hpcgraft.report on inputs that
need no training run; in process."""

from __future__ import annotations

import json

import pytest
import torch

from hpcgraft.cli import analyze, report
from hpcgraft.method.grafting import count_invalid_filters
from hpcgraft.method.validity import analyze_state, totals
from hpcgraft.models import create_model


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
    assert analyze.main([str(tmp_path / "plain.pt")]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("plain.pt: 6/688 below l1 0.1, 4/688 below l1 0.01, 3/688 below entropy 0.5")
    assert any(line.split()[:6] == ["layers.0.conv1.weight", "16x16x3x3", "16", "5", "3", "3"]
               for line in stdout.splitlines())
    assert analyze.main([str(tmp_path / "nested.pt"), "--json", "--thresholds", "0.02", "--entropy-below", "3"]) == 0
    total = json.loads(capsys.readouterr().out)["nested.pt"]["total"]
    assert total == {"layers": 19, "filters": 688, "invalid": {"0.02": 4}, "low_entropy": 688}  # ln 10 < 3


def test_analyze_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "junk.pt").write_text("not a tensor file")
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    for path, message in ((tmp_path / "junk.pt", "junk.pt: not a readable PyTorch file"),
                          (tmp_path / "nostate.pt", "nostate.pt: found no state dict"),
                          (tmp_path / "missing.pt", "missing.pt: no such file")):
        assert analyze.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err


