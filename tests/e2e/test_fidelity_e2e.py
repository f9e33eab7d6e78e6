"""Fidelity under real mpirun runs: the best checkpoint holds the weights that earned its metric, and a
run with ``graft.reference=authors`` grafts exactly as the authors' code does."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hpcgraft.data import BatchLoader, build_datasets
from hpcgraft.models import create_model
from hpcgraft.storage.checkpoints import load_member, peer_file, resolve
from tests._util import train

EPOCHS = 4


def _accuracy(state: dict[str, torch.Tensor]) -> float:
    """Test accuracy of a digits_resnet holding ``state``, computed here, apart from the training loop."""
    _, test_set = build_datasets("digits")
    model = create_model("digits_resnet", test_set.num_classes)
    model.load_state_dict(state)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in BatchLoader(test_set, 512, shuffle=False).epoch(0):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def test_every_checkpoint_metric_is_the_accuracy_of_its_stored_weights(tmp_path: Path) -> None:
    """Checkpoints are written after the epoch's graft; the metric that ranks them (and so picks the
    best one kept) must be re-measurable from the weights they hold, not the pre-graft accuracy."""
    out = tmp_path / "run"
    done = train(2, out, f"train.epochs={EPOCHS}", f"checkpoint.keep={EPOCHS}", "train.lr=0.02")
    assert done.returncode == 0, done.stderr[-3000:]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == EPOCHS
    checked = 0
    for ckpt in ckpts:
        info = resolve(ckpt)
        manifest = json.loads((ckpt / "MANIFEST.json").read_text())
        for peer in range(2):
            stored = load_member(info, peer_file(peer))["model"]
            assert manifest["metrics"][peer] == _accuracy(stored), (ckpt.name, peer)
            checked += 1
    assert checked == 2 * EPOCHS
    # the metric written to metrics.jsonl is the pre-graft one: at least one epoch tells them apart,
    # so this test would catch a checkpoint ranked by it
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {(r["epoch"], r["peer"]): r["test_acc"] for r in rows if r["peer"] is not None}
    differs = [ckpt for ckpt in ckpts[:-1] for peer in range(2)
               if json.loads((ckpt / "MANIFEST.json").read_text())["metrics"][peer]
               != logged[(resolve(ckpt).epoch, peer)]]
    assert differs
