"""The run reader on real HDF5 checkpoints written in process (one rank, a fake of SoloComm()): the config from
config.yaml or run.h5, a peer's best checkpoint past a damaged one, and the model as training builds it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from hpcgraft.config import load_config
from hpcgraft.errors import ConfigError, InputError
from hpcgraft.models.dgconv import dgconv_layers
from hpcgraft.storage import run
from hpcgraft.storage.checkpoints import CheckpointManager, peer_file
from tests._util import ROOT
from tests.fakes import SoloComm

DGCONV = ["model.dgconv=true", "model.bn_momentum=0.25"]


def _run_dir(tmp_path: Path, metrics: dict[int, float]) -> tuple[Path, dict[str, torch.Tensor]]:
    """A one-peer run of the DGConv digits model with a checkpoint per step of ``metrics`` (step -> metric)."""
    cfg = load_config(ROOT / "configs/digits.yaml", DGCONV)
    state = run.build_model(cfg, 10).state_dict()
    d = tmp_path / "run"
    mgr = CheckpointManager(d, SoloComm(), peer=0, peers=1, writer=True, keep=len(metrics))
    for epoch, (step, metric) in enumerate(metrics.items(), 1):
        mgr.save(step, epoch, {"model": state}, {"config": cfg.to_yaml()}, metric=metric)
    run.write_config(d, cfg)
    return d, state


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_config_comes_from_config_yaml_else_from_the_checkpoint(tmp_path) -> None:
    d, _ = _run_dir(tmp_path, {10: 50.0, 20: 60.0})
    read = run.read_config(d)
    assert not read.from_checkpoint and read.origin == d / "config.yaml" and read.cfg.model.dgconv
    (d / "config.yaml").unlink()
    for path in (d, d / "checkpoints", d / "checkpoints/step-000000010", d / "checkpoints/step-000000010/peer-000.h5"):
        read = run.read_config(path)
        assert read.from_checkpoint and read.cfg.model.dgconv and read.cfg.model.bn_momentum == 0.25
        assert "its config.yaml is gone" in read.where()
    assert run.read_config(d).origin.parent.name == "step-000000020"  # the newest intact checkpoint
    assert run.read_config(d, ["train.lr=0.5"]).cfg.train.lr == 0.5
    with pytest.raises(ConfigError, match="unknown config key") as err:
        run.read_config(d, ["train.nonsense=1"])
    assert "unreadable" not in str(err.value)  # the override is wrong, not the run's config


def test_no_config_anywhere_is_one_line(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither an hpcgraft run directory"):
        run.read_config(tmp_path / "empty")
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    assert run.read_config(tmp_path / "w.pt") is None  # weights only


def test_best_passes_over_a_damaged_best_for_the_next_best(tmp_path, capsys) -> None:
    d, _ = _run_dir(tmp_path, {10: 50.0, 20: 90.0, 30: 70.0})
    assert run.best(d, 0).step == 20
    _damage(d / "checkpoints/step-000000020/run.h5")  # not the peer's own file: the checkpoint is damaged
    assert run.best(d, 0).step == 30
    assert "falling back to peer 0's next best, step-000000030" in capsys.readouterr().err
    states = run.peer_states(d, use_best=True)
    assert list(states) == ["peer 0 (best: step-000000030, epoch 3)"]
    for step in (30, 10):
        _damage(d / f"checkpoints/step-{step:09d}/{peer_file(0)}")
    with pytest.raises(Exception, match="every checkpoint .* that records peer 0's metric is damaged"):
        run.best(d, 0)


def test_model_is_built_as_training_builds_it(tmp_path) -> None:
    d, state = _run_dir(tmp_path, {10: 50.0})
    cfg = run.read_config(d).cfg
    model = run.load_model(cfg, state, "peer 0")
    assert dgconv_layers(model)  # DGConv gates, not plain convs
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.25}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_weights_of_another_model_are_one_line(tmp_path) -> None:
    _, state = _run_dir(tmp_path, {10: 50.0})
    other = load_config(ROOT / "configs/digits.yaml", ["model.name=resnet20"])
    with pytest.raises(ConfigError) as err:
        run.load_model(other, state, "peer 0")
    assert "do not fit model.name=resnet20: " in str(err.value) and "\n" not in str(err.value)


def test_only_the_reader_names_config_yaml() -> None:
    """Every command reads a run through hpcgraft.storage.run; a second reader would drift from it (a
    model rebuilt without DGConv, a config-less run read by one command and refused by the next)."""
    readers = []
    for path in sorted((ROOT / "hpcgraft").rglob("*.py")):
        if path == ROOT / "hpcgraft/storage/run.py":
            continue
        tree = ast.parse(path.read_text())
        names = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == "config.yaml"]
        imports = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and n.module == "hpcgraft.storage.run" for a in n.names if a.name == "CONFIG"]
        if names or (imports and path != ROOT / "hpcgraft/training/rundir.py"):  # rundir: --restart removes it
            readers.append(str(path.relative_to(ROOT)))
    assert readers == []


def test_a_peer_file_is_checked_against_its_manifest(tmp_path) -> None:
    """graft reads one model's file: a checkpoint's peer file is verified like any checkpoint read."""
    d, state = _run_dir(tmp_path, {10: 50.0})
    peer = d / "checkpoints/step-000000010" / peer_file(0)
    assert all(torch.equal(run.model_weights(peer)[k], v) for k, v in state.items())
    _damage(peer)
    with pytest.raises(InputError, match="step-000000010 is damaged"):
        run.model_weights(peer)
