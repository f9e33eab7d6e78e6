"""Tracking a run outside hpcgraft: TensorBoard event files (log.tensorboard=true) read back with
TensorBoard's own reader after a real kill and resume, and the pandas snippet of docs/running.md on a real run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests._util import ROOT, env, jsonl, train


def scalars(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar series of one TensorBoard run folder, as TensorBoard reads it: (step, value, wall time)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def series(got: dict, tag: str) -> list[tuple[int, float]]:
    return [(step, value) for step, value, _ in got[tag]]


def expected(rows: list[dict], key: str) -> list[tuple[int, object]]:
    return [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows]  # event files hold float32


@pytest.mark.mpi
def test_tensorboard_events_hold_each_logged_step_once_after_a_kill_and_resume(e2e_run, tmp_path):
    killed = e2e_run("tracked_killed")
    out = killed.copy(tmp_path / "run")
    tb = out / "tensorboard"
    before = scalars(tb / "peer0")
    # epoch 3 (step 66) was logged, but the newest checkpoint holds epoch 2 (step 44)
    assert [s for s, _ in series(before, "metrics/test_acc")] == [22, 44, 66]
    r = train(2, out, *killed.spec.overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr + r.stdout
    metrics, grafts = jsonl(out / "metrics.jsonl"), jsonl(out / "graft.jsonl")
    assert sorted(p.name for p in tb.iterdir()) == ["ensemble", "peer0", "peer1"]
    for peer in (0, 1):
        got = scalars(tb / f"peer{peer}")
        rows = [m for m in metrics if m["peer"] == peer]
        assert [m["step"] for m in rows] == [22, 44, 66, 88]
        keys = ("train_loss", "train_acc", "test_acc", "lr", "alpha_mean", "invalid_0.1", "invalid_0.01", "seconds")
        assert {f"metrics/{k}" for k in keys} <= set(got)
        for k in keys:  # each step once: the old segment's step 66 was dropped by the resumed segment's START
            assert series(got, f"metrics/{k}") == expected(rows, k), k
        rounds = [g for g in grafts if g["peer"] == peer]
        assert [g["step"] for g in rounds] == list(range(10, 88, 10))
        assert series(got, "graft/seconds") == expected(rounds, "seconds")
        assert series(got, "graft/alpha_mean") == expected(rounds, "alpha_mean")
        for i, layer in enumerate(rounds[0]["layers"]):
            name = layer["name"].removesuffix(".weight")
            assert series(got, f"alpha/{name}") == [(g["step"], pytest.approx(g["layers"][i]["alpha"], rel=1e-6))
                                                   for g in rounds]
            assert series(got, f"entropy/{name}") == [(g["step"], pytest.approx(g["layers"][i]["h_self"], rel=1e-6))
                                                     for g in rounds]
    for folder in tb.iterdir():  # no curve doubles back: every tag's steps rise, each once
        for tag, points in scalars(folder).items():
            assert all(a[0] < b[0] for a, b in zip(points, points[1:], strict=False)), (folder.name, tag)
    ensemble = scalars(tb / "ensemble")
    assert series(ensemble, "metrics/test_acc") == expected([m for m in metrics if m["peer"] is None], "ensemble_acc")
    # appended, not rewritten: what came before the checkpoint keeps its wall times, in the first file
    after = scalars(tb / "peer0")["metrics/test_acc"]
    assert after[:2] == before["metrics/test_acc"][:2] and after[2][2] > before["metrics/test_acc"][2][2]
    assert len(list((tb / "peer0").glob("events.out.tfevents.*"))) == 2


def test_tensorboard_without_the_package_is_one_line_before_the_run_starts(tmp_path):
    hidden = ("import sys; sys.modules['tensorboard'] = None; from hpcgraft.cli.train import main; "
              "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", hidden, "--config", str(ROOT / "configs/digits.yaml"), "--out",
                        str(tmp_path / "run"), "graft.mode=none", "log.tensorboard=true"],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "hpcgraft: error: log.tensorboard=true needs the tensorboard package, which is not installed; install it "
        "with pip install 'hpcgraft[tensorboard]' (or pip install tensorboard), or set log.tensorboard=false"]
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.mpi
def test_train_with_a_file_where_tensorboard_goes_stops_before_training(tmp_path):
    """Under mpirun: the check is rank 0's and agreed, so every rank stops at once (the check itself, for every
    command: tests/unit/storage/test_output_paths.py)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".hpcgraft-run").touch()  # a run directory of hpcgraft's, with a file where its event files go
    (out / "tensorboard").write_text("not a folder")
    r = train(2, out, "log.tensorboard=true", "train.epochs=1", "log.progress=off", "dist.threads=1")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"hpcgraft: error: {out / 'tensorboard'} is a file where hpcgraft writes its tensorboard folder; "
                     "move it away, or use another --out"], lines
    assert sorted(p.name for p in out.iterdir()) == [".hpcgraft-run", "tensorboard"]  # nothing trained, nothing claimed


@pytest.mark.mpi
def test_docs_pandas_snippet_runs_as_printed_on_a_real_run(e2e_run, tmp_path):
    doc = (ROOT / "docs" / "running.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "import pandas" in b)
    demo = tmp_path / "runs" / "demo"
    demo.mkdir(parents=True)
    shutil.copy(e2e_run("graft2").out / "metrics.jsonl", demo)
    probe = ("\nimport json, matplotlib.pyplot as plt\nax = plt.gca()\n"
             "print(json.dumps({'labels': [t.get_text() for t in ax.get_legend().get_texts()], "
             "'lines': [[float(y) for y in line.get_ydata()] for line in ax.get_lines()]}))\n")
    r = subprocess.run([sys.executable, "-c", snippet + probe], capture_output=True, text=True, cwd=tmp_path,
                       env={**env(), "MPLBACKEND": "Agg"}, timeout=120)
    assert r.returncode == 0, r.stderr
    plotted = json.loads(r.stdout.splitlines()[-1])
    assert plotted["labels"] == ["0", "1", "ensemble"]  # the peers as 0, 1, not 0.0, 1.0
    metrics = jsonl(demo / "metrics.jsonl")
    assert plotted["lines"] == [[m["test_acc"] for m in metrics if m["peer"] == p] for p in (0, 1)] + [
        [m["ensemble_acc"] for m in metrics if m["peer"] is None]]
    assert (tmp_path / "accuracy.png").stat().st_size > 0
