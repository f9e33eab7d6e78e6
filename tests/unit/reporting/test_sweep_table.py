"""The sweep table on run directories written by hand: only finished seeds count, one seed shows its value
without a spread, and a sweep directory that is not one is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcgraft.cli.report import main
from hpcgraft.config import load_config
from hpcgraft.errors import InputError
from hpcgraft.reporting.runs import SWEEP_FILE, load_sweep
from hpcgraft.reporting.tables import sweep_table


def _run(path: Path, state: str, accs: dict[int, list[float]], ens: list[float], invalid: dict[int, int]) -> None:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(load_config(None, ["train.epochs=2"]).to_yaml())
    rows = []
    for e in range(1, len(ens) + 1):
        rows += [{"epoch": e, "peer": p, "test_acc": a[e - 1], "invalid_0.1": invalid[p], "invalid_0.01": 0}
                 for p, a in accs.items()]
        rows.append({"epoch": e, "peer": None, "ensemble_acc": ens[e - 1]})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "status.json").write_text(json.dumps({"state": state}))


def test_only_finished_seeds_count_and_one_seed_has_no_spread(tmp_path):
    (tmp_path / SWEEP_FILE).write_text(json.dumps({"arms": {"baseline": [], "grafting": []}, "seeds": [0, 1]}))
    _run(tmp_path / "baseline/seed0", "finished", {0: [50.0, 60.0], 1: [70.0, 64.0]}, [66.0, 68.0], {0: 2, 1: 4})
    _run(tmp_path / "baseline/seed1", "finished", {0: [55.0, 58.0], 1: [61.0, 60.0]}, [62.0, 61.0], {0: 1, 1: 1})
    _run(tmp_path / "grafting/seed0", "finished", {0: [80.0, 81.0], 1: [79.0, 83.0]}, [84.0, 85.0], {0: 0, 1: 1})
    _run(tmp_path / "grafting/seed1", "running", {0: [10.0], 1: [10.0]}, [10.0], {0: 9, 1: 9})
    table = sweep_table(load_sweep(tmp_path))
    # baseline: best (60+70)/2=65, (58+61)/2=59.5; final (60+64)/2=62, (58+60)/2=59; ensemble best 68, 62,
    # final 68, 61; invalid (2+4)/2=3, (1+1)/2=1. Sample std of two values: |a-b|/sqrt(2). grafting: seed 0
    # only (seed 1 still runs): best (81+83)/2, final (81+83)/2, ensemble 85, invalid (0+1)/2.
    assert "| baseline | 2/2 | 62.25 ± 3.89 | 60.50 ± 2.12 | 65.00 ± 4.24 | 64.50 ± 4.95 | 2.0 ± 1.4 | 0.0 ± 0.0 |" \
        in table
    assert "| grafting | 1/2 | 82.00 | 82.00 | 85.00 | 85.00 | 0.5 | 0.0 |" in table


def test_a_directory_without_a_readable_sweep_file_is_one_line(tmp_path, capsys):
    (tmp_path / SWEEP_FILE).write_text("{not json")
    with pytest.raises(InputError, match="sweep.json cannot be read"):
        load_sweep(tmp_path)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpcgraft.report: error: ") and err.count("\n") == 1
