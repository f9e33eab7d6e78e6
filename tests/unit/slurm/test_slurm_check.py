"""The SLURM shape check's verdicts and fix lines (hpcgraft.slurm.check, no SLURM needed: the partition is
given), the rank-count advice under srun, and the scripts written out of the package."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hpcgraft.cli.slurm import main as write_main
from hpcgraft.config import load_config
from hpcgraft.errors import ConfigError, LaunchError, LayoutError
from hpcgraft.slurm import SCRIPTS
from hpcgraft.slurm.check import (
    LAUNCH_OPTIONS,
    SCRIPT_VARIABLES,
    Partition,
    Shape,
    check_node_range,
    job_layout,
    parse_nodes,
    refusal,
)
from hpcgraft.slurm.check import main as check_main
from hpcgraft.training.peer import check_peer_count
from tests._util import ROOT, env

CPU_NODES = Partition("debug", nodes=1, cpus=2, gpus=0, default=True)
GPU_NODES = Partition("gpu", nodes=8, cpus=64, gpus=4, default=False)
CMD = ["bash", "slurm/graft_cifar.sh", "train.epochs=3"]


def test_a_shape_that_fits_passes():
    assert refusal(Shape(1, 0, 2, 1), CPU_NODES) is None
    assert refusal(Shape(8, 4, 2, 16), GPU_NODES) is None


def test_gpus_on_gpu_less_nodes_turn_into_cpu_ranks_that_fit():
    """The scripts' defaults (4 GPUs, 4 CPUs per rank) on the local test cluster: both problems in one line,
    and a command line that fixes both, keeping what the user set."""
    why = refusal(Shape(1, 4, 2, 4), CPU_NODES, SCRIPT_VARIABLES, CMD, given=["tasks_per_node"])
    assert why == ("HPCGRAFT_GPUS_PER_NODE=4: the nodes of partition 'debug' have at most 0 GPUs; "
                   "HPCGRAFT_CPUS_PER_TASK=4 for 2 ranks per node: the nodes of partition 'debug' have at most "
                   "2 CPUs; this can never start; run: HPCGRAFT_GPUS_PER_NODE=0 HPCGRAFT_TASKS_PER_NODE=2 "
                   "HPCGRAFT_CPUS_PER_TASK=1 bash slurm/graft_cifar.sh train.epochs=3")


def test_too_many_nodes_and_cpus_name_the_largest_that_fit():
    why = refusal(Shape(9, 0, 2, 1, "debug"), CPU_NODES, SCRIPT_VARIABLES, CMD, given=["partition", "gpus_per_node"])
    assert why == ("HPCGRAFT_NODES=9: partition 'debug' has 1 node; this can never start; run: HPCGRAFT_NODES=1 "
                   "HPCGRAFT_GPUS_PER_NODE=0 HPCGRAFT_PARTITION=debug bash slurm/graft_cifar.sh train.epochs=3")
    why = refusal(Shape(2, 4, 4, 32), GPU_NODES)
    assert why == ("--cpus-per-task 32 for 4 ranks per node: the nodes of partition 'gpu' have at most 64 CPUs; "
                   "this can never start; ask for --cpus-per-task 16")


def test_more_cpu_ranks_than_cpus_lower_the_ranks():
    why = refusal(Shape(1, 0, 4, 1), CPU_NODES, LAUNCH_OPTIONS)
    assert why is not None and why.endswith("ask for --tasks-per-node 2")


def test_launch_options_spell_the_fix_as_options():
    why = refusal(Shape(2, 8, 8, 1), GPU_NODES, LAUNCH_OPTIONS)
    assert why == ("--gpus-per-node 8: the nodes of partition 'gpu' have at most 4 GPUs; this can never start; "
                   "ask for --gpus-per-node 4")
    why = refusal(Shape(1, 2, 2, 1), CPU_NODES, LAUNCH_OPTIONS)
    assert why is not None and why.endswith("ask for --gpus-per-node 0 --tasks-per-node 2 (CPU ranks)")


def test_the_rank_count_advice_names_sbatch_under_srun(monkeypatch):
    cfg = load_config(ROOT / "configs/digits.yaml")
    with pytest.raises(ConfigError, match=r"start it with mpirun -np K \(K >= 2\)"):
        check_peer_count(cfg, 1)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    with pytest.raises(ConfigError) as info:
        check_peer_count(cfg, 1)
    msg = str(info.value)
    assert "K (K >= 2) SLURM tasks: sbatch --ntasks-per-node (with --nodes)" in msg and "mpirun" not in msg, msg
    assert "HPCGRAFT_TASKS_PER_NODE" in msg and msg.endswith("or set graft.mode=none")


def test_scripts_are_written_out_pointing_at_this_python(tmp_path, capsys):
    out = tmp_path / "scripts"
    assert write_main([str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(SCRIPTS)
    for name in ("graft_cifar.sh", "graft_imagenet.sh"):
        text = (out / name).read_text()
        assert f"\nPYTHON=${{HPCGRAFT_PYTHON:-{sys.executable}}}  # the python that wrote" in text
        assert "PYTHON=${HPCGRAFT_PYTHON:-.venv/bin/python}" not in text
        assert os.access(out / name, os.X_OK)
    assert (out / "common.sh").read_text() == (ROOT / "slurm/common.sh").read_text()
    capsys.readouterr()
    assert write_main([str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"hpcgraft.slurm: error: {out / SCRIPTS[0]} already exists; pass --force to overwrite the "
                   f"scripts in {out}")
    assert write_main([str(out), "--force"]) == 0


@pytest.mark.process  # runs the written-out sbatch script
def test_written_out_script_finds_its_helpers_and_checks_before_sbatch(tmp_path):
    """Outside the checkout, from another directory: the script sources its common.sh and, with no SLURM
    here (PATH without sbatch), says so in one line instead of failing on a missing file."""
    out = tmp_path / "scripts"
    subprocess.run([sys.executable, "-m", "hpcgraft.slurm", str(out)], check=True, env=env(), capture_output=True)
    bin_dir = tmp_path / "bin"  # this machine's commands, without sbatch
    bin_dir.mkdir()
    for name in os.listdir("/usr/bin"):
        if name != "sbatch":
            (bin_dir / name).symlink_to(f"/usr/bin/{name}")
    e = env() | {"PATH": f"{os.path.dirname(sys.executable)}:{bin_dir}"}
    r = subprocess.run(["bash", str(out / "graft_cifar.sh")], capture_output=True, text=True, cwd=tmp_path, env=e)
    assert r.returncode == 2 and r.stderr.startswith("graft_cifar.sh: sbatch not found"), r.stderr


def test_a_node_range_must_fit_the_peers_on_every_node_count():
    """HPCGRAFT_NODES=MIN-MAX: the job may start, or go on after a lost node, on any count in the range."""
    k4 = load_config(None, ["graft.peers=4"])
    check_node_range(k4, (1, 2), 2, SCRIPT_VARIABLES)
    check_node_range(load_config(None, []), (1, 3), 2, SCRIPT_VARIABLES)  # one peer per rank: always fits
    with pytest.raises(LaunchError) as e:
        check_node_range(k4, (1, 3), 2, SCRIPT_VARIABLES)
    assert str(e.value) == ("HPCGRAFT_NODES=1-3: graft.peers=4 does not fit 3 nodes x 2 ranks per node; node counts "
                            "that fit: 1, 2")
    assert parse_nodes("2") == (2, 2) and parse_nodes("2-4") == (2, 4)
    for bad in ("4-2", "0", "two", "1-"):
        with pytest.raises(LaunchError, match="is not a node count: N or MIN-MAX"):
            parse_nodes(bad)


def test_a_job_step_hosts_the_fixed_peers_on_the_ranks_slurm_gave(capsys):
    assert job_layout(4, 1, 4, 4) == (4, "4 peers, 1 per rank")
    assert job_layout(4, 1, 2, 4) == (2, "4 peers, 2 per rank")  # 2 nodes x 2 ranks lost a node
    assert job_layout(None, 1, 2, 4) == (4, "4 peers, 1 per rank")  # one per rank: the first ranks, packed
    with pytest.raises(LayoutError) as e:
        job_layout(6, 1, 4, 6)
    assert str(e.value).startswith("graft.peers=6 does not fit the 4 ranks SLURM gave; rank counts that fit: 1, 2, "
                                   "3, 6; resubmit")
    args = ["--layout", "--ranks", "2", "--first-ranks", "4", "--prog", "graft_cifar.sh", "--"]
    assert check_main([*args, "graft.peers=4"]) == 0 and capsys.readouterr().out == "2|4 peers, 2 per rank\n"
    assert check_main([*args, "graft.peers=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("graft_cifar.sh: error: graft.peers=3 does not fit the 2 ranks") and err.count("\n") == 1


def test_submit_refuses_a_node_range_the_peers_do_not_fit_before_anything_runs(tmp_path):
    from hpcgraft.cli import submit as launch

    with pytest.raises(LaunchError, match=r"^--nodes 1-3: graft\.peers=4 does not fit 3 nodes x 2 ranks per node; "
                                          r"node counts that fit: 1, 2$"):
        launch.submit(None, tmp_path / "run", ["graft.peers=4"], nodes="1-3", tasks_per_node=2, executor="local")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("name", "value", "message"), [
    ("HPCGRAFT_START_RETRIES", "two", "HPCGRAFT_START_RETRIES=two is not a count; set it to how often a job whose "
                                      "ranks could not start MPI is started again (default 2, 0: never)"),
    ("HPCGRAFT_START_TIMEOUT", "-5", "HPCGRAFT_START_TIMEOUT=-5 is not a number of seconds; set it to the time a "
                                     "rank may take to start MPI (default 600, 0: no limit)"),
])
def test_submit_refuses_a_bad_start_setting_before_anything_runs(tmp_path, monkeypatch, name, value, message):
    """The job's ranks read these from the environment submitit copies: a bad one is found at submit, not
    after a queue wait (or, for the retries, never: it used to fall back to the default without a word)."""
    from hpcgraft.cli import submit as launch

    monkeypatch.setenv(name, value)
    with pytest.raises(LaunchError) as info:
        launch.submit(str(ROOT / "configs/digits.yaml"), tmp_path / "run", tasks_per_node=2, executor="local")
    assert str(info.value) == message
    assert not (tmp_path / "run").exists()
