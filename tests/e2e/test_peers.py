"""K peers on any number of ranks (graft.peers): the same run, bit for bit, on 2 and 1 ranks uninterrupted and
resumed onto another layout (4 ranks -> 2 -> 1 -> 4), with one thread per rank."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from tests._util import env, jsonl, train

pytestmark = pytest.mark.mpi

# 5 steps per epoch (batch 256), graft rounds every 2 steps (mid-epoch too), precise BN replaying batches
RING = ("graft.peers=4", "train.epochs=2", "data.batch_size=256", "graft.interval_steps=2", "train.precise_bn=2",
        "log.progress=off", "dist.threads=1")
# the other sums across peers: allreduce grafting, cultivation's logits, early-bird masks between peers
SUMS = ("graft.peers=4", "train.epochs=1", "data.batch_size=256", "graft.interval_steps=2", "train.precise_bn=2",
        "graft.topology=allreduce", "cultivate.lambda=1", "prune.monitor=bn", "log.progress=off", "dist.threads=1")


def _rows(run: Path, name: str) -> list[dict]:
    """The rows of a log, less the seconds (the only field that depends on the layout: it is time)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in jsonl(run / name)]


def _final_state(run: Path) -> dict[str, np.ndarray]:
    """Every dataset of every peer file of the last checkpoint (weights, momentum, progress, RNG), but the
    seconds."""
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    found: dict[str, np.ndarray] = {"step": np.array(last.name)}
    for path in sorted(last.glob("peer-*.h5")):
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj, path=path: found.__setitem__(f"{path.name}/{name}", obj[()])
                         if isinstance(obj, h5py.Dataset) and not name.endswith("seconds") else None)
    return found


def _assert_same_run(a: Path, b: Path) -> None:
    for name in ("metrics.jsonl", "graft.jsonl"):
        assert _rows(a, name) == _rows(b, name), f"{name} of {a.parent.name} and {b.parent.name} differ"
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not np.array_equal(sa[k], sb[k])]
    assert not differ, f"{a.parent.name} and {b.parent.name} differ in {differ[:5]}"


def _train(ranks: int, out: Path, *overrides: str, inject: str | None = None) -> int:
    environ = {k: v for k, v in env().items() if k != "HPCGRAFT_INJECT"}
    if inject:
        environ["HPCGRAFT_INJECT"] = inject
    proc = train(ranks, out, *overrides, environ=environ)
    assert proc.returncode in (0, 75), proc.stderr[-3000:]
    return proc.returncode


@pytest.fixture(scope="module")
def ring_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """K=4 uninterrupted on 2 and 1 ranks."""
    root = tmp_path_factory.mktemp("peers")
    runs = {}
    for ranks in (2, 1):
        runs[f"np{ranks}"] = root / f"np{ranks}" / "run"
        assert _train(ranks, runs[f"np{ranks}"], *RING) == 0
    return runs


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run moved 4 ranks -> 2 -> 1 -> 4 by stops mid-epoch (4 ranks on 2 cores are slow: they train only in
    the moved run, whose every step must match the uninterrupted ones')."""
    moved = tmp_path_factory.mktemp("peers") / "moved" / "run"
    # a stop asked for after step s ends the run after step s+1: steps 3 (epoch 1), 6 and 9 (epoch 2)
    for ranks, stop in ((4, "0:2:usr1"), (2, "1:5:usr1"), (1, "0:8:usr1")):
        assert _train(ranks, moved, *RING, inject=stop) == 75
    assert _train(4, moved, *RING) == 0
    return moved


def test_k_peers_give_the_same_bits_on_4_2_and_1_ranks(ring_runs):
    metrics = jsonl(ring_runs["np1"] / "metrics.jsonl")
    assert sorted({r["peer"] for r in metrics if r["peer"] is not None}) == [0, 1, 2, 3]
    assert not any("rank" in r for r in metrics + jsonl(ring_runs["np1"] / "graft.jsonl"))
    assert len(jsonl(ring_runs["np1"] / "graft.jsonl")) == 4 * 5  # rounds after steps 2, 4, 6, 8, 10
    _assert_same_run(ring_runs["np2"], ring_runs["np1"])


def test_a_run_stopped_on_2_ranks_resumes_on_1_as_the_uninterrupted_one(ring_runs, tmp_path):
    """The layout change of make test; the slow tier moves a run across four layouts below."""
    out = tmp_path / "run"
    assert _train(2, out, *RING, inject="1:5:usr1") == 75  # stops after step 6, in epoch 2
    assert _train(1, out, *RING) == 0
    _assert_same_run(ring_runs["np1"], out)


@pytest.mark.slow  # the resume matrix: four trainings, two of 4 ranks on 2 cores
def test_a_run_resumed_on_other_rank_counts_is_the_uninterrupted_one(ring_runs, moved_run):
    _assert_same_run(ring_runs["np1"], moved_run)


def test_allreduce_cultivation_and_monitors_sum_in_peer_order(tmp_path):
    one, two = tmp_path / "np1", tmp_path / "np2"
    assert _train(1, one, *SUMS) == 0
    assert _train(2, two, *SUMS) == 0
    _assert_same_run(one, two)
    ensemble = [r for r in jsonl(one / "metrics.jsonl") if r["peer"] is None]
    assert ensemble and len(ensemble[0]["eb_peer_dist"]) == 4


def test_batched_peers_train_as_the_sequential_ones(tmp_path):
    """train.batched=true through the training command: the rank's peers in one vmapped step, with grafts and
    cultivation, give the sequential run's metrics and weights to float tolerance (not bitwise: grouped
    convolutions sum in another order)."""
    both = ("graft.peers=2", "train.epochs=1", "data.batch_size=128", "graft.interval_steps=4", "cultivate.lambda=1",
            "graft.topology=allreduce", "log.progress=off", "dist.threads=1")
    sequential, batched = tmp_path / "sequential", tmp_path / "batched"
    assert _train(1, sequential, *both) == 0
    proc = train(1, batched, *both, "train.batched=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 peers (2 per rank, batched)" in proc.stdout + proc.stderr
    for name in ("metrics.jsonl", "graft.jsonl"):
        want, got = _rows(sequential, name), _rows(batched, name)
        assert [sorted(r) for r in got] == [sorted(r) for r in want]
        for w, g in zip(want, got, strict=True):
            for key, value in w.items():
                if isinstance(value, float):
                    assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (name, key)
                elif key not in ("alpha", "alphas"):
                    assert g[key] == value, (name, key)
    sa, sb = _final_state(sequential), _final_state(batched)
    assert sa.keys() == sb.keys()
    for key in sa:  # weights agree to ~1e-4 of their scale, momentum (a sum of gradients) to ~1e-2
        if sa[key].dtype.kind == "f" and sa[key].size:
            assert np.abs(sb[key] - sa[key]).max() <= 0.03 * np.abs(sa[key]).max() + 1e-6, key
