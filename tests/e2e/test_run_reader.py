"""Every offline command reads a real run the same way (hpcgraft.storage.run): a DGConv run, a replica run
(Horovod), and both with config.yaml deleted; weights that do not fit the config are one line, exit 2; and
``evaluate --best`` passes over a damaged best checkpoint for the peer's next best."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcgraft import analyze, checkpoint, evaluate, graft, prune, report
from hpcgraft.storage.run import checkpoints
from tests.runs import horovod_installed

RUNS = ["dgconv_1ep", pytest.param("hybrid", marks=pytest.mark.skipif(not horovod_installed(),
                                                                          reason="Horovod is not installed"))]


def commands(run: Path, out: Path) -> dict[str, list[str]]:
    """Each command that reads a run, on ``run`` (its outputs under ``out``)."""
    step = checkpoints(run)[0].path
    return {
        "evaluate": [str(run)],
        "prune": [str(run), "--criterion", "l1,bn", "--keep", "0.5", "--out", str(out / "prune")],
        "analyze": [str(run), "--criterion", "l1,bn", "--keep", "0.5"],
        "export": ["export", str(run), "--peer", "1", "--out", str(out / "peer1.pt")],
        "graft": [str(step / "peer-000.h5"), str(step / "peer-001.h5"), "--out", str(out / "grafted.pt")],
        "report": [str(run), "--out", str(out / "report")],
    }


MAINS = {"evaluate": evaluate.main, "prune": prune.main, "analyze": analyze.main, "export": checkpoint.main,
         "graft": graft.main, "report": report.main}


@pytest.mark.parametrize("config_gone", [False, True], ids=["with-config", "config-gone"])
@pytest.mark.parametrize("name", RUNS)
def test_every_command_reads_the_run(e2e_run, tmp_path, capsys, name, config_gone) -> None:
    run = e2e_run(name).copy(tmp_path / "run")
    if config_gone:
        (run / "config.yaml").unlink()
    for command, args in commands(run, tmp_path).items():
        status = MAINS[command](args)
        err = capsys.readouterr().err
        assert status == 0, f"{command}: {err}"
    doc = json.loads((tmp_path / "prune/prune.json").read_text())
    assert [r["criterion"] for r in doc["results"]] == ["l1", "bn"]


def test_weights_that_do_not_fit_the_config_are_one_line(e2e_run, tmp_path, capsys) -> None:
    run = e2e_run("dgconv_1ep").copy(tmp_path / "run")
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("name: digits_resnet", "name: resnet20"))
    for command in ("evaluate", "prune", "analyze"):  # the commands that load weights into the run's model
        assert MAINS[command](commands(run, tmp_path)[command]) == 2, command
        err = capsys.readouterr().err.strip()
        assert "do not fit model.name=resnet20: " in err and "\n" not in err, f"{command}: {err}"


def test_evaluate_best_falls_back_past_a_damaged_best(e2e_run, tmp_path, capsys) -> None:
    run = e2e_run("base2").copy(tmp_path / "run")
    found = checkpoints(run)
    assert len(found) >= 2 and all(c.metrics[0] is not None for c in found)
    best = max(found, key=lambda c: (c.metrics[0], c.step))
    damaged = best.path / "peer-001.h5"  # the other peer's file: the checkpoint is damaged, not peer 0's weights
    damaged.write_bytes(damaged.read_bytes()[:-16])
    next_best = max((c for c in found if c is not best), key=lambda c: (c.metrics[0], c.step))
    assert evaluate.main([str(run), "--best", "--peer", "0"]) == 0
    out, err = capsys.readouterr()
    assert f"falling back to peer 0's next best, {next_best.path.name}" in err
    assert f"best: {next_best.path.name}" in out
