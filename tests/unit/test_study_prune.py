"""tools/study_prune.py --table-only on hand-made numbers: the tables' means, stds and kernel columns, and
the plot file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests._util import ROOT


def doc(top1: float, left: int) -> dict:
    result = {"criterion": "lean", "keep": 0.1, "top1_pruned": {"0": top1 - 10, "1": top1 - 10},
              "top1": {"0": top1, "1": top1 + 2},
              "kernels": {"total": 1000, "kept_by_criterion": {"0": 100, "1": 100}, "kept": {"0": left, "1": left}}}
    return {"unpruned": {"0": 98.0, "1": 99.0}, "results": [result]}


@pytest.mark.process  # runs the tool
def test_table_only_from_a_saved_study(tmp_path):
    runs = {"digits_resnet": {arm: {"0": doc(90.0, 60), "1": doc(94.0, 80)} for arm in ("baseline", "grafted")}}
    (tmp_path / "study.json").write_text(json.dumps({"wall_s": 5.0, "runs": runs}))
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "study_prune.py"), "--out", str(tmp_path), "--table-only",
                        "--models", "digits_resnet", "--seeds", "0", "1", "--keep", "0.1", "--criteria", "lean"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # seeds: fine-tuned peer means 91 and 95 (mean 93, std 2.8), pruned 80 and 84; kernels 10 % chosen, 7 % left
    assert "| lean | 0.1 | 10.0 -> 7.0 | 82.0 +- 2.8 | 93.0 +- 2.8 | 82.0 +- 2.8 | 93.0 +- 2.8 |" in r.stdout
    assert "| unpruned | 1 | 100 | 98.5 +- 0.0 | " in r.stdout
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
