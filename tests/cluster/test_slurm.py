"""The SLURM side end to end, on a real cluster of two nodes on this host (tools/slurm_local.sh): the sbatch
scripts (as the checkout's and written out of the package), their shape check, requeue after a checkpoint
on SIGUSR1, submitit submissions from Python, and runs across two nodes. CPU ranks, digits data."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import submitit

from hpcgraft import launch
from hpcgraft.cli import submit as submit_command
from hpcgraft.errors import ConfigError, LaunchError
from hpcgraft.supervise import SHM_LOG, START_TIMEOUT
from hpcgraft.text import plural
from tests._util import ROOT, env, jsonl

pytestmark = pytest.mark.slurm

DIGITS = ["data.name=digits", "model.name=digits_resnet"]


def _wait_for(what: str, ready, timeout: float = 240, every: float = 0.25):
    """Poll until ``ready()`` is truthy; a generous hang guard, not a speed requirement."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = ready()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _job_info(job_id: int) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _wait_job_end(job_id: int) -> dict[str, str]:
    def ended() -> dict[str, str] | None:
        info = _job_info(job_id)
        return info if info.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"} else None

    return _wait_for(f"job {job_id} to end", ended)


def _submitted_id(stdout: str) -> int:
    m = re.search(r"Submitted batch job (\d+)", stdout)
    assert m, stdout
    return int(m.group(1))


def _submit_script(args: list[str] | tuple[str, ...], environ: dict[str, str], cwd: Path, jobs: list[str]) -> int:
    """``bash slurm/graft_cifar.sh ARGS`` from ``cwd`` (where the job's log goes); the job's id, registered
    with the ``jobs`` fixture so that it is cancelled whatever the test does."""
    r = subprocess.run(["bash", str(ROOT / "slurm/graft_cifar.sh"), *args], capture_output=True, text=True,
                       env=environ, cwd=cwd)
    assert r.returncode == 0, r.stderr
    job = _submitted_id(r.stdout)
    jobs.append(str(job))
    return job


def _epochs_once(run: Path, epochs: int, peers: int = 2) -> list[dict]:
    """metrics.jsonl holds every (epoch, peer) exactly once, for every epoch of the run."""
    rows = jsonl(run / "metrics.jsonl")
    seen = Counter((r["epoch"], r["peer"]) for r in rows)
    expected = {(e, p) for e in range(1, epochs + 1) for p in [*range(peers), None]}
    assert set(seen) == expected, sorted(seen, key=str)
    assert all(n == 1 for n in seen.values()), [k for k, n in seen.items() if n > 1]
    return rows


def _kill_ranks(job_id: int) -> None:
    """SIGKILL the tasks of the job's step 0 (scancel would send TERM first, which the ranks handle)."""
    out = subprocess.run(["scontrol", "listpids", str(job_id)], capture_output=True, text=True, check=True).stdout
    pids = [int(f[0]) for f in (line.split() for line in out.splitlines()[1:]) if f[2] == "0" and f[3] != "-"]
    assert pids, out
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def jobs():
    """Job ids a test submitted; whatever is still queued when it ends is cancelled."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def _has_epoch(run: Path, epoch: int) -> bool:
    p = run / "metrics.jsonl"
    try:
        return p.exists() and any(r["epoch"] >= epoch for r in jsonl(p))
    except ValueError:  # a line being written
        return False


def test_sbatch_script_trains_two_grafting_peers(slurm_cluster, tmp_path, jobs):
    run = tmp_path / "run"
    e = env() | {"HPCGRAFT_GPUS_PER_NODE": "0", "HPCGRAFT_TASKS_PER_NODE": "2", "HPCGRAFT_CPUS_PER_TASK": "1",
                 "HPCGRAFT_TIME": "20", "HPCGRAFT_RUN_DIR": str(run)}
    job = _submit_script([*DIGITS, "train.epochs=3"], e, tmp_path, jobs)
    info = _wait_job_end(job)
    log = (tmp_path / f"graft-cifar-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    assert "2 ranks on 1 node (" in log and "finished" in log
    rows = _epochs_once(run, epochs=3)
    grafted = [r for r in rows if r["peer"] is not None and r["epoch"] < 3]
    assert grafted and all(r["alpha_mean"] is not None and 0 < r["alpha_mean"] < 1 for r in grafted)
    grafts = jsonl(run / "graft.jsonl")
    assert {(g["peer"], g["source"]) for g in grafts} == {(0, "peer 1"), (1, "peer 0")}


@pytest.mark.slow  # the resume matrix on SLURM
def test_killed_and_signalled_job_resumes_and_logs_every_epoch_once(slurm_cluster, tmp_path, jobs):
    """Submitted with plain sbatch options (and the ImageNet script). First its ranks are killed and the
    job is put back in the queue (preemption without grace): the restart cleans the dead ranks' MPI
    leftovers and resumes from the last checkpoint. Then the batch shell gets USR1 (as from
    --signal=B:USR1@T): the ranks checkpoint, the job requeues itself and resumes again."""
    run, epochs = tmp_path / "run", 6  # killed after 2, signalled after 4
    e = env() | {"HPCGRAFT_ROOT": str(ROOT), "HPCGRAFT_CONFIG": "configs/digits.yaml", "HPCGRAFT_RUN_DIR": str(run)}
    r = subprocess.run(["sbatch", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=20",
                        str(ROOT / "slurm/graft_imagenet.sh"), f"train.epochs={epochs}"],
                       capture_output=True, text=True, env=e, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = _submitted_id(r.stdout)
    jobs.append(str(job))
    _wait_for("epoch 2", lambda: _has_epoch(run, 2))  # so epoch 1's checkpoint is complete
    _kill_ranks(job)
    assert _wait_job_end(job)["JobState"] == "FAILED"
    subprocess.run(["scontrol", "requeue", str(job)], check=True)
    _wait_for("epoch 4", lambda: _has_epoch(run, 4))
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True)
    _wait_for("the third start", lambda: _job_info(job).get("Restarts") == "2")
    info = _wait_job_end(job)
    log = (tmp_path / f"graft-imagenet-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert "training failed with exit status 137; not requeued" in log and log.count("resuming") == 2, log
    assert "checkpoint written; requeueing job" in log and "finished" in log, log
    _epochs_once(run, epochs)


def test_bad_override_is_refused_before_queueing(slurm_cluster, tmp_path):
    e = env() | {"HPCGRAFT_GPUS_PER_NODE": "0", "HPCGRAFT_CPUS_PER_TASK": "1", "HPCGRAFT_TIME": "20",
                 "HPCGRAFT_CONFIG": "configs/digits.yaml", "HPCGRAFT_RUN_DIR": str(tmp_path / "run")}
    r = subprocess.run(["bash", str(ROOT / "slurm/graft_cifar.sh"), "graft.level=leaf"],
                       capture_output=True, text=True, env=e, cwd=tmp_path)
    assert r.returncode == 2 and "Submitted" not in r.stdout, r.stdout + r.stderr
    assert r.stderr.startswith("graft_cifar.sh: error: ") and "graft.level" in r.stderr and r.stderr.count("\n") == 1


def test_written_out_scripts_run_outside_the_checkout_and_a_failed_start_is_not_requeued(slurm_cluster, tmp_path,
                                                                                         jobs):
    """`python -m hpcgraft.slurm DIR` scripts, submitted from another directory, which is where the job runs
    (HPCGRAFT_DATA is relative to it). The data are packed shards under the config's data.name=imagenet:
    the job fails at once with the fix (exit 2) and is not requeued."""
    scripts, work = tmp_path / "scripts", tmp_path / "work"
    r = subprocess.run([sys.executable, "-m", "hpcgraft.slurm", str(scripts)], capture_output=True, text=True,
                       env=env(), cwd=tmp_path)
    assert r.returncode == 0 and "wrote graft_cifar.sh" in r.stdout, r.stderr
    (work / "shards").mkdir(parents=True)
    (work / "shards" / "train-00000.h5").write_bytes(b"")
    e = env() | {"HPCGRAFT_GPUS_PER_NODE": "0", "HPCGRAFT_CPUS_PER_TASK": "1", "HPCGRAFT_NODES": "1",
                 "HPCGRAFT_TIME": "20", "HPCGRAFT_CONFIG": str(ROOT / "configs/imagenet_resnet18.yaml"),
                 "HPCGRAFT_DATA": "shards"}
    r = subprocess.run(["bash", str(scripts / "graft_imagenet.sh")], capture_output=True, text=True, env=e, cwd=work)
    assert r.returncode == 0, r.stderr
    job = _submitted_id(r.stdout)
    jobs.append(str(job))
    assert f"run dir: {work}/runs/graft-imagenet-{job}" in r.stdout
    info = _wait_job_end(job)
    log = (work / f"graft-imagenet-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0" and info["ExitCode"] == "2:0", log
    assert "data.root=shards holds hpcgraft shards (train-*.h5): add data.name=imagenet_h5" in log, log
    assert "not requeued" in log and "is missing" not in log, log


def _nodes() -> list[str]:
    return subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()


def _printed_example() -> str:
    r = subprocess.run(["bash", str(ROOT / "tools/slurm_local.sh"), "start"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [line.strip() for line in r.stdout.splitlines() if "bash slurm/graft_cifar.sh" in line]
    assert len(lines) == 1, r.stdout
    return lines[0]


def _shm_left(log: Path) -> list[str]:
    """The MPI shared-memory files the ranks named (HPCGRAFT_SHM_LOG) that still exist."""
    named = log.read_text().split() if log.exists() else []
    assert named, "the ranks named no shared-memory files"
    return [f for f in named if Path(f).exists()]


def _ring_crosses_nodes(run: Path, nodes_of: dict[int, str]) -> None:
    """Every peer grafts from exactly one other, the sources form one ring, and (on several nodes) some pair
    spans two nodes."""
    source = {g["peer"]: int(g["source"].split()[-1]) for g in jsonl(run / "graft.jsonl")}
    assert sorted(source) == sorted(nodes_of) and sorted(source.values()) == sorted(nodes_of), source
    seen, p = set(), 0
    while p not in seen:
        seen.add(p)
        p = source[p]
    assert seen == set(nodes_of), source
    if len(set(nodes_of.values())) > 1:
        assert any(nodes_of[p] != nodes_of[q] for p, q in source.items()), (source, nodes_of)


@pytest.mark.slow  # make test trains through the sbatch script above
def test_printed_example_runs_as_printed(slurm_cluster, tmp_path, jobs):
    """The command tools/slurm_local.sh prints, run as printed from the repository root: on the two-node
    cluster 2 nodes x 2 ranks, each rank reporting its node, its local rank and the ranks on its node; the
    grafting ring crosses the nodes; no MPI shared memory is left behind."""
    nodes = _nodes()
    line = _printed_example()
    assert line.startswith(f"HPCGRAFT_NODES={len(nodes)} HPCGRAFT_GPUS_PER_NODE=0"), line
    shm = tmp_path / "shm.log"
    r = subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=ROOT, env=env() | {SHM_LOG: str(shm)})
    assert r.returncode == 0, r.stderr
    job = _submitted_id(r.stdout)
    jobs.append(str(job))
    out, run = ROOT / f"graft-cifar-{job}.out", ROOT / "runs" / f"graft-cifar-{job}"
    try:
        info = _wait_job_end(job)
        log = out.read_text()
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
        ranks = 2 * len(nodes)
        assert f"{ranks} ranks on {plural(len(nodes), 'node')} (" in log and "finished" in log, log
        places = " ".join(f"{2 * k + i}={n}:{i}/2,cpu" for k, n in enumerate(nodes) for i in range(2))
        assert f"rank places (node:local rank/ranks there,device): {places}" in log, log
        _epochs_once(run, epochs=3, peers=ranks)
        _ring_crosses_nodes(run, {r: nodes[r // 2] for r in range(ranks)})
        assert _shm_left(shm) == []
    finally:
        out.unlink(missing_ok=True)
        shutil.rmtree(run, ignore_errors=True)


_NO_START = {
    # Every rank of the first step gets 10 ms to start MPI, as if the launcher's wire-up hung.
    "hung": (f'[ "${{SLURM_STEP_ID:-}}" = 0 ] && export {START_TIMEOUT}=0.01\n',
             [f"did not get through MPI's start-up within 0.01 s ({START_TIMEOUT})"] * 2),
    # Rank 0's training aborts in the first step before MPI is up, as on a garbled wire-up answer (its
    # supervisor runs one that aborts at once); rank 1 then waits in MPI_Init until its clock (5 s) ends it.
    "crashed": (f'[ "${{SLURM_STEP_ID:-}}" = 0 ] && export {START_TIMEOUT}=5\n'
                '[ "${SLURM_STEP_ID:-}" = 0 ] && [ "$SLURM_PROCID" = 0 ] && exec ' + sys.executable + ' -c "import sys;'
                ' from hpcgraft.supervise import supervise;'
                ' sys.exit(supervise([sys.executable, \'-c\', \'import os; os.abort()\']))"\n',
                ["was killed by SIGABRT (an abort in native code) before MPI's start-up completed",
                 f"did not get through MPI's start-up within 5 s ({START_TIMEOUT})"]),
}


@pytest.mark.slow  # two-node SLURM
@pytest.mark.parametrize("how", sorted(_NO_START))
def test_a_step_whose_ranks_cannot_start_mpi_is_started_again(slurm_cluster, tmp_path, jobs, how):
    """The first step's ranks fail to start MPI: each supervisor reports it (exit 69), the script starts the step
    again with the normal clock, and the run finishes."""
    first_step, lines = _NO_START[how]
    python = tmp_path / "python"  # the job's python, which fails the first step's ranks
    python.write_text(f'#!/bin/bash\n{first_step}exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    run = tmp_path / "run"
    e = env() | {"HPCGRAFT_PYTHON": str(python), "HPCGRAFT_NODES": "1", "HPCGRAFT_GPUS_PER_NODE": "0",
                 "HPCGRAFT_TASKS_PER_NODE": "2", "HPCGRAFT_CPUS_PER_TASK": "1", "HPCGRAFT_TIME": "20",
                 "HPCGRAFT_CONFIG": "configs/digits.yaml", "HPCGRAFT_RUN_DIR": str(run)}
    job = _submit_script(["train.epochs=1", "log.progress=off"], e, tmp_path, jobs)
    info = _wait_job_end(job)
    text = (tmp_path / f"graft-cifar-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", text
    for line in set(lines):
        assert text.count(line) == lines.count(line), text
    assert "MPI did not start on every rank (exit 69); starting the step again (1 of 2)" in text, text
    assert "step 2: 2 ranks on 1 node" in text and "finished 1 epoch" in text, text
    _epochs_once(run, 1)


def test_a_rank_killed_on_the_second_node_is_named_by_its_supervisor(slurm_cluster, tmp_path, jobs):
    """2 nodes x 2 ranks; the training process of rank 3 (node 2, local rank 1) is killed with SIGKILL. Its
    supervisor on that node names it, the job fails without a requeue, and no rank of either node leaves
    MPI shared memory behind."""
    nodes = _nodes()
    if len(nodes) < 2:
        pytest.skip("the running local cluster has one node; start it with HPCGRAFT_SLURM_NODES=2")
    run, shm = tmp_path / "run", tmp_path / "shm.log"
    e = env() | {"HPCGRAFT_NODES": "2", "HPCGRAFT_GPUS_PER_NODE": "0", "HPCGRAFT_TASKS_PER_NODE": "2",
                 "HPCGRAFT_CPUS_PER_TASK": "1", "HPCGRAFT_TIME": "20", "HPCGRAFT_CONFIG": "configs/digits.yaml",
                 "HPCGRAFT_RUN_DIR": str(run), SHM_LOG: str(shm)}
    job = _submit_script(["dist.watchdog_s=30"], e, tmp_path, jobs)
    _wait_for("epoch 1", lambda: _has_epoch(run, 1))
    out = subprocess.run(["scontrol", "listpids", str(job), nodes[1]], capture_output=True, text=True,
                         check=True).stdout  # the processes of the job that node's slurmd runs
    step = [f for f in (line.split() for line in out.splitlines()[1:]) if f[2] == "0"]
    # Task 3 is the rank's supervisor; its child, the training, is listed without a task id.
    supervisor = [int(f[0]) for f in step if f[4] == "3"]
    child = [int(f[0]) for f in step
             if int(Path(f"/proc/{f[0]}/stat").read_text().rsplit(")", 1)[1].split()[1]) in supervisor]
    assert len(supervisor) == 1 and len(child) == 1, out
    os.kill(child[0], signal.SIGKILL)
    info = _wait_job_end(job)
    log = (tmp_path / f"graft-cifar-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log
    assert f"hpcgraft: rank 3 (pid {child[0]} on " in log and "was killed by SIGKILL" in log, log
    assert "not requeued" in log, log
    assert _shm_left(shm) == []


@pytest.mark.parametrize(("variables", "problem", "fix"), [
    ({}, "HPCGRAFT_GPUS_PER_NODE=4: the nodes of partition 'debug' have at most 0 GPUs",
     "HPCGRAFT_GPUS_PER_NODE=0 HPCGRAFT_TASKS_PER_NODE=2 HPCGRAFT_CPUS_PER_TASK={half}"),
    ({"HPCGRAFT_GPUS_PER_NODE": "0"}, "HPCGRAFT_CPUS_PER_TASK=4 for 2 ranks per node: the nodes of partition "
     "'debug' have at most {cpus} CPUs", "HPCGRAFT_GPUS_PER_NODE=0 HPCGRAFT_CPUS_PER_TASK={half}"),
    ({"HPCGRAFT_GPUS_PER_NODE": "0", "HPCGRAFT_CPUS_PER_TASK": "1", "HPCGRAFT_NODES": "9"},
     "HPCGRAFT_NODES=9: partition 'debug' has {nodes_word}",
     "HPCGRAFT_NODES={nodes} HPCGRAFT_GPUS_PER_NODE=0 HPCGRAFT_CPUS_PER_TASK=1"),
])
def test_script_refuses_a_shape_that_can_never_start_with_the_line_that_can(slurm_cluster, tmp_path, jobs,
                                                                            variables, problem, fix):
    """What used to be rejected by sbatch (a GPU request on GPU-less nodes) or pend forever (more CPUs
    or nodes than the partition has) is refused before sbatch, in one line ending in a command line that
    submits; that line, run as printed, is accepted (the job is submitted held, then cancelled)."""
    cpus = os.cpu_count()
    nodes = len(_nodes())
    subs = {"cpus": cpus, "half": max(1, cpus // 2), "nodes": nodes, "nodes_word": plural(nodes, "node")}
    script = str(ROOT / "slurm/graft_cifar.sh")
    e = env() | {"HPCGRAFT_SBATCH_ARGS": "--hold"}
    r = subprocess.run(["bash", script, "train.epochs=1"], capture_output=True, text=True, cwd=tmp_path,
                       env=e | variables)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    err = r.stderr.strip()
    assert "\n" not in err and err.startswith(f"graft_cifar.sh: error: {problem.format(**subs)}"), err
    run = f"run: {fix.format(**subs)} bash {script} train.epochs=1"
    assert err.endswith(f"this can never start; {run}"), err
    r = subprocess.run(["bash", "-c", run.removeprefix("run: ")], capture_output=True, text=True, cwd=tmp_path,
                       env=e)
    assert r.returncode == 0, r.stderr
    job = _submitted_id(r.stdout)
    jobs.append(str(job))
    assert _job_info(job)["JobState"] == "PENDING"


def test_plain_sbatch_without_a_shape_says_which_option_starts_more_ranks(slurm_cluster, tmp_path, jobs):
    """sbatch with no task options starts one rank; grafting needs two. The log counts the one rank and
    the error names the sbatch option and the scripts' variables, not mpirun."""
    e = env() | {"HPCGRAFT_ROOT": str(ROOT), "HPCGRAFT_CONFIG": "configs/digits.yaml",
                 "HPCGRAFT_RUN_DIR": str(tmp_path / "run")}
    r = subprocess.run(["sbatch", "--time=20", str(ROOT / "slurm/graft_imagenet.sh")], capture_output=True,
                       text=True, env=e, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = _submitted_id(r.stdout)
    jobs.append(str(job))
    info = _wait_job_end(job)
    log = (tmp_path / f"graft-imagenet-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert f"job {job}, start 1: 1 rank on 1 node (" in log, log
    assert ("grafting between peers needs at least 2 peers but this run has 1; start it with K (K >= 2) SLURM "
            "tasks: sbatch --ntasks-per-node (with --nodes), or for slurm/graft_*.sh HPCGRAFT_TASKS_PER_NODE") in log
    assert "mpirun" not in log, log


def test_script_refuses_a_time_limit_inside_the_warning(tmp_path):
    e = env() | {"HPCGRAFT_TIME": "4"}
    r = subprocess.run(["bash", str(ROOT / "slurm/graft_cifar.sh")], capture_output=True, text=True, env=e)
    assert r.returncode == 2 and "not longer than the 300 s warning" in r.stderr


@pytest.mark.slow  # the resume matrix on SLURM; submitit's submission: tests/e2e/test_sweep.py
def test_submitit_run_completes_and_resumes_after_timeout(slurm_cluster, tmp_path, jobs):
    """Two tasks from Python form one MPI world under srun. USR1 to the tasks, what SLURM sends before the
    time limit, makes submitit count a time-out (a 10-minute job has always "timed out"), call
    GraftRun.checkpoint and requeue; the requeued job resumes and finishes."""
    run, epochs = tmp_path / "run", 4
    job = launch.submit("configs/digits.yaml", run, [f"train.epochs={epochs}"], tasks_per_node=2,
                        executor="slurm", time_min=10, max_requeues=2)
    jobs.append(job.job_id)
    assert isinstance(job, submitit.SlurmJob) and job.num_tasks == 2
    _wait_for("the first epoch", lambda: _has_epoch(run, 1))
    subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True)
    assert launch.wait(job, timeout_s=300) == [0, 0]
    assert _job_info(int(job.job_id))["Restarts"] == "1"
    log = job.paths.stdout.read_text() + job.paths.stderr.read_text()
    assert "this job is timed-out" in log and "Calling checkpoint method" in log and "resuming" in log, log
    _epochs_once(run, epochs)
    table = launch.final_metrics(run)
    assert f"{epochs}/{epochs}" in table and "ens" in table


@pytest.mark.slow  # a requeue on SLURM
def test_submitit_ranks_that_cannot_start_mpi_are_requeued_then_fail_with_the_cause(slurm_cluster, tmp_path, jobs,
                                                                                    monkeypatch):
    """No start's ranks get through MPI's start-up in 10 ms: the supervisors end them (exit 69), rank 0 has
    the job requeued once (HPCGRAFT_START_RETRIES=1), then the job fails naming the status; it never hangs
    and trains nothing."""
    monkeypatch.setenv(START_TIMEOUT, "0.01")  # sbatch passes the environment on to the tasks
    monkeypatch.setenv("HPCGRAFT_START_RETRIES", "1")
    run = tmp_path / "run"
    job = launch.submit("configs/digits.yaml", run, ["train.epochs=1"], tasks_per_node=2, executor="slurm",
                        time_min=10)
    jobs.append(job.job_id)
    with pytest.raises(LaunchError, match="task 0 failed"):
        launch.wait(job, timeout_s=300)
    assert _job_info(int(job.job_id))["Restarts"] == "1"
    log = job.paths.stderr.read_text()
    assert "hpcgraft.train exited with status 69" in log, log
    assert log.count(f"did not get through MPI's start-up within 0.01 s ({START_TIMEOUT})") == 2, log
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


@pytest.mark.slow  # two-node SLURM
def test_submitit_run_on_two_nodes(slurm_cluster, tmp_path, jobs, monkeypatch):
    """hpcgraft.launch with --nodes 2: srun's tasks form one world over both nodes, each rank reports its node
    and local rank, the ring crosses nodes, every task returns 0 and no MPI shared memory is left."""
    nodes = _nodes()
    if len(nodes) < 2:
        pytest.skip("the running local cluster has one node; start it with HPCGRAFT_SLURM_NODES=2")
    shm = tmp_path / "shm.log"
    monkeypatch.setenv(SHM_LOG, str(shm))  # sbatch passes the environment on to the tasks
    run = tmp_path / "run"
    job = launch.submit("configs/digits.yaml", run, ["train.epochs=2"], nodes=2, tasks_per_node=2,
                        executor="slurm", time_min=10)
    jobs.append(job.job_id)
    assert launch.wait(job, timeout_s=600) == [0, 0, 0, 0]
    log = job.paths.stdout.read_text() + job.paths.stderr.read_text()  # rank 0's task; hpcgraft logs on stderr
    places = " ".join(f"{2 * k + i}={n}:{i}/2,cpu" for k, n in enumerate(nodes[:2]) for i in range(2))
    assert f"rank places (node:local rank/ranks there,device): {places}" in log, log
    _epochs_once(run, epochs=2, peers=4)
    _ring_crosses_nodes(run, {r: nodes[r // 2] for r in range(4)})
    assert _shm_left(shm) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"partition": "gpu-nope"}, "partition 'gpu-nope' does not exist; sinfo lists: debug"),
    ({"gpus_per_node": 4, "tasks_per_node": None}, "--gpus-per-node 4: the nodes of partition 'debug' have at most 0"),
    ({"nodes": 9, "tasks_per_node": 2}, "--nodes 9: partition 'debug' has "),
    ({"tasks_per_node": 2, "cpus_per_task": 64}, "the nodes of partition 'debug' have at most"),
])
def test_submit_rejects_requests_the_cluster_cannot_run(slurm_cluster, tmp_path, kwargs, message):
    with pytest.raises(LaunchError, match=re.escape(message)):
        launch.submit(None, tmp_path / "run", executor="slurm", **({"tasks_per_node": 2} | kwargs))
    assert not (tmp_path / "run").exists()


def test_submit_says_when_slurm_is_unreachable(slurm_cluster, tmp_path, monkeypatch):
    # A copy of the cluster's config whose controller port nobody listens on: slurmctld "down".
    conf = tmp_path / "slurm.conf"
    conf.write_text(re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=1", slurm_cluster.read_text()))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    with pytest.raises(LaunchError, match="SLURM is not reachable: 'sinfo .*check that slurmctld is up"):
        launch.submit(None, tmp_path / "run", executor="slurm", tasks_per_node=2)


def test_submit_says_when_there_is_no_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, sinfo or srun
    with pytest.raises(LaunchError, match="SLURM is not available here .*--executor local"):
        launch.submit(None, tmp_path / "run", executor="slurm", tasks_per_node=2)


def test_command_line_reports_a_bad_request_in_one_line(slurm_cluster, tmp_path, capsys):
    rc = submit_command.main(["--out", str(tmp_path / "run"), "--executor", "slurm", "--partition", "nope"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "hpcgraft.launch: error: partition 'nope' does not exist; sinfo lists: debug"


def test_submit_checks_the_config_before_queueing(tmp_path):
    with pytest.raises(ConfigError, match="graft.level"):
        launch.submit("configs/digits.yaml", tmp_path / "run", ["graft.level=leaf"], tasks_per_node=2)
