"""The pruning command on a real 2-epoch run: masks, a 1-epoch fine-tune under mpirun, prune.json, and the
one-line errors of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests._util import ROOT, env, mpirun

QUIET = ("log.progress=off", "dist.threads=1")  # key=value words after the options


def prune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcgraft.prune", *args], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=300)


def test_prune_and_finetune_under_mpirun(e2e_run, tmp_path):
    run = e2e_run("base2").out  # read only: the command writes into --out
    out = tmp_path / "pruned"
    r = mpirun(2, "-m", "hpcgraft.prune", str(run), "--criterion", "l1,bn", "--keep", "0.5",
               "--finetune-epochs", "1", "--out", str(out), *QUIET)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "prune.json").read_text())
    assert doc["arm"] == "baseline" and doc["finetune_epochs"] == 1 and set(doc["unpruned"]) == {"0", "1"}
    assert [(x["criterion"], x["keep"]) for x in doc["results"]] == [("l1", 0.5), ("bn", 0.5)]
    assert doc["redundant_removed"]
    for res in doc["results"]:
        assert res["kept"] == -(-res["total"] // 2) and res["pruned_zero"]
        kernels = res["kernels"]
        # global l1 ranks by fan-in first: it drops the whole first conv, and then nothing is left on a path
        for p in ("0", "1"):
            assert 0 <= kernels["kept"][p] <= kernels["kept_by_criterion"][p] <= kernels["total"]
        assert set(res["top1"]) == {"0", "1"} and 0 <= res["ensemble"] <= 100
        for p in (0, 1):
            weights = torch.load(out / f"{res['criterion']}-keep0.5" / f"peer-{p:03d}.pt", weights_only=True)
            mask = torch.load(out / f"{res['criterion']}-keep0.5" / f"peer-{p:03d}.mask.pt", weights_only=True)
            pruned = kept = 0
            left = kernels["kept"][str(p)]
            assert sum(int(m.sum()) for m in mask["masks"].values() if m.dim() == 2) == left
            for name, m in mask["masks"].items():
                w = weights[name]
                m = m.reshape(*m.shape, *([1] * (w.dim() - m.dim()))).expand_as(w)
                assert (w[~m] == 0).all(), f"{name} of peer {p}: pruned weights moved in fine-tuning"
                pruned += int((~m).sum())
                kept += int((w[m] != 0).sum())
            assert pruned > 0 and (kept > 0) == (left > 0)
    assert "ensemble" in r.stdout and "l1" in r.stdout


@pytest.mark.parametrize("args,message", [
    (("--criterion", "magnitude", "--keep", "0.5"), "unknown pruning criterion 'magnitude'"),
    (("--criterion", "l1", "--keep", "0"), "keep fraction 0.0 must lie in (0, 1]"),
    (("--criterion", "bn", "--keep", "1.5"), "keep fraction 1.5 must lie in (0, 1]"),
    (("--criterion", "l1", "--keep", "half"), "is not a comma-separated list of floats"),
])
def test_bad_request_is_one_line(e2e_run, tmp_path, args, message):
    out = tmp_path / "out"
    r = prune(str(e2e_run("base2").out), *args, "--out", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not out.exists()  # decided before any work


def test_path_neither_run_nor_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty"):
        r = prune(str(path), "--criterion", "l1", "--keep", "0.5", "--out", str(tmp_path / "out"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "hpcgraft.prune: error:" in r.stderr
