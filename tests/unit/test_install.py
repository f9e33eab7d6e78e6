"""What `pip install .` gives a user outside the checkout: the configs by name, the torch range, the license,
and a build without setuptools' deprecation warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hpcgraft.config import CONFIG_DIR, config_names, load_config, resolve_config
from hpcgraft.errors import ConfigError
from hpcgraft.slurm import SCRIPTS
from tests._util import ROOT, env
from tests.unit.test_layout import modules


def test_a_config_by_name_is_the_packaged_file():
    assert resolve_config("cifar10_resnet32") == CONFIG_DIR / "cifar10_resnet32.yaml"
    assert resolve_config("digits.yaml") == CONFIG_DIR / "digits.yaml"
    assert load_config("cifar100_resnet56").to_dict() == load_config(ROOT / "configs/cifar100_resnet56.yaml").to_dict()
    assert "imagenet_resnet50" in config_names() and len(config_names()) == len(list(CONFIG_DIR.glob("*.yaml")))


def test_an_unknown_name_lists_the_packaged_configs():
    with pytest.raises(ConfigError) as err:
        load_config("cifar10_resnet23")
    assert str(err.value) == ("config 'cifar10_resnet23' is neither a file nor a packaged config; give a YAML file or "
                              f"one of: {', '.join(config_names())}")


@pytest.mark.process  # asks git
def test_the_checkouts_configs_folder_is_a_link_git_keeps():
    """configs/ (the path the README, the Makefile and the SLURM scripts use) is a symlink into the package,
    committed as one (git mode 120000), so the files exist once."""
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == CONFIG_DIR
    staged = subprocess.run(["git", "ls-files", "-s", "configs"], capture_output=True, text=True, cwd=ROOT)
    assert staged.stdout.startswith("120000 "), staged.stdout


def _source_copy(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked and new, not ignored), symlinks kept, nothing built."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, text=True,
                           cwd=ROOT, check=True).stdout.split("\0")
    for name in filter(None, names):
        src, dst = ROOT / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            dst.write_bytes(src.read_bytes())
    return dest


@pytest.mark.process  # builds and installs the wheel
def test_the_wheel_carries_the_configs_and_they_load_by_name_outside_the_checkout(tmp_path):
    src = _source_copy(tmp_path / "src")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    log = built.stdout + built.stderr
    assert "deprecat" not in log.lower(), log  # no `project.license` (or other) deprecation warning
    wheel = next((tmp_path / "dist").glob("hpcgraft-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert sorted(n for n in names if n.startswith("hpcgraft/configs/")) == \
        sorted(f"hpcgraft/configs/{n}.yaml" for n in config_names())
    assert "License-Expression: MIT" in meta
    assert {"hpcgraft/data/digits.npz", "hpcgraft/data/digits-LICENSE.txt"} <= set(names)
    default = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in default if any(n in line for n in ("scikit-learn", "scipy", "matplotlib"))], default
    assert any(line.startswith("Requires-Dist: matplotlib") and 'extra == "report"' in line
               for line in meta.splitlines())
    torch_req = next(line for line in meta.splitlines() if line.startswith("Requires-Dist: torch"))
    assert "==" not in torch_req and "<2.14" in torch_req and ">=2.11" in torch_req, torch_req
    # Installed (unpacked onto the path), used from a directory that is no checkout: a name, and the
    # checkout's path form, both find the packaged file.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import hpcgraft.config as c; from hpcgraft.config import load_config; "
            f"assert c.__file__.startswith({str(site)!r}), c.__file__; "
            "print(load_config('cifar10_resnet32').model.name, load_config('configs/digits.yaml').train.epochs); "
            "from hpcgraft.data import build_datasets; print(sum(len(s) for s in build_datasets('digits')))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert (r.returncode, r.stdout) == (0, "resnet32 30\n1797\n"), r.stderr
    # The SLURM scripts travel as package data and are written out by the installed package.
    assert {f"hpcgraft/slurm/{n}" for n in SCRIPTS} <= set(names)
    r = subprocess.run([sys.executable, "-m", "hpcgraft.slurm", "scripts"], capture_output=True, text=True, cwd=work,
                       env=env, timeout=120)
    assert r.returncode == 0 and "wrote graft_cifar.sh" in r.stdout, r.stderr
    assert (work / "scripts/common.sh").read_text() == (ROOT / "slurm/common.sh").read_text()


BLOCK_OPTIONAL = "import sys\nfor _name in ('sklearn', 'scipy', 'matplotlib'):\n    sys.modules[_name] = None\n"


@pytest.mark.process  # a fresh interpreter
def test_a_default_install_imports_without_scikit_learn_scipy_or_matplotlib():
    """Every module imports with the three blocked, except the plots, whose error names the extra; the demo's
    data set loads."""
    code = BLOCK_OPTIONAL + (
        "import importlib, json\n"
        "failed = {}\n"
        f"for name in {sorted(modules())!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed[name] = str(exc)\n"
        "from hpcgraft.data import build_datasets\n"
        "assert sum(len(s) for s in build_datasets('digits')) == 1797\n"
        "print(json.dumps(failed))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    needs = "the report's plots need matplotlib, which is not installed; install it with pip install 'hpcgraft[report]'"
    assert json.loads(r.stdout.splitlines()[-1]) == {"hpcgraft.reporting.plots": needs,
                                                     "hpcgraft.reporting.summary": needs}


@pytest.mark.process  # a fresh interpreter
def test_the_report_without_matplotlib_names_the_extra_before_it_reads_a_run(tmp_path):
    run = ROOT / "tests" / "data" / "run-before-relayout"
    code = BLOCK_OPTIONAL + (
        "from hpcgraft.report import main\n"
        f"sys.exit(main([{str(run)!r}, '--out', {str(tmp_path / 'report')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == ["hpcgraft.report: error: the report's plots need matplotlib, which is not "
                                     "installed; install it with pip install 'hpcgraft[report]'"]
    assert not (tmp_path / "report").exists()
