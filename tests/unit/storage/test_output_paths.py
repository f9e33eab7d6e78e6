"""Every command checks where it will write before it works: a path that cannot take the output is one line
and exit 2 at start, not a traceback after the training, pruning or evaluation (hpcgraft.storage.outputs).

The work itself is replaced by a fake that fails the test if it is reached: what is shown is the order."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from hpcgraft import checkpoint, evaluate, graft, prune, report, sweep
from hpcgraft.cli import submit as launch
from hpcgraft.errors import ConfigError, InputError
from hpcgraft.launch import arms
from hpcgraft.report import SWEEP_FILE
from hpcgraft.storage import run as run_reader
from hpcgraft.storage.outputs import check_output_dir, check_output_file
from hpcgraft.training import finetune, offline


class WorkStartedError(Exception):
    """Raised by the fakes standing in for a command's work."""


def _work(*_args: object, **_kwargs: object) -> None:
    raise WorkStartedError


def one_line_exit_2(code: int, capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "error: " in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ------------------------------------------------------------------------------------------ the rule
def test_the_rule(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    assert check_output_dir(tmp_path / "dir", "--out") == tmp_path / "dir"
    assert check_output_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert check_output_file(tmp_path / "file", "--json") == tmp_path / "file"  # replaced, as before
    assert check_output_file(tmp_path / "new" / "r.json", "--json")  # its folder is made when it is written
    with pytest.raises(InputError, match=r"^--out .*file is an existing file, not a directory"):
        check_output_dir(tmp_path / "file", "--out")
    with pytest.raises(InputError, match=r"^--out .*file/sub: .*file is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "sub", "--out")
    with pytest.raises(InputError, match=r"^--json .*dir is a directory; pass the path of the file"):
        check_output_file(tmp_path / "dir", "--json")
    with pytest.raises(InputError, match=r"^--json .*file/r.json: .*file is a file, not a folder"):
        check_output_file(tmp_path / "file" / "r.json", "--json")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InputError, match="exists and is not a regular file"):
        check_output_file(tmp_path / "fifo", "--json")


# ------------------------------------------------------------------------------------------ every command
def test_evaluate_json_a_directory_or_under_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "evaluate_saved", _work)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    code = evaluate.main([str(tmp_path), "--json", str(tmp_path / "dir")])
    one_line_exit_2(code, capsys, f"--json {tmp_path / 'dir'} is a directory")
    code = evaluate.main([str(tmp_path), "--json", str(tmp_path / "file" / "r.json")])
    one_line_exit_2(code, capsys, f"{tmp_path / 'file'} is a file, not a folder")


def test_evaluate_json_in_a_folder_not_made_yet(tmp_path, monkeypatch, capsys):
    record = {"source": "run", "model": "m", "data": "d", "images": 1, "classes": 2, "table": "top-1 ..."}
    monkeypatch.setattr(evaluate, "evaluate_saved", lambda *a, **k: dict(record))
    out = tmp_path / "new" / "deeper" / "r.json"
    assert evaluate.main([str(tmp_path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["model"] == "m"


def test_prune_out_an_existing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune, "read_config", _work)
    (tmp_path / "out").write_text("")
    code = prune.main([str(tmp_path), "--criterion", "l1", "--keep", "0.5", "--out", str(tmp_path / "out")])
    one_line_exit_2(code, capsys, f"--out {tmp_path / 'out'} is an existing file, not a directory")


def test_prune_out_holding_a_directory_where_prune_json_goes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune, "read_config", _work)
    (tmp_path / "out" / "prune.json").mkdir(parents=True)
    code = prune.main([str(tmp_path), "--criterion", "l1", "--keep", "0.5", "--out", str(tmp_path / "out")])
    one_line_exit_2(code, capsys, "prune.json is a directory")


def test_sweep_out_an_existing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(arms, "run_local", _work)
    (tmp_path / "out").write_text("")
    code = sweep.main(["digits", "--seeds", "1", "--out", str(tmp_path / "out")])
    one_line_exit_2(code, capsys, f"--out {tmp_path / 'out'} is an existing file, not a directory")
    assert (tmp_path / "out").read_text() == ""


def test_sweep_run_directory_an_existing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(arms, "run_local", _work)
    (tmp_path / "out" / "grafting").mkdir(parents=True)
    (tmp_path / "out" / "grafting" / "seed0").write_text("")
    code = sweep.main(["digits", "--seeds", "1", "--out", str(tmp_path / "out")])
    one_line_exit_2(code, capsys, "grafting/seed0 is an existing file, not a directory")
    assert not (tmp_path / "out" / SWEEP_FILE).exists()


def test_graft_out_and_report_a_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(offline, "model_weights", _work)
    (tmp_path / "dir").mkdir()
    for flag in ("--out", "--report"):
        argv = ["a.pt", "b.pt", "--out", str(tmp_path / "g.pt"), flag, str(tmp_path / "dir")]
        one_line_exit_2(graft.main(argv), capsys, f"{flag} {tmp_path / 'dir'} is a directory")


def test_export_out_a_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_reader, "latest", _work)
    (tmp_path / "dir").mkdir()
    code = checkpoint.main(["export", str(tmp_path), "--peer", "0", "--out", str(tmp_path / "dir")])
    one_line_exit_2(code, capsys, f"--out {tmp_path / 'dir'} is a directory")


def test_launch_out_an_existing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launch, "submit", _work)
    (tmp_path / "run").write_text("")
    code = launch.main(["--config", "digits", "--out", str(tmp_path / "run")])
    one_line_exit_2(code, capsys, f"--out {tmp_path / 'run'} is an existing file")


def test_report_out_an_existing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "write_sweep_report", _work)
    (tmp_path / SWEEP_FILE).write_text(json.dumps({"arms": {}, "seeds": []}))
    (tmp_path / "r").write_text("")
    code = report.main([str(tmp_path), "--out", str(tmp_path / "r")])
    one_line_exit_2(code, capsys, f"--out {tmp_path / 'r'} is an existing file")


# ------------------------------------------------------------------------------------------ sweep.json
def _record(out: Path) -> None:
    arms.record(out, "digits", {"baseline": ("graft.mode=none",)}, 1, [])


def test_a_failed_sweep_json_write_leaves_the_old_one_whole(tmp_path, monkeypatch):
    out = tmp_path / "sw"
    _record(out)
    before = (out / SWEEP_FILE).read_text()
    real = Path.write_text

    def full_disk(self: Path, data: str, *args: object, **kwargs: object) -> int:
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        arms.record(out, "digits", {"grafting": ("graft.mode=peers",)}, 2, [])
    monkeypatch.undo()
    assert (out / SWEEP_FILE).read_text() == before
    assert sorted(p.name for p in out.iterdir()) == [SWEEP_FILE]  # no temporary left behind
    _record(out)  # and the next command reads it


@pytest.mark.parametrize(("text", "why"), [
    ('{"config": "digits", "arms": {"baseline": ["graft.mo', "Unterminated string"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"arms": ["baseline"], "seeds": [0]}', "'arms' is not a mapping"),
    ('{"arms": {}, "seeds": "0"}', "'seeds' is not a list of integers"),
    (b"\xff\xfe", "can't decode"),
])
def test_a_damaged_or_foreign_sweep_json_is_exit_2_naming_it(tmp_path, monkeypatch, capsys, text, why):
    monkeypatch.setattr(arms, "run_local", _work)
    out = tmp_path / "sw"
    out.mkdir()
    f = out / SWEEP_FILE
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=f"{f} is damaged or not a sweep's"):
        _record(out)
    code = sweep.main(["digits", "--seeds", "1", "--arms", "baseline", "--out", str(out)])
    one_line_exit_2(code, capsys, f"{f} is damaged or not a sweep's (", why, "move it away")
