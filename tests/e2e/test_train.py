"""The training command end to end: real mpirun ranks on the digits data."""

import sys

import pytest

from tests._util import jsonl, mpirun, train

FAST = ("train.epochs=2", "log.progress=off")


def test_grafting_without_mpirun_says_how_to_start(tmp_path):
    r = train(0, tmp_path / "run", *FAST)
    assert r.returncode == 2
    assert "grafting between peers needs at least 2 peers but this run has 1; start it with mpirun -np K (K >= 2) " \
           "or set graft.mode=none" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trian.epochs=1", "unknown config key 'trian.epochs'; did you mean 'train.epochs'?"),
        ("graft.a=2", "graft.a=2.0 is outside [0, 1]"),
        ("data.name=cifar10", "data.name=cifar10 needs data.root"),
        ("model.name=resnet33", "unknown model 'resnet33' (model.name); did you mean"),
    ],
)
def test_bad_input_stops_every_rank_with_one_line(tmp_path, override, message):
    r = train(2, tmp_path / "run", override)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("hpcgraft: error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "Abort" not in r.stderr


def test_mismatched_peers_fail_on_every_rank_naming_rank_and_key(tmp_path):
    base = ["-m", "hpcgraft.train", "--out", str(tmp_path / "run"), *FAST]
    r = mpirun(1, *base, ":", "-np", "1", sys.executable, *base, "train.lr=0.2")
    assert r.returncode == 2, r.stderr
    assert "rank 1 was started with a different config: train.lr=0.2 there, 0.1 on rank 0" in r.stderr
    assert r.stderr.count("hpcgraft: error:") == 1


def test_digits_run_writes_metrics_reports_and_table(tmp_path):
    out = tmp_path / "run"
    r = train(2, out, *FAST, restart=True)
    assert r.returncode == 0, r.stderr
    rows = jsonl(out / "metrics.jsonl")
    peers = [row for row in rows if row["peer"] is not None]
    ens = [row for row in rows if row["peer"] is None]
    assert [(row["epoch"], row["peer"]) for row in peers] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [row["epoch"] for row in ens] == [1, 2] and all(0 <= row["ensemble_acc"] <= 100 for row in ens)
    for row in peers:
        assert {"train_loss", "train_acc", "test_acc", "lr", "alpha_mean", "invalid_0.1", "invalid_0.01",
                "seconds"} <= set(row)
    # Grafting at the end of epoch 1; the last epoch ends without a graft.
    assert [0.3 < row["alpha_mean"] < 0.7 for row in peers[:2]] == [True, True]
    assert [row["alpha_mean"] for row in peers[2:]] == [None, None]
    grafts = jsonl(out / "graft.jsonl")
    assert sorted((g["epoch"], g["peer"], g["source"]) for g in grafts) == [(1, 0, "peer 1"), (1, 1, "peer 0")]
    layer = grafts[0]["layers"][0]
    assert layer["name"] == "conv1.weight" and {"h_self", "h_source", "alpha"} <= set(layer)
    assert all(0 < g["seconds"] < 60 for g in grafts)  # the round's wall time
    assert (out / "config.yaml").exists()
    assert "train_loss" in r.stdout and "ens" in r.stdout  # the table


def test_same_seed_same_numbers_and_baseline_untouched(tmp_path):
    runs = [train(2, tmp_path / f"g{i}", *FAST) for i in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    a, b = (jsonl(tmp_path / f"g{i}" / "metrics.jsonl") for i in range(2))
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b]
    # graft.mode=none: peer 0 of a 2-peer run trains exactly like a lone peer 0 (nothing grafted in).
    pair = train(2, tmp_path / "pair", *FAST, "graft.mode=none", "dist.threads=1")
    solo = train(0, tmp_path / "solo", *FAST, "graft.mode=none", "dist.threads=1")
    assert pair.returncode == 0 and solo.returncode == 0, pair.stderr + solo.stderr
    p0 = [r for r in jsonl(tmp_path / "pair" / "metrics.jsonl") if r["peer"] == 0]
    s0 = [r for r in jsonl(tmp_path / "solo" / "metrics.jsonl") if r["peer"] == 0]
    assert [(r["train_loss"], r["test_acc"]) for r in p0] == [(r["train_loss"], r["test_acc"]) for r in s0]
    assert not (tmp_path / "pair" / "graft.jsonl").exists() or not jsonl(tmp_path / "pair" / "graft.jsonl")
