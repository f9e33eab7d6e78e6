"""The GPU check's dry run: tools/gpu_check.sh --cpu --fast runs every item of the check on
the CPU, so that the script a GPU machine runs cannot rot between the sessions that are lent one."""

import re
import subprocess

import pytest

from tests._util import ROOT, env

pytestmark = [pytest.mark.mpi, pytest.mark.slow]  # CI's make test-all keeps the script from rotting


def test_gpu_check_dry_run_passes_every_item(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "tools/gpu_check.sh"), "--cpu", "--fast", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    summary = (tmp_path / "gpu_check.txt").read_text()
    for item in ("env", "unit", "graft", "resume", "speed_train", "speed_graft", "speed_compile"):
        assert f"PASS {item} (" in summary, summary
    # P peers per rank: measured where tools/bench_train.py has the mode, else skipped by name
    assert "PASS speed_peers (" in summary or "SKIP speed_peers (" in summary, summary
    assert re.search(r"^\d+ passed, 0 failed", summary, re.MULTILINE), summary
    assert re.search(r"linear +off +default .*\|", summary), summary  # a compiled row, against the bare loop
    # the figures each item exists to give, in their dry-run form
    assert "MPI graft vs offline graft_state on cpu: max |dW| 0.00e+00" in summary  # the CPU ring is exact
    assert "0 of 88 tensors differ" in summary  # resumed bitwise on the CPU
    assert "resnet50" in summary and "entropy of all layers" in summary
