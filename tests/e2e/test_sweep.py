"""hpcgraft.sweep on real runs: a tiny local sweep (digits, 1 epoch, 2 arms x 2 seeds, 2 ranks each under
mpirun), its resume and skip on re-run, the report's table checked by hand against metrics.jsonl; bad
input; and the submitit job of every (arm, seed)."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcgraft.cli import submit as launch
from hpcgraft.cli import sweep
from hpcgraft.launch import arms
from tests._util import ROOT, env, jsonl

TINY = ["train.epochs=1", "log.progress=off", "dist.threads=1", "checkpoint.keep=1"]


def command(module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env(),
                          cwd=ROOT, timeout=timeout)


def sweep_cmd(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return command("hpcgraft.sweep", "digits", "--arms", "baseline,grafting", "--seeds", "2", "--np", "2",
                   "--out", str(out), *TINY, *extra)


def by_hand(run: Path) -> tuple[float, float, float, float, float]:
    """(best, final top-1 as the mean over peers, best and final ensemble, final invalid@0.1 over peers)."""
    rows = jsonl(run / "metrics.jsonl")
    peers = sorted({r["peer"] for r in rows if r["peer"] is not None})
    acc = {p: [r["test_acc"] for r in rows if r["peer"] == p] for p in peers}
    ens = [r["ensemble_acc"] for r in rows if r["peer"] is None]
    inv = [[r["invalid_0.1"] for r in rows if r["peer"] == p][-1] for p in peers]
    return (statistics.fmean(max(a) for a in acc.values()), statistics.fmean(a[-1] for a in acc.values()),
            max(ens), ens[-1], statistics.fmean(inv))


@pytest.mark.slow  # eight runs: make test sweeps through submitit below (the table: unit/reporting/test_sweep_table.py)
@pytest.mark.mpi
def test_sweep_runs_every_arm_and_seed_then_resumes_and_skips(tmp_path):
    out = tmp_path / "sw"
    first = sweep_cmd(out)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = {(arm, seed): out / arm / f"seed{seed}" for arm in ("baseline", "grafting") for seed in (0, 1)}
    for (arm, seed), run in runs.items():
        assert json.loads((run / "status.json").read_text())["state"] == "finished"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert (cfg["seed"], cfg["train"]["epochs"]) == (seed, 1)
        assert (cfg["graft"]["mode"], cfg["cultivate"]["lambda"]) == ({"baseline": "none"}.get(arm, "peers"), 0)
    # Seeds differ in their weights and data; arms of one seed start alike (1 epoch ends without a graft).
    assert jsonl(runs["baseline", 0] / "metrics.jsonl") != jsonl(runs["baseline", 1] / "metrics.jsonl")

    # The table, checked by hand from metrics.jsonl: mean +- sample std over the two seeds.
    table = command("hpcgraft.report", str(out))
    assert table.returncode == 0, table.stderr
    for arm in ("baseline", "grafting"):
        cols = list(zip(*(by_hand(runs[arm, s]) for s in (0, 1)), strict=True))
        cells = [f"{statistics.fmean(c):.2f} ± {statistics.stdev(c):.2f}" for c in cols[:4]]
        cells.append(f"{statistics.fmean(cols[4]):.1f} ± {statistics.stdev(cols[4]):.1f}")
        assert f"| {arm} | 2/2 | " + " | ".join(cells) + " | " in table.stdout, table.stdout
    assert (out / "report" / "sweep.md").read_text().count("| 2/2 |") == 2
    head = "| arm | seeds done | best top-1 | final top-1 | best ensemble | final ensemble | invalid @0.1 (of 176) |"
    assert "\n" + head in table.stdout

    # An interrupted run (its completion marker gone) resumes, a deleted one starts over, the others are
    # skipped untouched; the table then still counts every seed.
    (runs["grafting", 1] / "status.json").unlink()
    shutil.rmtree(runs["baseline", 0])
    before = {k: (r / "metrics.jsonl").stat().st_mtime_ns for k, r in runs.items() if k != ("baseline", 0)}
    again = sweep_cmd(out)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "hpcgraft.sweep: baseline seed 1: finished, skipped" in log
    assert "hpcgraft.sweep: grafting seed 0: finished, skipped" in log
    assert "[1/2] baseline seed 0: starting in" in log and "[2/2] grafting seed 1: resuming in" in log
    assert f"hpcgraft: resuming {runs['grafting', 1]} from step-" in log
    for k in (("baseline", 1), ("grafting", 0)):
        assert (runs[k] / "metrics.jsonl").stat().st_mtime_ns == before[k]
    assert json.loads((runs["baseline", 0] / "status.json").read_text())["state"] == "finished"
    assert json.loads((runs["grafting", 1] / "status.json").read_text())["state"] == "finished"
    assert log.count("| 2/2 |") == 2

    # A third run of the same command trains nothing; the same sweep dir with another setting is refused.
    third = sweep_cmd(out)
    assert third.returncode == 0 and "starting" not in third.stdout and "resuming" not in third.stdout
    changed = command("hpcgraft.sweep", "digits", "--arms", "grafting", "--seeds", "1", "--out", str(out),
                      *TINY[1:], "train.epochs=2")
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1, changed.stderr
    assert f"{runs['grafting', 0]} holds a run with train.epochs=1, not 2" in changed.stderr


@pytest.mark.parametrize("args, message", [
    (["--arms", "baseline,nope"], "unknown arm 'nope'; built-in arms: baseline, grafting, grafting+cultivation, "
                                  "cultivation (or define it: --arm nope key=value ...)"),
    (["--seeds", "0"], "--seeds 0: give the number of seeds per arm, at least 1"),
    (["--arms", "grafting,grafting"], "--arms names 'grafting' twice"),
    (["seed=3"], "a seed=... override: the sweep sets the seed of each run"),
    (["--np", "1"], "arm grafting grafts or cultivates between peers: give at least 2 peers"),
    (["--arm", "baseline=train.lr=1"], "--arm baseline: the arm 'baseline' is already defined"),
    (["--arm", "lr=train.lrr=1"], "arm lr: unknown config key 'train.lrr'; did you mean 'train.lr'?"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert sweep.main(["digits", "--out", str(tmp_path / "sw"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpcgraft.sweep: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "sw").exists()  # refused before anything was written


def test_bad_input_from_the_command_line(tmp_path):
    r = command("hpcgraft.sweep", "digits", "--seeds", "-1", "--out", str(tmp_path / "sw"), timeout=120)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == ("hpcgraft.sweep: error: --seeds -1: give the number of seeds per arm, at least 1 "
                        "(seeds 0..N-1)\n")


def test_unknown_config_name_lists_the_packaged_ones(tmp_path, capsys):
    assert sweep.main(["cifar10_resnet23", "--out", str(tmp_path / "sw")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config 'cifar10_resnet23' is neither a file nor a packaged config" in err
    assert "cifar10_resnet32, cifar10_resnet56" in err


def test_custom_arms_and_their_runs(tmp_path):
    chosen = arms.parse_arms("grafting,baseline", ["filter=graft.level=filter cultivate.lambda=0.5"])
    assert list(chosen) == ["grafting", "baseline", "filter"]
    runs = arms.plan(str(ROOT / "configs/digits.yaml"), chosen, 2, tmp_path, ["train.epochs=1"])
    assert [(r.arm, r.seed, r.out.relative_to(tmp_path).as_posix()) for r in runs] == [
        ("grafting", 0, "grafting/seed0"), ("grafting", 1, "grafting/seed1"), ("baseline", 0, "baseline/seed0"),
        ("baseline", 1, "baseline/seed1"), ("filter", 0, "filter/seed0"), ("filter", 1, "filter/seed1")]
    f = runs[5].cfg
    assert (f.seed, f.train.epochs, f.graft.level, f.cultivate.lambda_, f.graft.mode) == (1, 1, "filter", 0.5, "peers")
    b = runs[2].cfg
    assert (b.graft.mode, b.cultivate.lambda_, b.train.dlr) == ("none", 0.0, False)


def test_every_run_is_one_submitit_job_with_the_launch_options(tmp_path):
    """The job specs: one hpcgraft.launch.submit call per (arm, seed), with the run's overrides, its own run
    directory (hence its own logs and requeue state) and the shape given once for the sweep."""
    a = sweep.parse_args(["cifar10_resnet32", "--slurm", "--gpus-per-node", "4", "--nodes", "2", "--partition",
                          "gpu", "--time", "720", "--seeds", "2", "--out", str(tmp_path), "train.epochs=3"])
    config = str(ROOT / "hpcgraft/configs/cifar10_resnet32.yaml")
    runs = arms.plan(config, arms.parse_arms(a.arms, a.arm), a.seeds, tmp_path, a.overrides)
    calls = arms.submissions(runs, config, False, launch.job_options(a))
    assert len(calls) == 6
    run, call = calls[3]
    assert (run.arm, run.seed) == ("grafting", 1)
    assert call == {"config": config, "out": tmp_path / "grafting" / "seed1", "restart": False,
                    "overrides": ["train.epochs=3", "graft.mode=peers", "cultivate.lambda=0", "seed=1"],
                    "nodes": 2, "gpus_per_node": 4, "tasks_per_node": None, "cpus_per_task": 1, "partition": "gpu",
                    "account": None, "time_min": 720, "executor": "slurm", "logs": None, "signal_delay_s": 120,
                    "max_requeues": 20, "srun_mpi": "pmi2"}
    assert calls[0][1]["overrides"][1:] == ["graft.mode=none", "cultivate.lambda=0", "train.dlr=false", "seed=0"]


@pytest.mark.mpi
def test_a_sweep_through_submitit_runs_each_run_as_a_job(tmp_path):
    """The submission path for real, with submitit's local executor (the SLURM executor is the same call of
    hpcgraft.launch.submit, tested with the cluster in tests/cluster): one job per run, waited for, then
    the table; the job ids are recorded, and a re-run skips the finished runs without submitting."""
    out = tmp_path / "sw"
    args = ["digits", "--arms", "baseline", "--seeds", "1", "--submitit", "--executor", "local", "--np", "2",
            "--wait", "--out", str(out), *TINY]
    r = command("hpcgraft.sweep", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hpcgraft.sweep: baseline seed 0: submitted job " in r.stdout and "| baseline | 1/1 | " in r.stdout
    assert json.loads((out / "baseline/seed0/status.json").read_text())["state"] == "finished"
    assert (out / "baseline/seed0/submitit").is_dir()  # the job's logs live in its run directory
    assert set(json.loads((out / "sweep.json").read_text())["jobs"]) == {"baseline/seed0"}
    again = command("hpcgraft.sweep", *args)
    assert again.returncode == 0 and "submitted" not in again.stdout, again.stdout
    assert "hpcgraft.sweep: baseline seed 0: finished, skipped" in again.stdout
