"""Runs that survive: exact resume after stops, kill -9, damaged checkpoints, failures, NaN weights and the
run-directory rules, all through the real training command under mpirun (digits, 2 epochs of 22 steps).

HPCGRAFT_INJECT (a test hook, hpcgraft/training/faults.py) places a signal, an exception, a stall or NaN weights
right after a given optimizer step of a given rank, so these runs fail exactly where a test needs them to.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcgraft.cli import train as train_command
from hpcgraft.errors import EXIT_REQUEUE
from hpcgraft.storage.tree import read_tree
from tests._util import MPIRUN, ROOT, env, jsonl, train
from tests.runs import RUNS

pytestmark = pytest.mark.mpi

STEPS = 22  # optimizer steps per digits epoch at batch size 64


def requeue_status_of_the_slurm_scripts() -> int:
    """The exit status on which slurm/common.sh requeues the job: the `case` label of the branch that runs
    `scontrol requeue`. The stopped runs below must exit with exactly it."""
    label = None
    for line in (ROOT / "slurm" / "common.sh").read_text().splitlines():
        if m := re.match(r"\s*(\d+)\)", line):
            label = int(m.group(1))
        elif "scontrol requeue" in line and label is not None:
            return label
    raise AssertionError("slurm/common.sh has no case branch that requeues")


REQUEUE = requeue_status_of_the_slurm_scripts()
assert REQUEUE == EXIT_REQUEUE  # and the status hpcgraft.launch hands to submitit's requeue
# The uninterrupted references (tests/runs.py) and the overrides a test's own runs repeat exactly
GRAFTING = "graft2"  # at every epoch end but the last
STEPWISE = "stepwise3"  # 3 peers, at steps 10, 20, 30 and 40
BASELINE = "base2"


@contextlib.contextmanager
def injected(faults: str):
    """Set HPCGRAFT_INJECT for the runs started inside (tests/_util.env copies os.environ)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HPCGRAFT_INJECT", faults)
        yield


def start(np_: int, out: Path, *overrides: str) -> subprocess.Popen:
    """The training command in the background, its output in files beside the run directory."""
    cmd = [MPIRUN, "-np", str(np_), sys.executable, "-m", "hpcgraft.train", "--config",
           str(ROOT / "configs/digits.yaml"), "--out", str(out), *overrides]
    with open(f"{out}.stdout", "w") as o, open(f"{out}.stderr", "w") as e:
        return subprocess.Popen(cmd, stdout=o, stderr=e, text=True, env=env(), cwd=ROOT)


def wait_for_checkpoint(job: subprocess.Popen, out: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not list((out / "checkpoints").glob("step-*/MANIFEST.json")):
        assert job.poll() is None, Path(f"{out}.stderr").read_text()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def checkpoints(out: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("step-")) for p in (out / "checkpoints").glob("step-*/MANIFEST.json"))


def lines(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def final_trees(out: Path) -> list[dict]:
    """Every peer's tree in the newest checkpoint (weights, momentum, progress, RNG), minus timings."""
    trees = []
    for path in sorted((out / "checkpoints" / f"step-{max(checkpoints(out)):09d}").glob("peer-*.h5")):
        with h5py.File(path, "r") as f:
            tree = read_tree(f)
        tree["progress"].pop("seconds")
        trees.append(tree)
    return trees


def assert_identical(a, b, path: str = "") -> None:
    """Bit for bit: tensors by dtype, shape and value, everything else by ==."""
    assert type(a) is type(b), path
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}/{i}")
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            assert_identical(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    else:
        assert a == b, path


def assert_same_run(run: Path, reference: Path) -> None:
    """Same final checkpoint and the same metrics and graft reports, each epoch exactly once."""
    assert max(checkpoints(run)) == max(checkpoints(reference))
    assert_identical(final_trees(run), final_trees(reference))

    def untimed(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert untimed(jsonl(run / "metrics.jsonl")) == untimed(jsonl(reference / "metrics.jsonl"))
    assert untimed(jsonl(run / "graft.jsonl")) == untimed(jsonl(reference / "graft.jsonl"))


@pytest.fixture
def reference(e2e_run):
    """``reference(name)``: the uninterrupted run ``name``, checked to log each epoch and graft once."""

    def get(name: str) -> Path:
        run = e2e_run(name)
        k = RUNS[name].ranks
        assert [(row["epoch"], row["peer"]) for row in run.metrics()] == [
            (e, p) for e in (1, 2) for p in [*range(k), None]]
        grafts = [(g["step"], g["peer"]) for g in run.grafts()]
        assert len(set(grafts)) == len(grafts)
        return run.out

    return get


def again(name: str, out: Path, extra: tuple[str, ...] = (), **kw) -> subprocess.CompletedProcess:
    """The command of the reference run ``name`` (same ranks and overrides, then ``extra``), on another directory."""
    return train(RUNS[name].ranks, out, *RUNS[name].overrides, *extra, **kw)


# ------------------------------------------------------------------------------------------ stop and resume
def stopped_by_hook(e2e_run, name: str, stop_at: int, out: Path) -> None:
    """The run ``name`` (tests/runs.py) sent SIGUSR1 or SIGTERM to its last rank right after step
    ``stop_at - 1``: every rank stopped after step ``stop_at`` (the flag is agreed on one step later), wrote
    a checkpoint and exited 75, the status the SLURM scripts requeue on. Copied to ``out`` to resume."""
    run = e2e_run(name)
    assert RUNS[name].env["HPCGRAFT_INJECT"].startswith(f"{RUNS[name].ranks - 1}:{stop_at - 1}:")
    assert run.proc.returncode == REQUEUE, run.proc.stderr
    assert f"stopped by signal at epoch {(stop_at - 1) // STEPS + 1}, step {stop_at}; checkpoint written, " \
           f"exit {REQUEUE}" in run.proc.stderr
    assert status(run.out) == {"state": "stopped", "epoch": (stop_at - 1) // STEPS, "step": stop_at}
    assert checkpoints(run.out)[-1] == stop_at
    run.copy(out)


def resume_and_compare(out: Path, reference: Path, name: str, from_step: int) -> str:
    """Re-run the same command: it says where it resumes in one line and ends as the reference did."""
    r = again(name, out)
    assert r.returncode == 0, r.stderr
    [line] = lines(r.stderr, "hpcgraft: resuming")
    assert f"from step-{from_step:09d}" in line, line
    assert status(out)["state"] == "finished"
    assert_same_run(out, reference)
    return r.stderr


@pytest.mark.slow  # the resume matrix: make test resumes a grafting run stopped mid-epoch
def test_grafting_stopped_at_an_epoch_end_resumes_exactly(tmp_path, reference, e2e_run):
    """Stopped after the last step of epoch 1, before its evaluation (3 peers, grafting every 10 steps: the
    reports of the grafts before the stop are written with its checkpoint)."""
    out = tmp_path / "run"
    stopped_by_hook(e2e_run, "stepwise3_stopped", STEPS, out)
    assert sorted({g["step"] for g in jsonl(out / "graft.jsonl")}) == [10, 20]
    resume_and_compare(out, reference(STEPWISE), STEPWISE, STEPS)


def test_sigusr1_to_mpirun_stops_mid_epoch_and_grafting_resumes_exactly(tmp_path, reference):
    """What a scheduler does before a time limit: signal the launcher. MPICH's mpiexec forwards SIGUSR1
    (and SIGTERM) to every rank; the stop lands a few steps into epoch 2, after the first graft."""
    out = tmp_path / "run"
    job = start(RUNS[GRAFTING].ranks, out, *RUNS[GRAFTING].overrides)
    wait_for_checkpoint(job, out)
    job.send_signal(signal.SIGUSR1)
    signalled = time.monotonic()
    assert job.wait(timeout=300) == REQUEUE, Path(f"{out}.stderr").read_text()
    print(f"job exited {REQUEUE} {time.monotonic() - signalled:.2f} s after SIGUSR1 to mpirun")
    state = status(out)
    assert state["state"] == "stopped" and STEPS < state["step"] <= 2 * STEPS
    assert checkpoints(out) == [STEPS, state["step"]]
    resume_and_compare(out, reference(GRAFTING), GRAFTING, state["step"])


@pytest.mark.slow  # the resume matrix; damaged checkpoints: tests/unit/storage/test_checkpoint.py
def test_baseline_stopped_mid_epoch_resumes_exactly_also_from_a_damaged_checkpoint(tmp_path, reference, e2e_run,
                                                                                 capsys, stop_signals_kept):
    """SIGTERM this time (SLURM's preemption signal), in the middle of epoch 2 (2 peers; 3 peers resume in
    the first test). The stopped run resumes only with its rank count; resumed, it ends exactly as the
    uninterrupted run. A copy whose stop checkpoint (mid-epoch 2) is truncated reports it in one line,
    goes back to the end of epoch 1 and still ends exactly as the uninterrupted run."""
    out = tmp_path / "run"
    stopped_by_hook(e2e_run, "base2_stopped", STEPS + 11, out)
    damaged = e2e_run("base2_stopped").copy(tmp_path / "damaged")
    # One plain process for a checkpoint of 2 peers: the training command's main, in this process.
    rc = train_command.main(["--config", str(ROOT / "configs/digits.yaml"), "--out", str(out),
                             *RUNS[BASELINE].overrides])
    err = capsys.readouterr().err
    assert rc == 2, err
    [line] = lines(err, "hpcgraft: error:")
    assert "has 2 peers; start with mpirun -np 2 to resume it" in line and "Traceback" not in err
    resume_and_compare(out, reference(BASELINE), BASELINE, STEPS + 11)

    newest = damaged / "checkpoints" / f"step-{STEPS + 11:09d}" / "peer-001.h5"
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    err = resume_and_compare(damaged, reference(BASELINE), BASELINE, STEPS)
    [line] = lines(err, "hpcgraft: checkpoint")
    assert line.startswith(f"hpcgraft: checkpoint step-{STEPS + 11:09d} is damaged (peer-001.h5")
    assert line.endswith(f"falling back to step-{STEPS:09d}")


# ------------------------------------------------------------------------------------------ failures
def test_kill_9_of_one_rank_ends_the_job_and_resume_finishes_the_run(tmp_path, reference):
    out = tmp_path / "run"
    job = start(RUNS[GRAFTING].ranks, out, *RUNS[GRAFTING].overrides)
    wait_for_checkpoint(job, out)
    pids = dict(re.findall(r"(\d+)=(\d+)@", lines(Path(f"{out}.stderr").read_text(), "hpcgraft: rank pids:")[0]))
    os.kill(int(pids["1"]), signal.SIGKILL)
    killed = time.monotonic()
    job.wait(timeout=30)  # mpiexec takes the others down within a second; a job that hangs fails here
    print(f"job ended {time.monotonic() - killed:.2f} s after kill -9 of rank 1")
    assert job.returncode != 0
    # The rank's supervisor names it (MPICH's own report names the first rank in rank order with a bad
    # exit, often one it killed while cleaning up), and the launcher still sees the signal.
    [named] = lines(Path(f"{out}.stderr").read_text(), "hpcgraft: rank 1 (pid")
    assert named.startswith(f"hpcgraft: rank 1 (pid {pids['1']} on ") and " was killed by SIGKILL (signal 9" in named
    assert "hpcgraft: rank 0 (" not in Path(f"{out}.stderr").read_text()
    assert "Killed (signal 9)" in Path(f"{out}.stdout").read_text()
    resume_and_compare(out, reference(GRAFTING), GRAFTING, checkpoints(out)[-1])


def test_an_exception_in_one_rank_aborts_the_job_naming_it(tmp_path, reference):
    """Started with --restart over a finished run, which it replaces."""
    out = tmp_path / "run"
    shutil.copytree(reference(GRAFTING), out)
    with injected("1:3:raise"):
        r = again(GRAFTING, out, restart=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "RuntimeError: injected failure at step 3" in r.stderr
    assert "hpcgraft: rank 1: failed with RuntimeError: injected failure at step 3 (HPCGRAFT_INJECT)" in r.stderr
    # MPICH's own line, printed inside MPI_Abort, races the launcher's teardown (hpcgraft's line above is the
    # one guaranteed to arrive); when it arrives, it names the same rank.
    assert "MPI_Abort(MPI_COMM_WORLD, 1) - process 1" in r.stderr or "MPI_Abort" not in r.stderr
    assert not (out / "metrics.jsonl").exists() and not checkpoints(out)  # --restart cleared the old run


def test_watchdog_aborts_a_collective_stuck_on_a_stalled_rank(e2e_run):
    """Rank 1 stalls after step 3 (HPCGRAFT_INJECT=1:3:sleep); the run "watchdog" failed, as it must."""
    r = e2e_run("watchdog").proc
    assert r.returncode != 0
    assert "hpcgraft: rank 0: watchdog: 'training step: Iallreduce of the stop flag' took longer than " \
           "dist.watchdog_s=5 s; a peer is lost or stuck, aborting the job" in r.stderr


# ------------------------------------------------------------------------------------------ NaN weights
@pytest.mark.slow  # a 3-epoch run; the skip itself: tests/e2e/test_exchange.py
def test_nan_weights_are_never_grafted_and_the_best_checkpoints_are_kept(e2e_run):
    """Peer 1's weights turn NaN in epoch 2 (HPCGRAFT_INJECT=1:30:nan); the grafts at the end of epoch 2 are
    skipped for both peers and the run goes on. With checkpoint.keep=1, the newest checkpoint stays and so
    does each peer's best."""
    assert RUNS["nan_skipped"].env["HPCGRAFT_INJECT"] == f"1:{STEPS + 8}:nan"
    run = e2e_run("nan_skipped")
    out, r = run.out, run.proc
    grafts = {(g["epoch"], g["peer"]): g for g in jsonl(out / "graft.jsonl")}
    assert sorted(grafts) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all("skipped" not in grafts[1, p] for p in (0, 1))
    for p in (0, 1):
        assert grafts[2, p]["skipped"] == "peer 1 holds NaN/Inf weights" and grafts[2, p]["nonfinite_peers"] == [1]
        assert f"hpcgraft: peer {p} skipped grafting at step {2 * STEPS}: peer 1 holds NaN/Inf weights" in r.stderr
    peer0, peer1 = final_trees(out)
    assert all(torch.isfinite(t).all() for t in peer0["model"].values())  # never grafted from peer 1
    assert not torch.isfinite(peer1["model"]["conv1.weight"]).all()

    rows = [row for row in jsonl(out / "metrics.jsonl") if row["peer"] is not None]
    best = {max((row["test_acc"], row["step"]) for row in rows if row["peer"] == p)[1] for p in (0, 1)}
    assert STEPS in best  # peer 1 was best before its weights broke: kept beyond checkpoint.keep=1
    assert checkpoints(out) == sorted(best | {3 * STEPS})


def test_nan_weights_stop_the_run_with_one_line_when_configured(e2e_run):
    """Peer 1's weights turn NaN after step 3 (HPCGRAFT_INJECT=1:3:nan); the graft at step 5 stops the run."""
    r = e2e_run("nan_stop").proc
    assert r.returncode == 1, r.stderr
    [line] = lines(r.stderr, "hpcgraft: error:")
    assert line == "hpcgraft: error: grafting at step 5: peer(s) [1] hold NaN/Inf weights; " \
                   "set graft.on_nonfinite=skip to continue without them"
    assert "Traceback" not in r.stderr and "Abort" not in r.stderr


# ------------------------------------------------------------------------------------------ run directory
@pytest.mark.parametrize(
    ("override", "message"),
    [(None, "holds a finished run (2 epochs); pass --extend with a larger train.epochs to continue it, --restart "
             "to start over, or use another --out"),
     ("train.lr=0.2", "holds a run with train.lr=0.1 (config.yaml), not 0.2; resume it with the same config")],
    ids=["finished", "other-config"],
)
def test_a_finished_run_or_another_config_is_a_one_line_error(reference, capsys, stop_signals_kept, override,
                                                              message):
    """Decided before any training: the command's main in this process (one rank is enough)."""
    run = reference(BASELINE)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".hpcgraft.lock"}
    rc = train_command.main(["--config", str(ROOT / "configs/digits.yaml"), "--out", str(run),
                             *RUNS[BASELINE].overrides, *([override] if override else [])])
    err = capsys.readouterr().err
    assert rc == 2, err
    [line] = lines(err, "hpcgraft: error:")
    assert f"{run} {message}" in line and "Traceback" not in err
    # The run is untouched (only the lock records who looked).
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".hpcgraft.lock"} == before


def test_a_run_whose_config_yaml_is_gone_resumed_with_another_config_is_one_agreed_line(tmp_path, e2e_run):
    """Only rank 0 reads the checkpoint's run.h5: under 3 ranks every rank must learn its verdict in the
    same step, or the ranks' next collectives pair up wrongly (a traceback, exit 1) instead of one line."""
    out = e2e_run(STEPWISE).copy(tmp_path / "run")
    (out / "config.yaml").unlink()
    r = again(STEPWISE, out, extra=("train.lr=0.05",))
    assert r.returncode == 2, r.stderr
    assert lines(r.stderr, "hpcgraft: error:") == [
        f"hpcgraft: error: {out} holds a run with train.lr=0.1 (in step-{2 * STEPS:09d}/run.h5; its config.yaml is "
        "gone), not 0.05; resume it with the same config, pass --restart to start over, or use another --out"]
    assert "Traceback" not in r.stderr
    assert not (out / "config.yaml").exists()  # nothing written for a refused run
