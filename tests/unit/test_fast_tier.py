"""The fast tier's rule (tests/unit/conftest.py): what it refuses, and that a test session really fails an
unmarked test that starts a process or MPI while it passes a marked one."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests._util import ROOT, env
from tests.unit.conftest import FastTierError, _Guard


@pytest.mark.parametrize(("event", "args", "what"), [
    ("subprocess.Popen", ("/bin/true", ["true"], None, None), "starts a subprocess"),
    ("os.system", (b"true",), "starts a shell"),
    ("os.fork", (), "forks"),
    ("os.posix_spawn", ("/bin/true", ["true"], {}), "spawns a process"),
    ("import", ("mpi4py.MPI", None, [], [], []), "imports mpi4py.MPI"),
])
def test_a_guarded_test_may_not_start_a_process_or_mpi(event, args, what):
    guard = _Guard()
    guard.audit(event, args)  # unguarded: allowed
    guard.where = "tests/unit/test_x.py::test_y"
    with pytest.raises(FastTierError, match=rf"^tests/unit/test_x.py::test_y {what}.*@pytest.mark.process"):
        guard.audit(event, args)
    assert guard.broken and guard.broken[0].startswith(what)


def test_what_a_guarded_test_may_do():
    guard = _Guard()
    guard.where = "t"
    for event, args in [("open", ("f", "r", 0)), ("import", ("mpi4py", None, [], [], [])),
                        ("import", ("json", None, [], [], []))]:
        guard.audit(event, args)
    other = threading.Thread(target=guard.audit, args=("subprocess.Popen", ("x", ["x"], None, None)))
    other.start()  # the end-to-end runs made ahead of need, in their background thread
    other.join()
    assert guard.broken == []


SESSION_TESTS = {
    "test_plain.py": "def test_ok():\n    assert True\n",
    "test_spawns.py": "import subprocess, sys\n\n"
                      "def test_spawn():\n    subprocess.run([sys.executable, '-c', 'pass'])\n\n"
                      "def test_spawn_and_swallow():\n    try:\n        subprocess.run(['true'])\n"
                      "    except Exception:\n        pass\n",
    "test_marked.py": "import subprocess, sys\n\nimport pytest\n\n"
                      "@pytest.mark.process\ndef test_spawn():\n    subprocess.run([sys.executable, '-c', 'pass'])\n",
    "test_mpi_at_import.py": "from mpi4py import MPI\n\ndef test_never_reached():\n    pass\n",
}


@pytest.mark.process  # a pytest session of its own
def test_a_session_fails_the_unmarked_tests_and_the_module_that_starts_mpi(tmp_path: Path):
    unit = tmp_path / "tests" / "unit"
    unit.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "unit" / "conftest.py", unit / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    process: x\n    slow: x\n")
    for name, text in SESSION_TESTS.items():
        (unit / name).write_text(text)
    args = ["-q", "-p", "no:cacheprovider", "-rfE", "--continue-on-collection-errors", "tests/unit"]
    r = subprocess.run([sys.executable, "-m", "pytest", *args], capture_output=True, text=True, env=env(),
                       cwd=tmp_path, timeout=300)
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert "2 failed, 2 passed, 1 error" in out, out
    for name in ("test_spawn", "test_spawn_and_swallow"):  # the second caught the error itself
        assert f"tests/unit/test_spawns.py::{name} starts a subprocess: tests/unit is the fast tier" in out, out
    assert "importing tests/unit/test_mpi_at_import.py imports mpi4py.MPI (initialises MPI)" in out
