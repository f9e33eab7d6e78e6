"""Collective checkpoint save / latest / load under real mpirun ranks: pruning, a failed save on one rank,
and the fallback from a damaged checkpoint, the same on every rank."""

from __future__ import annotations

import json

import pytest

from tests._util import mpirun

# ---------------------------------------------------------------------------------------------- mpirun

MPI_SCRIPT = r'''
import json, sys
from pathlib import Path
import torch
from mpi4py import MPI
from hpcgraft.errors import CheckpointError
from hpcgraft.storage.checkpoints import CheckpointManager

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def scenario(run_dir, peers):
    replicas = size // peers
    peer, writer = rank // replicas, rank % replicas == 0
    mgr = CheckpointManager(run_dir, comm, peer=peer, peers=peers, writer=writer, keep=1)
    out = {"rank": rank, "peer": peer}

    def tree(step):
        return {"model": {"w": torch.full((1000,), 100.0 * peer + step)}, "progress": {"step": step, "peer": peer}}

    # Every peer's best metric is at a different step: peer p peaks at step p + 1.
    for step in (1, 2, 3, 4):
        metric = 1.0 if step == peer + 1 else 0.1 * step
        info = mgr.save(step, step, tree(step), {"config": "x: 1\n"} if rank == 0 else None, metric=metric)
    comm.Barrier()
    out["dirs"] = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    info = mgr.latest()
    got = mgr.load_peer(info, peer)
    out["latest"] = info.step
    out["loaded_ok"] = torch.equal(got["model"]["w"], tree(4)["model"]["w"]) and got["progress"] == tree(4)["progress"]
    out["run"] = mgr.load_run(info)

    # A failure on one rank raises on every rank instead of hanging the others.
    try:
        mgr.save(5, 5, {"bad": object()} if peer == peers - 1 and writer else tree(5), None)
        out["failed_save"] = None
    except CheckpointError as exc:
        out["failed_save"] = str(exc)
    comm.Barrier()
    out["after_failure"] = mgr.latest().step

    # Damage the newest checkpoint: every rank falls back to the same one.
    if rank == 0:
        f = info.path / f"peer-{peers - 1:03d}.h5"
        data = bytearray(f.read_bytes())
        data[-100] ^= 1
        f.write_bytes(data)
    comm.Barrier()
    out["fallback"] = mgr.latest().step
    (run_dir / f"result-{rank}.json").write_text(json.dumps(out))


for peers in map(int, sys.argv[2:]):
    scenario(Path(sys.argv[1]) / f"peers{peers}", peers)
'''


@pytest.mark.mpi
@pytest.mark.parametrize(("np_", "layouts"), [(2, [2, 1]), (3, [3])], ids=["np2", "np3"])
def test_collective_save_latest_load_under_mpirun(tmp_path, np_, layouts):
    """Each layout (peers x replicas over the same ranks) runs its own scenario in the same mpirun."""
    script = tmp_path / "ckpt_ranks.py"
    script.write_text(MPI_SCRIPT)
    res = mpirun(np_, str(script), str(tmp_path), *map(str, layouts), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    damaged = [line for line in res.stderr.splitlines() if "is damaged" in line]  # rank 0 only, once per scenario
    expected_damaged = []
    for peers in layouts:
        replicas = np_ // peers
        results = [json.loads((tmp_path / f"peers{peers}" / f"result-{rank}.json").read_text()) for rank in range(np_)]
        for r in results:
            # keep=1: the newest (step 4) plus each peer's best (peer p: step p + 1).
            assert r["dirs"] == [f"step-{s:09d}" for s in sorted({4, *range(1, peers + 1)})]
            assert r["latest"] == 4 and r["loaded_ok"] and r["run"] == {"config": "x: 1\n"}
            assert f"rank {(peers - 1) * replicas} could not write step-000000005: cannot store /bad: object" in r[
                "failed_save"]
            assert r["after_failure"] == 4  # the failed save left nothing that counts
            assert r["fallback"] == peers  # step 4 damaged: the newest intact one is the last peer's best
        expected_damaged.append(f"hpcgraft: checkpoint step-000000004 is damaged (peer-{peers - 1:03d}.h5: checksum "
                                f"mismatch); falling back to step-{peers:09d}")
    assert damaged == expected_damaged


