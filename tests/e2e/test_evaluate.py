"""Evaluating and continuing runs: ``python -m hpcgraft.evaluate`` against what real runs
recorded, top-5 in metrics.jsonl on a synthetic 12-class ImageFolder, ``train.init_from``, ``--extend``,
``--from-step`` and ``checkpoint export --best``; bad input is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcgraft.config import load_config
from hpcgraft.method.schedule import LRSchedule
from hpcgraft.storage.checkpoints import best_checkpoints, complete_checkpoints
from hpcgraft.training.evaluation import init_state
from tests._util import ROOT, env, jsonl, train
from tests.runs import TWO_EPOCHS

BASE = (*TWO_EPOCHS, "graft.mode=none")  # base2's overrides: a continuation of it must repeat them


def command(module: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=timeout)


def evaluate(tmp_path: Path, *args: object) -> dict:
    """The evaluate command's JSON record (it must succeed)."""
    out = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*')))}.json"
    r = command("hpcgraft.evaluate", *args, "--json", out)
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and "top-5" in r.stdout, r.stdout
    return json.loads(out.read_text())


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 with one error line (no traceback) that holds every needle."""
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert lines and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def last_epoch(metrics: list[dict]) -> tuple[list[dict], dict]:
    """The last epoch's per-peer rows (by peer) and its ensemble row."""
    epoch = max(m["epoch"] for m in metrics)
    rows = [m for m in metrics if m["epoch"] == epoch]
    peers = sorted((m for m in rows if m["peer"] is not None), key=lambda m: m["peer"])
    return peers, next(m for m in rows if m["peer"] is None)


# ------------------------------------------------------------------------------------------ evaluate
def test_evaluate_agrees_with_the_runs_recorded_accuracy(e2e_run, tmp_path):
    """The run, its newest checkpoint, one peer's file and an exported .pt all score what the run
    recorded for its last epoch (base2: no graft after the last evaluation, so the checkpoint holds the
    evaluated weights), top-1 per peer and the ensemble; digits (10 classes) record no top-5."""
    run = e2e_run("base2").out
    peers, ens = last_epoch(jsonl(run / "metrics.jsonl"))
    assert all("test_top5" not in m for m in peers) and "ensemble_top5" not in ens
    whole = evaluate(tmp_path, run)
    assert [p["top1"] for p in whole["peers"]] == pytest.approx([m["test_acc"] for m in peers], abs=1e-9)
    assert whole["ensemble"]["top1"] == pytest.approx(ens["ensemble_acc"], abs=1e-9)
    assert whole["images"] == 355 and whole["classes"] == 10
    assert all(p["top5"] >= p["top1"] for p in whole["peers"])

    newest = complete_checkpoints(run / "checkpoints")[0].path
    ckpt = evaluate(tmp_path, newest, "--peer", 1)
    assert [p["top1"] for p in ckpt["peers"]] == pytest.approx([peers[1]["test_acc"]], abs=1e-9)
    assert ckpt["ensemble"] is None

    exported = tmp_path / "p0.pt"
    r = command("hpcgraft.checkpoint", "export", run, "--peer", 0, "--out", exported)
    assert r.returncode == 0, r.stderr
    pt = evaluate(tmp_path, exported, "--config", run / "config.yaml")
    assert pt["peers"][0]["top1"] == pytest.approx(peers[0]["test_acc"], abs=1e-9)
    assert pt["peers"][0]["top5"] == pytest.approx(whole["peers"][0]["top5"], abs=1e-9)

    best = evaluate(tmp_path, run, "--best")
    for p, info in best_checkpoints(run).items():
        assert best["peers"][p]["top1"] == pytest.approx(info.metrics[p], abs=1e-9)
        assert info.path.name in best["peers"][p]["label"]


def test_evaluate_bad_input_is_one_line_and_exit_2(e2e_run, tmp_path):
    run = e2e_run("base2").out
    one_line_error(command("hpcgraft.evaluate", tmp_path / "nothing"), "does not exist")
    one_line_error(command("hpcgraft.evaluate", run, "--peer", 2), "--peer 2 does not exist")
    one_line_error(command("hpcgraft.evaluate", run, "model.num_classes=12"), "fc.weight", "(12, 32)")
    pt = tmp_path / "p1.pt"
    assert command("hpcgraft.checkpoint", "export", run, "--peer", 1, "--out", pt).returncode == 0
    one_line_error(command("hpcgraft.evaluate", pt), "--config")


def test_export_best_and_inspect_marks_the_best(e2e_run, tmp_path):
    """export --best writes the weights of the checkpoint with the peer's highest metric (here made the
    older one by editing a copy's manifest), and inspect marks it."""
    run = e2e_run("base2").copy(tmp_path / "run")
    older, newer = sorted(complete_checkpoints(run / "checkpoints"), key=lambda c: c.step)
    manifest = json.loads((older.path / "MANIFEST.json").read_text())
    manifest["metrics"][0] = 100.0  # the metric only ranks; the files' CRCs are untouched
    (older.path / "MANIFEST.json").write_text(json.dumps(manifest))
    out = tmp_path / "best0.pt"
    r = command("hpcgraft.checkpoint", "export", run, "--best", "--peer", 0, "--out", out)
    assert r.returncode == 0 and older.path.name in r.stdout, r.stdout + r.stderr
    got = torch.load(out, weights_only=True)
    plain = tmp_path / "older0.pt"
    assert command("hpcgraft.checkpoint", "export", older.path, "--peer", 0, "--out", plain).returncode == 0
    want = torch.load(plain, weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)
    r = command("hpcgraft.checkpoint", "inspect", older.path)
    row0 = next(ln for ln in r.stdout.splitlines() if ln.split()[:1] == ["0"])
    assert "*" in row0 and f"peer 0 {older.path.name}" in r.stdout, r.stdout
    r = command("hpcgraft.checkpoint", "inspect", run)  # the newest: best for peer 1 only
    rows = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.split()[:1] in (["0"], ["1"])}
    assert "*" not in rows["0"] and "*" in rows["1"], r.stdout
    one_line_error(command("hpcgraft.checkpoint", "export", older.path, "--best", "--peer", 0, "--out", out),
                   "run directory")


# ------------------------------------------------------------------------------------------ top-5
def make_image_folder(root: Path, classes: int = 12, train_per_class: int = 4, val_per_class: int = 2) -> Path:
    """A tiny ImageFolder tree of random 20x20 PNGs, a little class signal in the mean colour."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 20, 3)) // 2 + (c * 10)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{i}.png")
    return root


def test_top5_recorded_for_more_than_10_classes(tmp_path):
    data = make_image_folder(tmp_path / "folder")
    out = tmp_path / "run"
    r = train(2, out, "train.epochs=1", "log.progress=off", "dist.threads=1", "graft.mode=none",
              "data.name=imagenet", f"data.root={data}", "data.image_size=16", "data.batch_size=8",
              "data.test_batch_size=16", "model.name=resnet20")
    assert r.returncode == 0, r.stderr
    peers, ens = last_epoch(jsonl(out / "metrics.jsonl"))
    assert all(0 <= m["test_acc"] <= m["test_top5"] <= 100 for m in peers), peers
    assert ens["ensemble_acc"] <= ens["ensemble_top5"], ens
    assert all("ensemble_top5" not in m for m in peers)
    got = evaluate(tmp_path, out)
    assert got["classes"] == 12 and got["images"] == 24
    assert [p["top5"] for p in got["peers"]] == pytest.approx([m["test_top5"] for m in peers], abs=1e-9)
    assert got["ensemble"]["top5"] == pytest.approx(ens["ensemble_top5"], abs=1e-9)
    assert [p["top1"] for p in got["peers"]] == pytest.approx([m["test_acc"] for m in peers], abs=1e-9)


# ------------------------------------------------------------------------------------------ init_from
def test_init_from_a_run_then_one_epoch(e2e_run, tmp_path):
    """Peer i starts from peer i of base2's newest checkpoint: after one more epoch at a small rate it is
    above base2's own first epoch and near its last (a fresh start at that rate is far below both). A
    model that does not fit is one line, exit 2."""
    base = e2e_run("base2")
    fresh = {m["peer"]: m["test_acc"] for m in base.metrics() if m["epoch"] == 1 and m["peer"] is not None}
    final = {m["peer"]: m["test_acc"] for m in last_epoch(base.metrics())[0]}
    out = tmp_path / "tuned"
    r = train(2, out, "train.epochs=1", "log.progress=off", "dist.threads=1", "graft.mode=none", "train.lr=0.01",
              f"train.init_from={base.out}")
    assert r.returncode == 0, r.stderr
    assert "peer-001.h5" in r.stderr and "starts from the weights" in r.stderr
    peers, _ = last_epoch(jsonl(out / "metrics.jsonl"))
    assert all(m["test_acc"] > fresh[m["peer"]] and m["test_acc"] >= final[m["peer"]] - 5 for m in peers), \
        (peers, fresh, final)
    r = train(2, tmp_path / "bad", "train.epochs=1", "log.progress=off", "dist.threads=1", "graft.mode=none",
              "model.num_classes=12", f"train.init_from={base.out}")
    one_line_error(r, "fc.weight", "model.num_classes")
    r = train(2, tmp_path / "missing", "train.epochs=1", "log.progress=off", "dist.threads=1", "graft.mode=none",
              f"train.init_from={tmp_path / 'nothing.pt'}")
    one_line_error(r, "train.init_from", "nothing.pt")


def test_init_from_per_peer_files_and_one_for_all(e2e_run, tmp_path):
    run = e2e_run("base2").out
    for p in (0, 1):
        r = command("hpcgraft.checkpoint", "export", run, "--peer", p, "--out", tmp_path / f"p{p}.pt")
        assert r.returncode == 0, r.stderr
    exported = [torch.load(tmp_path / f"p{p}.pt", weights_only=True) for p in (0, 1)]
    state, source = init_state(str(tmp_path / "p{peer}.pt"), 1, 2)
    assert source.endswith("p1.pt") and all(torch.equal(state[k], exported[1][k]) for k in exported[1])
    for peer in (0, 1):  # one file for all
        state, _ = init_state(str(tmp_path / "p0.pt"), peer, 2)
        assert all(torch.equal(state[k], exported[0][k]) for k in exported[0])
    with pytest.raises(ValueError, match="holds 2 peers but this run has 3"):
        init_state(str(run), 0, 3)


# ------------------------------------------------------------------------------------------ continuing
def test_extend_a_finished_run_and_resume_from_a_chosen_step(e2e_run, tmp_path):
    """base2 (2 epochs, finished) continued to 3: without --extend one line naming the flag; with it the
    first two epochs stay as they were and epoch 3 follows the 3-epoch schedule (the declared rule: the
    schedule is the new length's). Then --from-step: a step without a checkpoint lists the ones there are;
    the step of epoch 2's checkpoint re-runs epoch 3 to the same numbers."""
    base = e2e_run("base2")
    run = base.copy(tmp_path / "run")
    before = jsonl(run / "metrics.jsonl")
    one_line_error(train(2, run, *BASE[1:], "train.epochs=3"), "--extend")
    one_line_error(train(2, run, *BASE), "--extend")  # finished, same length
    r = train(2, run, *BASE[1:], "train.epochs=3", "--extend")
    assert r.returncode == 0, r.stderr
    after = jsonl(run / "metrics.jsonl")
    assert after[: len(before)] == before
    third = [m for m in after if m["epoch"] == 3 and m["peer"] is not None]
    cfg = load_config(ROOT / "configs/digits.yaml", [*BASE[1:], "train.epochs=3"])
    steps = third[0]["step"] // 3
    assert [m["lr"] for m in third] == [LRSchedule(cfg.train, steps)(3 * steps - 1)] * 2
    assert json.loads((run / "status.json").read_text())["state"] == "finished"

    steps_there = [c.step for c in complete_checkpoints(run / "checkpoints")]
    line = one_line_error(train(2, run, *BASE[1:], "train.epochs=3", "--from-step", "1"), "step 1")
    assert all(str(s) in line for s in steps_there), line
    r = train(2, run, *BASE[1:], "train.epochs=3", "--from-step", str(2 * steps))
    assert r.returncode == 0 and f"step-{2 * steps:09d}" in r.stderr, r.stderr
    again = jsonl(run / "metrics.jsonl")
    drop = ("seconds",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in again] == \
        [{k: v for k, v in m.items() if k not in drop} for m in after]
