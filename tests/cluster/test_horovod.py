"""Peers of several ranks (peers x replicas) with real mpirun ranks and real Horovod, on the digits data.

Run as a script under mpirun (``python tests/cluster/test_horovod.py graft-check``) this file is also the rank
program of :func:`test_sharded_graft_is_the_unsharded_graft`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from hpcgraft.supervise import CHILD_MARK
from tests._util import MPIRUN, ROOT, env, jsonl, mpirun, train
from tests.runs import HYBRID


def _horovod_importable() -> bool:
    # In a child process: loading Horovod's MPI library into the pytest process is not needed here.
    probe = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True, env=env())
    return probe.returncode == 0


needs_horovod = pytest.mark.skipif(not _horovod_importable(),
                                   reason="horovod.torch is not importable; install it with bash "
                                          "tools/build_horovod.sh .venv (make setup does)")


def _check_lines(stderr: str, what: str) -> list[str]:
    # Ranks share stderr, so two messages can land on one line: split at each message's rank prefix.
    messages = re.findall(r"\[rank \d+\] hpcgraft: HPCGRAFT_CHECK_REPLICAS: [^\[\n]*", stderr)
    return [m for m in messages if f"after {what}" in m]


STEPS = 66  # 3 epochs of 22 steps (1442 training images, batches of 64 per peer = 2 x 32 per replica)


def _hybrid(out: Path) -> subprocess.CompletedProcess:
    """2 peers x 2 replicas; the loop compares the replicas after every step, buffer sync and graft."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPCGRAFT_CHECK_REPLICAS", "1")
        return train(4, out, *HYBRID)


@pytest.fixture
def hybrid_run(e2e_run) -> tuple[Path, subprocess.CompletedProcess]:
    """The run "hybrid" of tests/runs.py (made ahead, in the background, while other tests run)."""
    run = e2e_run("hybrid")
    return run.out, run.proc


def _peer_file(run: Path, step: int, peer: int) -> dict[str, torch.Tensor]:
    with h5py.File(run / "checkpoints" / f"step-{step:09d}" / f"peer-{peer:03d}.h5", "r") as f:
        return {k: torch.as_tensor(v[()]) for k, v in f["model"].items()}


@pytest.mark.mpi
@pytest.mark.horovod
@needs_horovod
def test_replicas_stay_identical_through_steps_and_grafts(hybrid_run):
    out, r = hybrid_run
    assert r.returncode == 0, r.stderr
    assert "2 peers x 2 replicas" in r.stderr
    grafts = _check_lines(r.stderr, "graft")
    assert len(grafts) == 12, r.stderr  # grafts at steps 10, 20, ..., 60, checked on both peers
    for step in range(10, STEPS, 10):
        for peer in (0, 1):
            assert any(f"peer {peer}: 2 replicas identical after graft at step {step} ({step} steps checked)" in line
                       for line in grafts), r.stderr
    assert len(_check_lines(r.stderr, "buffer sync")) >= 6  # epoch ends (and before each graft)
    rows = [row for row in jsonl(out / "metrics.jsonl") if row["peer"] is not None]
    assert [(row["epoch"], row["peer"]) for row in rows] == [(e, p) for e in (1, 2, 3) for p in (0, 1)]
    assert rows[-1]["train_loss"] != rows[-2]["train_loss"]  # the peers differ
    records = jsonl(out / "graft.jsonl")
    assert sorted((g["step"], g["peer"]) for g in records) == [(s, p) for s in range(10, STEPS, 10) for p in (0, 1)]
    assert all(0.3 < g["alpha_mean"] < 0.7 and g["alpha_mean"] != 0.5 for g in records)
    # One checkpoint file per peer (written by its replica 0), and the two peers differ.
    final = out / "checkpoints" / f"step-{STEPS:09d}"
    assert sorted(f.name for f in final.glob("*.h5")) == ["peer-000.h5", "peer-001.h5", "run.h5"]
    assert not torch.equal(_peer_file(out, STEPS, 0)["conv1.weight"], _peer_file(out, STEPS, 1)["conv1.weight"])


def _rank_pids(run: Path) -> list[int]:
    """The training ranks of a run: python processes whose command line names its run directory, and not
    their supervisors (hpcgraft.supervise marks the ranks it starts in their environment)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
            environ = (cmdline.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "python" in Path(argv[0].decode()).name and str(run).encode() in argv and \
                f"{CHILD_MARK}=1".encode() in environ:
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.slow  # Horovod beyond its smoke test (the replicas test above)
@pytest.mark.mpi
@pytest.mark.horovod
@needs_horovod
def test_stop_and_resume_with_replicas_continues_the_same_run(hybrid_run, tmp_path):
    """SIGUSR1 to every rank in epoch 2 (as SLURM sends before a time limit): a checkpoint, exit 75; the
    same command resumes from it on all replicas and ends where the uninterrupted run ended."""
    baseline, done = hybrid_run
    assert done.returncode == 0, done.stderr
    out = tmp_path / "run"
    cmd = [MPIRUN, "-np", "4", sys.executable, "-m", "hpcgraft.train", "--config", str(ROOT / "configs/digits.yaml"),
           "--out", str(out), *HYBRID]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT) as job:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-000000022" / "MANIFEST.json").exists():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1]
            time.sleep(0.2)
        pids = _rank_pids(out)
        assert len(pids) == 4, pids
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        _, stderr = job.communicate(timeout=300)
    assert job.returncode == 75, stderr
    assert "stopped by signal at epoch 2" in stderr
    stopped = int(json.loads((out / "status.json").read_text())["step"])
    assert 22 <= stopped < STEPS

    r = _hybrid(out)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and f"step {stopped})" in r.stderr
    assert _check_lines(r.stderr, "graft"), r.stderr  # replicas identical after the resume as well
    rows = [(row["epoch"], row["peer"]) for row in jsonl(out / "metrics.jsonl") if row["peer"] is not None]
    assert rows == [(e, p) for e in (1, 2, 3) for p in (0, 1)]
    for peer in (0, 1):
        resumed, straight = _peer_file(out, STEPS, peer), _peer_file(baseline, STEPS, peer)
        for k, t in straight.items():
            # Weights do not depend on BatchNorm running statistics, which were averaged once more at the stop.
            if "running" in k:
                assert torch.allclose(resumed[k], t, rtol=1e-5, atol=1e-6), k
            else:
                assert torch.equal(resumed[k], t), k


@pytest.mark.slow  # Horovod beyond its smoke test (the replicas test above)
@pytest.mark.mpi
@pytest.mark.horovod
@needs_horovod
def test_sharded_graft_is_the_unsharded_graft():
    r = mpirun(4, str(ROOT / "tests" / "cluster" / "test_horovod.py"), "graft-check")
    assert r.returncode == 0, r.stdout + r.stderr
    for case in ("ring/layer", "ring/filter", "allreduce/layer"):
        assert f"graft-check {case}: ok" in r.stdout, r.stdout + r.stderr


@pytest.mark.horovod
@needs_horovod
def test_channels_last_with_replicas_is_one_line():
    """Decided before any MPI work: checked in process, with the real Horovod. (The other layout errors
    are in tests/unit/cli/test_setup_errors.py.)"""
    from hpcgraft.comm.replicas import require_horovod
    from hpcgraft.config import load_config
    from hpcgraft.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(
            "dist.channels_last=true does not work with dist.replicas=2: Horovod 0.28.1 reduces only "
            "contiguous tensors (horovod issue 3491); set dist.channels_last=false")):
        require_horovod(load_config(None, ["dist.replicas=2", "dist.channels_last=true"]).dist)


# ---------------------------------------------------------------------------------------- rank program
def graft_check() -> None:
    """On 4 ranks (2 peers x 2 replicas): train (the end of an epoch) through the training loop's own functions, graft
    with the sharded exchange, and compare with graft_state and with the unsharded exchange."""
    import torch

    from hpcgraft.comm.exchange import GraftExchange
    from hpcgraft.comm.failure import StopRequest
    from hpcgraft.comm.replicas import ShardedTransport
    from hpcgraft.comm.world import init_world
    from hpcgraft.config import load_config
    from hpcgraft.method import grafting
    from hpcgraft.training import loop as htrain
    from hpcgraft.training.peer import build_peer, make_exchange

    cfg = load_config(str(ROOT / "configs/digits.yaml"), ["dist.replicas=2", "dist.threads=1"])
    world = init_world(cfg.dist.replicas)
    assert world.peers == 2, "run with mpirun -np 4"
    peer = build_peer(cfg, world)
    peer.replicas.broadcast_state(peer.model, peer.optimizer)
    stop = StopRequest(world.comm)
    for topology, level in (("ring", "layer"), ("ring", "filter"), ("allreduce", "layer")):
        cfg.graft.topology, cfg.graft.level = topology, level
        peer.exchange = make_exchange(peer)
        assert isinstance(peer.exchange.transport, ShardedTransport)
        peer.progress.start_epoch()
        peer.progress.batch = len(peer.train_loader) - 3  # the epoch's last 3 batches are enough
        htrain.train_one_epoch(peer, stop)  # real steps; ends with the replicas' buffer sync
        peer.progress.epoch += 1
        peer.progress.batch = 0
        before = {k: v.clone() for k, v in peer.model.state_dict().items()}
        unsharded = {k: v.clone() for k, v in before.items()}  # the same round with one rank per peer
        GraftExchange(unsharded, world.graft_comm, grafting.GraftMath(level=level), topology=topology).graft()
        htrain.graft(peer)
        after = {k: v.clone() for k, v in peer.model.state_dict().items()}
        states = world.comm.gather((world.peer, world.replica, before, after, unsharded), root=0)
        if world.rank == 0:
            by = {(p, r): (b, a, u) for p, r, b, a, u in states}
            for p in range(2):
                for i in range(3):  # pre-graft, grafted and unsharded states: equal on both replicas
                    assert all(torch.equal(x, y) for x, y in zip(by[p, 0][i].values(), by[p, 1][i].values(),
                                                                 strict=True)), (p, i)
            assert not torch.equal(by[0, 0][0]["conv1.weight"], by[1, 0][0]["conv1.weight"]), "peers must differ"
            for p in range(2):
                grafted, unsharded_p = by[p, 0][1], by[p, 0][2]
                assert all(torch.equal(grafted[k], unsharded_p[k]) for k in grafted), (topology, level, p)
                if topology == "ring":
                    expected, _ = grafting.graft_state(by[p, 0][0], by[1 - p, 0][0], level=level)
                    assert all(torch.equal(grafted[k], expected[k]) for k in grafted), (topology, level, p)
                    assert not torch.equal(grafted["conv1.weight"], by[p, 0][0]["conv1.weight"])
            print(f"graft-check {topology}/{level}: ok", flush=True)
    stop.close()


if __name__ == "__main__":  # under mpirun, with the project on PYTHONPATH (tests._util.env)
    if sys.argv[1:] == ["graft-check"]:
        graft_check()
