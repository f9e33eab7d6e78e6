"""Every config key is documented and visible: the key table of docs/configuration.md names each key of the schema, and
``hpcgraft.train --print-config`` prints the resolved config as YAML that ``--config`` reads back."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from hpcgraft.config import load_config, valid_keys
from tests._util import ROOT, env

HEADER = "| key | default | meaning |"


def documented_keys() -> list[str]:
    """The keys named in the first column of the key table in docs/configuration.md (the one under 'Config
    keys', which ``--help`` points to)."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text[text.index("## Config keys"):]
    lines = section[section.index(HEADER):].splitlines()[2:]
    keys = []
    for line in lines:
        if not line.startswith("|"):
            break
        keys += re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)?)`", line.split("|")[1])
    return keys


def test_key_table_lists_every_key_of_the_schema():
    """A key added to hpcgraft/config.py without its row (or a row for a key that is gone) fails here."""
    documented, schema = set(documented_keys()), set(valid_keys())
    assert not schema - documented, f"config keys missing from the key table: {sorted(schema - documented)}"
    assert not documented - schema, f"key table rows for keys that do not exist: {sorted(documented - schema)}"


def _train(*args: str) -> subprocess.CompletedProcess:
    # In a plain process, as a user types it; the check after main() proves MPI was never started.
    code = ("import sys; from hpcgraft.cli.train import main; rc = main(sys.argv[1:]); "
            "assert 'mpi4py.MPI' not in sys.modules, 'MPI started'; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env(), cwd=ROOT,
                          timeout=120)


@pytest.mark.process  # runs the command as a user does: python -m
def test_print_config_round_trips_and_starts_nothing(tmp_path):
    overrides = ["train.epochs=3", "graft.level=filter", "cultivate.lambda=0.5", "train.weight_decay=5e-4",
                 "log.thresholds=[0.2]", "model.num_classes=10"]
    r = _train("--print-config", "--config", "configs/digits.yaml", *overrides, "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "run").exists()  # nothing trained, no run directory
    expected = load_config(ROOT / "configs/digits.yaml", overrides)
    printed = tmp_path / "printed.yaml"
    printed.write_text(r.stdout)
    assert set(yaml.safe_load(r.stdout)) == set(expected.to_dict())
    assert load_config(printed) == expected  # --config reads it back to the same config
    assert load_config(printed).flat()["cultivate.lambda"] == 0.5 and expected.graft.level == "filter"


@pytest.mark.process  # runs the command as a user does: python -m
def test_print_config_refuses_a_bad_key_with_one_line():
    r = _train("--print-config", "trian.epochs=3")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "hpcgraft: error: unknown config key 'trian.epochs'; did you mean 'train.epochs'?"


@pytest.mark.process  # runs the command as a user does: python -m
def test_help_names_where_the_keys_are_documented():
    r = _train("--help")
    assert r.returncode == 0
    assert "--print-config" in r.stdout and "docs/configuration.md" in " ".join(r.stdout.split())
