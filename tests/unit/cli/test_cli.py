"""The one command line: `hpcgraft <command>`, each command's --help, the older module paths that forward to
the commands, and the single override spelling (key=value after the options) with its older aliases."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hpcgraft.supervise
from hpcgraft import cli
from hpcgraft.cli import prune, sweep
from hpcgraft.errors import ConfigError
from hpcgraft.launch.arms import ARMS, parse_arms
from tests._util import ROOT, env

RUN = ROOT / "tests" / "data" / "run-before-relayout"
# The commands that read a config and take key=value overrides.
CONFIGURED = {"train", "evaluate", "prune", "sweep", "submit"}
# Older module path -> the command module it forwards to.
OLD_PATHS = {name: name for name in ("train", "evaluate", "prune", "analyze", "graft", "checkpoint", "report", "sweep")}


def test_help_lists_every_command_with_one_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    modules = {p.stem for p in (ROOT / "hpcgraft" / "cli").glob("*.py")} - {"__init__"}
    assert set(listed) == set(cli.COMMANDS) == modules  # every command module is a command, and listed
    assert all(len(line.split()) > 3 for line in listed.values())
    assert "--print-config" in out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_has_help_with_its_options(name, capsys, monkeypatch):
    monkeypatch.setattr(hpcgraft.supervise, "supervise_module", lambda module, args: None)
    with pytest.raises(SystemExit) as stop:
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("usage:") and "-h, --help" in out, out
    if name in CONFIGURED:
        assert "key=value" in out and "--print-config" in out, out


@pytest.mark.parametrize("argv, message", [
    ([], "usage: hpcgraft <command>"),
    (["tarin"], "hpcgraft: error: no command 'tarin'; one of: train, evaluate,"),
])
def test_no_or_an_unknown_command_is_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err


def test_train_becomes_the_ranks_supervisor_before_it_runs(monkeypatch):
    """Under a launcher `hpcgraft train` must supervise its rank as `python -m hpcgraft.train` does: the
    supervisor is asked first, with the command's own arguments."""
    asked = []

    def supervise_module(module: str, args: list[str]) -> None:
        asked.append((module, list(args)))
        raise SystemExit(0)  # what a supervisor does once its rank ended

    monkeypatch.setattr(hpcgraft.supervise, "supervise_module", supervise_module)
    with pytest.raises(SystemExit):
        cli.main(["train", "--out", "runs/x", "train.epochs=1"])
    assert asked == [("hpcgraft.cli.train", ["--out", "runs/x", "train.epochs=1"])]


def test_older_module_paths_are_the_commands():
    """`from hpcgraft import report` is the report command itself: patching it patches the command."""
    import importlib

    for old, new in OLD_PATHS.items():
        assert importlib.import_module(f"hpcgraft.{old}") is importlib.import_module(f"hpcgraft.cli.{new}"), old


def test_launch_is_the_jobs_layer_that_submit_and_sweep_call():
    """`hpcgraft.launch.submit(...)` and `.wait(job)` from Python are what the submit command calls."""
    import hpcgraft.launch
    from hpcgraft.cli import submit

    assert hpcgraft.launch.submit is submit.submit and hpcgraft.launch.wait is submit.wait


@pytest.mark.process  # runs the command as a user does: python -m
def test_python_dash_m_of_every_older_path_runs_its_command():
    """`python -m hpcgraft.<old>`, `python -m hpcgraft.launch` (submit), `python -m hpcgraft.slurm` and
    `python -m hpcgraft <command>` run the
    commands (one interpreter runs them all as __main__, as -m does)."""
    code = f"""
import runpy, sys
for module, args in {[(f"hpcgraft.{old}", []) for old in [*OLD_PATHS, "launch", "slurm"]] +
                     [("hpcgraft", ["report"])]!r}:
    sys.argv = [module, *args, "--help"]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        assert stop.code == 0, (module, stop.code)
    else:
        raise AssertionError(module + " did not exit")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("usage: ") == len(OLD_PATHS) + 3


@pytest.mark.parametrize("spelling", [["train.lrr=1"], ["--set", "train.lrr=1"]])
def test_prune_overrides_are_key_value_words_or_the_older_set(spelling, tmp_path, capsys):
    """Both spellings reach the config (an unknown key is refused by name, before any work)."""
    argv = [str(RUN), "--criterion", "l1", "--keep", "0.5", "--out", str(tmp_path / "p"), *spelling]
    assert prune.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpcgraft.prune: error: ") and "unknown config key 'train.lrr'" in err, err
    assert not (tmp_path / "p").exists()


def test_sweep_arms_are_a_name_and_key_value_words_or_the_older_single_word():
    a = sweep.parse_args(["digits", "--arm", "filter", "graft.level=filter", "cultivate.lambda=1", "--seeds", "2",
                          "train.epochs=3", "--arm", "lr=train.lr=0.2 train.dlr=true"])
    assert a.overrides == ["train.epochs=3"] and a.seeds == 2
    arms = parse_arms("grafting", a.arm)
    assert arms == {"grafting": ARMS["grafting"], "filter": ("graft.level=filter", "cultivate.lambda=1"),
                    "lr": ("train.lr=0.2", "train.dlr=true")}


@pytest.mark.parametrize("words", [["nope"], ["=train.lr=1"], ["bad name", "train.lr=1"]])
def test_a_sweep_arm_without_a_name_or_overrides_is_refused(words):
    with pytest.raises(ConfigError, match="is not NAME key=value ...; e.g. --arm filter graft.level=filter"):
        parse_arms("", [words])


def test_every_console_script_names_a_function():
    """`hpcgraft` and its older aliases (hpcgraft-train, -graft, -sweep, -slurm) point at functions that exist."""
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["hpcgraft"] == "hpcgraft.cli:main"
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
