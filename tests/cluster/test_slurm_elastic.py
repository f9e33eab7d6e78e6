"""A job that loses a node goes on with the nodes left (the sbatch scripts run --no-kill): on the local
two-node cluster, 2 nodes x 2 ranks host K=4 peers; node 2's slurmd and the job's processes there are
killed mid-run, as if the node had died; SLURM declares it DOWN and ends the step, the script starts the
next step on node 1 alone (2 ranks, 2 peers each), which resumes from the last checkpoint and finishes
with the bits of an uninterrupted K=4 run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests._util import env
from tests.cluster.test_slurm import _job_info, _nodes, _submit_script, _wait_for, jobs  # noqa: F401 - jobs: fixture
from tests.e2e import test_peers
from tests.runs import RUNS

pytestmark = [pytest.mark.slurm, pytest.mark.slow]  # two-node SLURM: make test-all and CI

# K=4, 11 steps per epoch, graft rounds every 4 steps; the run checkpoints every epoch (the default)
REFERENCE = "peers4_3ep"
ELASTIC = RUNS[REFERENCE].overrides
FIRST_CHECKPOINT = "step-000000011"


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill_node(job: int, node: str, cluster: Path) -> None:
    """What a dead node leaves: its slurmd silent, and the job's processes there (the step's slurmstepd, the
    ranks' supervisors and the ranks) gone at once."""
    out = subprocess.run(["scontrol", "listpids", str(job), node], capture_output=True, text=True, check=True).stdout
    tasks = {int(f[0]) for f in (line.split() for line in out.splitlines()[1:]) if f[2] == "0"}
    assert tasks, out
    stepds = {int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) for p in tasks} - tasks
    os.kill(int((cluster / f"slurmd-{node}.pid").read_text()), signal.SIGKILL)
    doomed, todo = set(), [*stepds]
    while todo:
        pid = todo.pop()
        doomed.add(pid)
        todo += _children(pid)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _restore(node: str, conf: Path) -> None:
    """The node's slurmd back, and the node in service (ReturnToService=2 does it on registration)."""
    pid = conf.parent / f"slurmd-{node}.pid"
    alive = pid.exists() and Path(f"/proc/{pid.read_text().strip()}").exists()
    if not alive:
        subprocess.run(["slurmd", "-f", str(conf), "-N", node], check=True)

    def up() -> bool:
        state = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True).stdout.strip()
        if state.startswith("down") and not state.endswith("*"):
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
        return state in ("idle", "mix", "alloc")

    _wait_for(f"node {node} back in service", up, timeout=300, every=1)


def test_a_job_that_loses_a_node_finishes_on_the_nodes_left_with_the_uninterrupted_bits(slurm_cluster, tmp_path,
                                                                                         jobs, e2e_run):  # noqa: F811
    nodes = _nodes()
    if len(nodes) < 2:
        pytest.skip("the running local cluster has one node; start it with HPCGRAFT_SLURM_NODES=2")
    run = tmp_path / "run"
    e = env() | {"HPCGRAFT_NODES": "1-2", "HPCGRAFT_GPUS_PER_NODE": "0", "HPCGRAFT_TASKS_PER_NODE": "2",
                 "HPCGRAFT_CPUS_PER_TASK": "1", "HPCGRAFT_TIME": "20", "HPCGRAFT_CONFIG": "configs/digits.yaml",
                 "HPCGRAFT_RUN_DIR": str(run)}
    _wait_for("every node idle", lambda: set(subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True,
                                                            text=True).stdout.split()) == {"idle"}, every=1)
    job = _submit_script(ELASTIC, e, tmp_path, jobs)
    log = tmp_path / f"graft-cifar-{job}.out"
    try:
        _wait_for("the first checkpoint", lambda: (run / "checkpoints" / FIRST_CHECKPOINT / "MANIFEST.json").exists())
        _kill_node(job, nodes[1], slurm_cluster.parent)
        info = _wait_for(f"job {job} to end", lambda: (i := _job_info(job)).get("JobState") in
                         {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"} and i, timeout=900, every=1)
    finally:
        _restore(nodes[1], slurm_cluster)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert f"start 1: 4 ranks on 2 nodes ({nodes[0][:-1]}[1-2]), 4 peers, 1 per rank" in text, text
    assert f"lost {nodes[1]} (SLURM took it out of the job)" in text, text
    # "step 2", or later where a step whose MPI start failed was started again
    assert re.search(rf"step \d+: 2 ranks on 1 node \({nodes[0]}\), 4 peers, 2 per rank", text), text
    assert f"resuming {run} from {FIRST_CHECKPOINT}" in text and "finished" in text, text
    test_peers._assert_same_run(run, e2e_run(REFERENCE).out)
