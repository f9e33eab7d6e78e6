"""A run on a file system that fills up (a real tmpfs, under mpirun): exit 1 and one line stating the space
before the write and the space needed, the same again while still full, the last checkpoint untouched, and
after space is freed the same command resumes from it and ends bit for bit as the uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from hpcgraft.storage.checkpoints import resolve
from tests._tmpfs import resize, tmpfs
from tests.e2e.test_resume import again, assert_same_run, checkpoints, lines

# Slow: a checkpoint on a full disk is checked in process in tests/unit/storage/test_checkpoint_space.py.
pytestmark = pytest.mark.slow

REFERENCE = "base2"  # 2 peers, 2 epochs of 22 steps, a checkpoint after each (tests/runs.py)
ONE_CHECKPOINT = "1m"  # room for the run's small files and one checkpoint (about 0.73 MB), not two


def _digests(ckpt: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ckpt.iterdir())}


def test_a_full_disk_is_exit_1_in_one_line_and_the_run_resumes_exactly_once_space_is_freed(tmp_path, e2e_run):
    reference = e2e_run(REFERENCE).out
    with tmpfs(tmp_path / "fs", ONE_CHECKPOINT) as fs:
        out = fs / "run"
        kept: dict[str, str] = {}
        for attempt in range(2):  # the first failure, then the same command while the disk is still full
            r = again(REFERENCE, out)
            assert r.returncode == 1, r.stderr[-3000:]
            for noise in ("Traceback", "Exception ignored", "HDF5", "SIGSEGV", "BAD TERMINATION", "was killed"):
                assert noise not in r.stderr, r.stderr[-3000:]
            [line] = lines(r.stderr, "hpcgraft: error:")
            found = re.fullmatch(rf"hpcgraft: error: no space left in {re.escape(str(out))} for the checkpoint at "
                                 r"step 44: ([\d.]+) kB free before the write, the checkpoint needs ([\d.]+) kB "
                                 r"\(3 files\); free space .* re-run the same command to resume from the last "
                                 r"checkpoint",
                                 line)
            assert found, line
            assert float(found.group(1)) < float(found.group(2)), line
            assert json.loads((out / "status.json").read_text())["state"] == "failed"
            assert checkpoints(out) == [22] and resolve(out).step == 22
            kept = kept or _digests(out / "checkpoints" / "step-000000022")
            assert _digests(out / "checkpoints" / "step-000000022") == kept, attempt
            assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        resize(fs, "8m")
        r = again(REFERENCE, out)
        assert r.returncode == 0, r.stderr[-3000:]
        [line] = lines(r.stderr, "hpcgraft: resuming")
        assert "from step-000000022" in line, line
        assert_same_run(out, reference)
