"""YAML anchors and aliases are refused wherever hpcgraft reads YAML: a few hundred bytes of nested aliases
(a "billion laughs") expand to gigabytes once anything formats the value."""

from __future__ import annotations

import ast
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from hpcgraft.config import Config, YamlAliasError, load_config, parse_override, parse_yaml
from hpcgraft.errors import ConfigError
from hpcgraft.training.rundir import _check_same_config
from tests._util import ROOT, env

AS_LIMITS = [1 << 30, 2 << 30, 4 << 30]  # bytes of address space: the smallest the command starts in is used


def bomb(levels: int = 10) -> str:
    """One key whose list nests ``levels`` aliases nine times each: 9**levels integers, ~500 bytes of text."""
    items = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "train:\n  milestones: [[" + ", ".join(items) + "]]\n"  # one item: a message would format it all


def _train(tmp_path: Path, config: Path, *overrides: str, limit: int) -> subprocess.CompletedProcess:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, "-m", "hpcgraft.train", "--config", str(config), "--out",
                           str(tmp_path / "run"), *overrides], capture_output=True, text=True, env=env(), cwd=ROOT,
                          preexec_fn=set_limit, timeout=600)


@pytest.mark.process  # the command in a process of limited address space
def test_a_billion_laughs_config_is_one_line_exit_2_within_a_small_address_space(tmp_path):
    """The limit is the smallest in which the command starts and refuses a plain bad value (torch and MPI
    take more address space on some machines); the expanded bomb, ~10 GB as text, fits in none of them."""
    plain = tmp_path / "plain.yaml"
    plain.write_text("train:\n  milestones: [1, 2]\n")
    limit = next((n for n in AS_LIMITS if _train(tmp_path, plain, "train.epochs=-1", limit=n).returncode == 2), None)
    assert limit is not None, "the command does not start within 4 GiB of address space"
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb())
    assert path.stat().st_size < 600
    r = _train(tmp_path, path, limit=limit)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"hpcgraft: error: config file '{path}': YAML anchors and aliases (&name, *name, <<: *name) are not allowed "
        "(line 2); write each value out"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["a: &x 1\nb: *x\n", "a: &x {lr: 1}\nb:\n  <<: *x\n", "a: !!int &x 3\n"])
def test_any_anchor_or_alias_is_refused_before_it_is_composed(text):
    with pytest.raises(YamlAliasError, match="anchors and aliases .* are not allowed"):
        parse_yaml(text)


def test_an_override_with_an_alias_is_refused():
    with pytest.raises(ConfigError, match=r"override 'train.milestones=\[&a 1, \*a\]': YAML anchors"):
        parse_override("train.milestones=[&a 1, *a]")


def test_a_run_config_with_aliases_is_refused_on_resume(tmp_path):
    """The run's config.yaml (or its copy in run.h5) is read back on every resume: the same loader."""
    with pytest.raises(ConfigError, match="is damaged .*YAML anchors and aliases"):
        _check_same_config("config.yaml", bomb(), Config(), tmp_path)


def test_written_configs_hold_no_anchors_and_read_back(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(Config().to_yaml())
    assert "&" not in path.read_text() and load_config(path).flat() == Config().flat()


def test_no_module_parses_yaml_but_through_parse_yaml():
    """Every YAML hpcgraft reads (configs, overrides, sweep configs, a run's config.yaml, run.h5's copy)
    goes through hpcgraft.config.parse_yaml; a yaml.safe_load anywhere else would bring the bomb back."""
    loaders = {"load", "safe_load", "full_load", "unsafe_load", "load_all", "safe_load_all", "compose",
               "compose_all"}
    found = []
    for path in sorted(Path(ROOT, "hpcgraft").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in loaders and isinstance(node.value, ast.Name)
                    and node.value.id == "yaml"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} yaml.{node.attr}")
    assert [f for f in found if not f.startswith("hpcgraft/config.py:")] == []
    assert [f.split()[1] for f in found] == ["yaml.load"]  # parse_yaml's own
