"""The training command end to end: real mpirun ranks on the digits data (runs of tests/runs.py)."""

import pytest

from tests._util import jsonl, train
from tests.runs import RUNS

pytestmark = pytest.mark.mpi


def test_bad_input_stops_every_rank_with_one_line(tmp_path):
    """One bad key through a real 2-rank mpirun: exit 2, one error line, no traceback, no abort. The other
    user errors are decided before any MPI work and are checked in process (tests/unit/cli/test_setup_errors.py)."""
    r = train(2, tmp_path / "run", "trian.epochs=1")
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("hpcgraft: error:")]
    assert len(errors) == 1 and "unknown config key 'trian.epochs'; did you mean 'train.epochs'?" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "Abort" not in r.stderr


def test_digits_run_writes_metrics_reports_and_table(e2e_run):
    run = e2e_run("graft2")
    peers = [row for row in run.metrics() if row["peer"] is not None]
    ens = [row for row in run.metrics() if row["peer"] is None]
    assert [(row["epoch"], row["peer"]) for row in peers] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [row["epoch"] for row in ens] == [1, 2] and all(0 <= row["ensemble_acc"] <= 100 for row in ens)
    for row in peers:
        assert {"train_loss", "train_acc", "test_acc", "lr", "alpha_mean", "invalid_0.1", "invalid_0.01",
                "seconds"} <= set(row)
    # Grafting at the end of epoch 1; the last epoch ends without a graft.
    assert [0.3 < row["alpha_mean"] < 0.7 for row in peers[:2]] == [True, True]
    assert [row["alpha_mean"] for row in peers[2:]] == [None, None]
    grafts = run.grafts()
    assert sorted((g["epoch"], g["peer"], g["source"]) for g in grafts) == [(1, 0, "peer 1"), (1, 1, "peer 0")]
    layer = grafts[0]["layers"][0]
    assert layer["name"] == "conv1.weight" and {"h_self", "h_source", "alpha"} <= set(layer)
    assert all(0 < g["seconds"] < 60 for g in grafts)  # the round's wall time
    assert (run.out / "config.yaml").exists()
    assert "train_loss" in run.proc.stdout and "ens" in run.proc.stdout  # the table


def test_the_hpcgraft_command_trains_as_python_m_hpcgraft_train(e2e_run, tmp_path):
    """`mpirun -np 2 hpcgraft train ...` (here `python -m hpcgraft train`, the same entry point) trains the
    same numbers as the `python -m hpcgraft.train` run of tests/runs.py with the same overrides."""
    r = train(2, tmp_path / "run", *RUNS["cultivate_only"].overrides, command=("-m", "hpcgraft", "train"))
    assert r.returncode == 0, r.stderr
    reference = e2e_run("cultivate_only")
    assert untimed(jsonl(tmp_path / "run" / "metrics.jsonl")) == untimed(reference.metrics())


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_same_seed_same_numbers_and_baseline_untouched(e2e_run):
    assert untimed(e2e_run("graft2").metrics()) == untimed(e2e_run("graft2_again").metrics())
    # graft.mode=none: peer 0 of a 2-peer run trains exactly like a lone peer 0 (nothing grafted in).
    pair, solo = e2e_run("base2"), e2e_run("base_solo")
    p0 = [r for r in pair.metrics() if r["peer"] == 0]
    s0 = [r for r in solo.metrics() if r["peer"] == 0]
    assert [(r["train_loss"], r["test_acc"]) for r in p0] == [(r["train_loss"], r["test_acc"]) for r in s0]
    assert pair.grafts() == []
