"""Checkpoints in process: HDF5 trees, save/resume on one rank, damage detection, pruning, the CLI, and a
checkpoint in the format of the code before the package re-layout. (Several ranks: tests/e2e.)"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcgraft.cli.checkpoint import main
from hpcgraft.errors import CheckpointError
from hpcgraft.storage.checkpoints import CheckpointInfo, CheckpointManager
from hpcgraft.storage.tree import read_tree, write_tree
from tests._util import ROOT, env
from tests.fakes import SoloComm

CKPT = "checkpoints"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny models here run slower, not faster, with several threads on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _same(a, b) -> bool:
    """Deep equality that also compares tensor/array dtypes, shapes and bits."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        size = a.element_size()
        if a.dtype.is_floating_point and size in (2, 4, 8):  # bitwise, so NaN payloads and -0.0 count
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
            return torch.equal(a.view(bits), b.view(bits))
        if a.dtype.is_floating_point:
            return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def _round_trip(tree: dict, tmp_path: Path) -> dict:
    path = tmp_path / "tree.h5"
    with h5py.File(path, "w", track_order=True) as f:
        write_tree(f, tree)
    with h5py.File(path, "r") as f:
        return read_tree(f)


def test_tree_round_trip_keeps_every_leaf_type_and_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1e-40, float("inf"), -float("inf"), float("nan"), 3.14159])
    tree = {
        "tensors": {
            "f32": torch.randn(3, 4, generator=g),
            "f64": torch.randn(5, generator=g, dtype=torch.float64),
            "f16": special.to(torch.float16),
            "bf16": torch.cat([special, torch.randn(20, generator=g)]).to(torch.bfloat16),
            "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
            "i64": torch.arange(-3, 7, dtype=torch.int64).reshape(2, 5),
            "u8": torch.arange(250, 256, dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "c64": torch.randn(3, generator=g, dtype=torch.complex64),
            "scalar": torch.tensor(2.5),
            "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
            "scalar_i64": torch.tensor(7),
            "empty": torch.zeros(0),
            "empty_2d": torch.zeros(3, 0, dtype=torch.bfloat16),
            "noncontiguous": torch.arange(12.0).reshape(3, 4).t(),
            "requires_grad": torch.ones(2, requires_grad=True),
        },
        "arrays": {"u32": np.arange(5, dtype=np.uint32), "f32_0d": np.array(1.25, dtype=np.float32),
                   "bool": np.array([[True], [False]]), "empty": np.zeros((0, 2), dtype=np.int16)},
        "scalars": {"int": 3, "neg": -(2**63), "big": 2**100, "float": 0.1, "nan": float("nan"), "true": True,
                    "false": False, "none": None, "str": "grafting ✓", "nul": "a\x00b", "empty_str": "",
                    "np_float": np.float32(0.5), "np_int": np.int64(-4)},
        "lists": {"ints": [0, 1, 2], "floats": [0.5, 1e300], "strs": ["a", "b/c"], "bools": [True, False], "empty": [],
                  "mixed": [1, 2.5, "x", None, {"k": [1]}, torch.ones(2)], "tuple": (1, 2), "nested": [[1, 2], []]},
        "odd keys": {"": 1, ".": 2, "..": 3, "a/b": 4, "%2F": 5, " lead": 6, "layer1.0.conv1.weight": 7, 8: "int key",
                     "8x": "str key"},
        "empty_dict": {},
    }
    back = _round_trip(tree, tmp_path)
    assert _same(tree, back)
    # Tensors come back as tensors (not arrays) with their dtype, shape and values.
    t = back["tensors"]
    assert t["bf16"].dtype == torch.bfloat16 and t["scalar"].shape == () and t["empty_2d"].shape == (3, 0)
    assert torch.equal(t["noncontiguous"], torch.arange(12.0).reshape(3, 4).t())
    assert not t["requires_grad"].requires_grad
    assert isinstance(back["scalars"]["np_float"], np.float32) and back["scalars"]["big"] == 2**100


def test_files_are_plain_hdf5(tmp_path):
    tree = {"model": {"conv.weight": torch.ones(4, 1, 3, 3), "bn.num_batches_tracked": torch.tensor(5)},
            "bf": torch.ones(2, dtype=torch.bfloat16), "lr": 0.1, "name": "peer/0"}
    _round_trip(tree, tmp_path)
    with h5py.File(tmp_path / "tree.h5", "r") as f:  # no hpcgraft code: what any reader sees
        assert f["model/conv.weight"].dtype == np.float32 and f["model/conv.weight"].shape == (4, 1, 3, 3)
        assert f["bf"].dtype == np.uint16 and f["bf"].attrs["type"] == "torch.bfloat16"
        assert f["bf"][()].tolist() == [0x3F80, 0x3F80]  # bfloat16 1.0, bit for bit
        assert f["lr"][()] == 0.1 and f["name"].asstr()[()] == "peer/0"


@pytest.mark.process  # HDF5's own h5ls
@pytest.mark.skipif(not shutil.which("h5ls"), reason="h5ls (HDF5's tools) is not installed")
def test_h5ls_lists_the_tree(tmp_path):
    _round_trip({"model": {"conv.weight": torch.ones(4, 1, 3, 3)}}, tmp_path)
    listing = subprocess.run(["h5ls", "-r", str(tmp_path / "tree.h5")], capture_output=True, text=True).stdout
    assert "/model/conv.weight" in listing and "{4, 1, 3, 3}" in listing


def test_bad_trees_are_one_line_errors(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        with pytest.raises(CheckpointError, match=r"cannot store /model/w: object is not a checkpoint leaf"):
            write_tree(f, {"model": {"w": object()}})
        with pytest.raises(CheckpointError, match="keys '1' and 1 under '/a' collide"):
            write_tree(f.create_group("g"), {"a": {"1": 0, 1: 0}})
        with pytest.raises(CheckpointError, match="numpy dtype object"):
            write_tree(f.create_group("h"), {"a": np.array([object()])})
        with pytest.raises(CheckpointError, match="must be a dict"):
            write_tree(f, [1])


def _tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_model_and_sgd_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for i in range(3):
        _train_step(model, opt, i)
    back = _round_trip({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path)
    assert _same(model.state_dict(), back["model"]) and _same(opt.state_dict(), back["optimizer"])

    model2 = _tiny_model()
    model2.load_state_dict(back["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5)
    opt2.load_state_dict(back["optimizer"])
    _train_step(model, opt, 10)
    _train_step(model2, opt2, 10)  # momentum and hyper-parameters were restored: identical next step
    assert _same(model.state_dict(), model2.state_dict())


def _manager(run_dir: Path, **kw) -> CheckpointManager:
    return CheckpointManager(run_dir, SoloComm(), peer=0, peers=1, writer=True, **kw)


def _peer_tree(step: int) -> dict:
    return {"model": {"w": torch.full((64,), float(step)), "bn.num_batches_tracked": torch.tensor(step)},
            "progress": {"step": step, "batch": 0}}


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / CKPT).iterdir())


def test_save_latest_load_in_one_process(tmp_path):
    mgr = _manager(tmp_path)
    assert mgr.latest() is None
    info = mgr.save(5, 1, _peer_tree(5), {"config": "seed: 0\n", "history": [{"epoch": 1, "alpha": 0.4}]}, metric=0.5)
    assert info.path == tmp_path / CKPT / "step-000000005" and (info.step, info.epoch, info.peers) == (5, 1, 1)
    assert mgr.latest() == info
    assert _same(mgr.load_peer(info, 0), _peer_tree(5))
    assert mgr.load_run(info) == {"config": "seed: 0\n", "history": [{"epoch": 1, "alpha": 0.4}]}
    manifest = json.loads((info.path / "MANIFEST.json").read_text())
    assert (manifest["step"], manifest["metrics"], sorted(manifest["files"])) == (5, [0.5], ["peer-000.h5", "run.h5"])
    assert sorted(p.name for p in info.path.iterdir()) == ["MANIFEST.json", "peer-000.h5", "run.h5"]  # no temp files
    with pytest.raises(CheckpointError, match="has 1 peer .0..0.; peer 1 does not exist"):
        mgr.load_peer(info, 1)
    # Saving the same step again replaces it.
    mgr.save(5, 1, _peer_tree(6), None)
    assert _same(mgr.load_peer(mgr.latest(), 0), _peer_tree(6)) and mgr.load_run(info) == {}
    # A file changed after latest() checked it is checked again by load_peer.
    _damage(mgr.latest().path, "flipped bytes")
    with pytest.raises(CheckpointError, match=r"step-000000005 is damaged \(peer-000.h5: checksum mismatch\)"):
        mgr.load_peer(info, 0)


def _damage(path: Path, how: str) -> str:
    """Damage a checkpoint file or directory the way a crash or a bad disk would; returns the expected reason."""
    if how == "missing manifest":
        (path / "MANIFEST.json").unlink()
        return "MANIFEST.json missing: the save did not finish"
    target = path / "peer-000.h5"
    data = bytearray(target.read_bytes())
    if how == "truncated":
        target.write_bytes(data[: len(data) // 2])
        return f"peer-000.h5: {len(data) // 2} bytes instead of {len(data)}"
    data[len(data) // 2] ^= 0x10  # one flipped bit
    target.write_bytes(data)
    return "peer-000.h5: checksum mismatch"


@pytest.mark.parametrize("how", ["missing manifest", "truncated", "flipped bytes"])
def test_damaged_checkpoint_falls_back_with_one_line(tmp_path, capfd, how):
    mgr = _manager(tmp_path, keep=3)
    for step in (1, 2, 3):
        mgr.save(step, step, _peer_tree(step), None)
    capfd.readouterr()
    reason = _damage(tmp_path / CKPT / "step-000000003", how)
    info = mgr.latest()
    assert info.step == 2 and _same(mgr.load_peer(info, 0), _peer_tree(2))
    err = capfd.readouterr().err
    assert err == f"hpcgraft: checkpoint step-000000003 is damaged ({reason}); falling back to step-000000002\n"
    with pytest.raises(CheckpointError, match=rf"checkpoint step-000000003 is damaged \({re.escape(reason)}\)"):
        mgr.load_peer(CheckpointInfo(tmp_path / CKPT / "step-000000003", 3, 3, 1), 0)


def test_nothing_intact_is_an_error_but_an_unfinished_first_save_is_a_fresh_start(tmp_path, capfd):
    mgr = _manager(tmp_path)
    mgr.save(1, 1, _peer_tree(1), None)
    _damage(tmp_path / CKPT / "step-000000001", "flipped bytes")
    with pytest.raises(CheckpointError, match="no intact checkpoint .* step-000000001 is damaged .*--restart"):
        mgr.latest()
    assert "step-000000001 is damaged (peer-000.h5: checksum mismatch); no earlier checkpoint" in capfd.readouterr().err
    (tmp_path / CKPT / "step-000000001" / "MANIFEST.json").unlink()
    assert mgr.latest() is None


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    metrics = {1: 0.1, 2: 0.9, 3: 0.3, 4: float("nan"), 5: 0.4, 6: None}
    mgr = _manager(tmp_path, keep=2)
    for step, metric in metrics.items():
        if step == 4:  # a save of step 1 that died before its manifest: removed as older than a complete one
            assert _steps(tmp_path) == [2, 3]
            (tmp_path / CKPT / "step-000000001").mkdir()
        mgr.save(step, step, _peer_tree(step), None, metric=metric)
    assert _steps(tmp_path) == [2, 5, 6]
    # A later step left over from before a fallback to an earlier checkpoint is dropped by the next save.
    (tmp_path / CKPT / "step-000000099").mkdir()
    mgr.save(7, 7, _peer_tree(7), None)
    assert _steps(tmp_path) == [2, 6, 7]

    plain = _manager(tmp_path / "nobest", keep=2, keep_best=False)
    for step, metric in metrics.items():
        plain.save(step, step, _peer_tree(step), None, metric=metric)
    assert _steps(tmp_path / "nobest") == [5, 6]


def test_layout_errors(tmp_path):
    with pytest.raises(CheckpointError, match="keep must be at least 1"):
        _manager(tmp_path, keep=0)
    two = CheckpointManager(tmp_path, SoloComm(), peer=0, peers=2, writer=True)
    with pytest.raises(CheckpointError, match=r"writers cover peers \[0\], expected exactly one writer for each of"):
        two.save(1, 1, _peer_tree(1), None)
    with pytest.raises(CheckpointError, match="could not write step-000000002: cannot store /x: object"):
        _manager(tmp_path).save(2, 1, {"x": object()}, None)
    assert not (tmp_path / CKPT / "step-000000002").exists()  # neither the directory nor temporary files stay


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def run_with_checkpoints(tmp_path):
    """A run directory with checkpoints at steps 3 and 6 of a real model (one peer)."""
    torch.manual_seed(0)
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mgr = _manager(tmp_path)
    for step in (3, 6):
        _train_step(model, opt, step)
        mgr.save(step, step // 3, {"model": model.state_dict(), "optimizer": opt.state_dict()},
                 {"config": "seed: 0\n", "versions": {"torch": torch.__version__}}, metric=step / 10)
    return tmp_path, model


def test_inspect_run_dir_checkpoint_dir_and_file(run_with_checkpoints, capsys):
    run_dir, model = run_with_checkpoints
    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    ckpt = run_dir / CKPT / "step-000000006"
    assert f"checkpoint {ckpt}: step 6, epoch 2, peers 1" in out and "verified" in out
    n_tensors = len(model.state_dict()) + len(list(model.parameters()))  # weights + momentum buffers
    nbytes = 2 * sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert [int(x) if x.isdigit() else x for x in out.splitlines()[2].split()[:4]] == [0, n_tensors, nbytes, "0.6000"]
    assert "run.h5 keys: config, versions" in out

    assert main(["inspect", str(ckpt), "--tree"]) == 0
    out = capsys.readouterr().out
    assert "peer-000.h5:/model/0.weight  torch.float32 (4, 1, 3, 3)" in out
    assert "peer-000.h5:/optimizer/param_groups/0/lr  float 0.1" in out
    assert "run.h5:/config  str 'seed: 0\\n'" in out

    assert main(["inspect", str(ckpt / "peer-000.h5")]) == 0
    out = capsys.readouterr().out
    assert "verified against MANIFEST.json" in out and "step 6, epoch 2, peers 1, peer 0, metric 0.6" in out
    assert f"tensors {n_tensors}, {nbytes} bytes" in out and "keys: model, optimizer" in out


def test_export_writes_a_weights_only_state_dict(run_with_checkpoints, tmp_path, capsys):
    run_dir, model = run_with_checkpoints
    out = tmp_path / "export" / "model.pt"
    assert main(["export", str(run_dir), "--peer", "0", "--out", str(out)]) == 0
    assert f"wrote {out}: peer 0 of {run_dir / CKPT / 'step-000000006'}" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    assert _same(dict(model.state_dict()), state)
    fresh = _tiny_model()
    fresh.load_state_dict(state)
    # A peer file works too and names its own peer.
    assert main(["export", str(run_dir / CKPT / "step-000000003" / "peer-000.h5"), "--out", str(out)]) == 0
    assert "peer 0 of" in capsys.readouterr().out and torch.load(out, weights_only=True).keys() == state.keys()


@pytest.mark.process  # runs the command as a user does: python -m
def test_cli_errors_are_one_line(run_with_checkpoints, tmp_path, capsys):
    run_dir, _ = run_with_checkpoints
    ckpt = run_dir / CKPT / "step-000000006"

    def error(argv: list[str]) -> str:
        assert main(argv) == 2  # bad input, as docs/failures.md promises
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("hpcgraft: error: ")
        return err

    assert "does not exist" in error(["inspect", str(tmp_path / "nope")])
    # The same through `python -m`, as a user runs it.
    res = subprocess.run([sys.executable, "-m", "hpcgraft.checkpoint", "inspect", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=env(), timeout=120)
    assert (res.returncode, res.stdout, res.stderr) == (2, "", f"hpcgraft: error: {tmp_path / 'nope'} does not exist\n")
    assert "peer 2 does not exist" in error(["export", str(run_dir), "--peer", "2", "--out", str(tmp_path / "m.pt")])
    assert "peer 7 does not exist" in error(["export", str(run_dir), "--peer", "7", "--out", str(tmp_path / "m.pt")])
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(bytes(range(256)) * 8)
    assert "hpcgraft: error: " in error(["inspect", str(garbage)])
    assert "--peer" in error(["export", str(ckpt), "--out", str(tmp_path / "m.pt")])
    _damage(ckpt, "flipped bytes")
    assert "checkpoint step-000000006 is damaged (peer-000.h5: checksum mismatch)" in error(["inspect", str(ckpt)])
    assert "checksum mismatch" in error(["inspect", str(ckpt / "peer-000.h5")])
    # The run directory still resolves: to the previous checkpoint, after the one-line damage report.
    assert main(["inspect", str(run_dir)]) == 0
    captured = capsys.readouterr()
    assert "step 3, epoch 1" in captured.out and "falling back to step-000000003" in captured.err


# ------------------------------------------------------------------------------------- older checkpoints
OLD_RUN = ROOT / "tests" / "data" / "run-before-relayout"  # written by 9701551 (main)


def test_a_checkpoint_written_before_the_relayout_loads_into_a_peer(tmp_path, capsys):
    """One peer, one digits epoch, written by the flat-module code (commit 9701551): the manifest verifies,
    the tree loads into a peer built from the run's own config, and the peer saves the same tree again."""
    from hpcgraft.comm.world import World
    from hpcgraft.config import load_config
    from hpcgraft.training.peer import build_peer

    run = shutil.copytree(OLD_RUN, tmp_path / "run")
    assert main(["inspect", str(run)]) == 0
    assert "step 22, epoch 1, peers 1" in capsys.readouterr().out
    mgr = CheckpointManager(run, SoloComm(), peer=0, peers=1, writer=True)
    info = mgr.latest()
    tree = mgr.load_peer(info, 0)
    self_ = SoloComm()
    world = World(comm=self_, rank=0, size=1, local_rank=0, local_size=1, peer=0, peers=1, replica=0, replicas=1,
                  graft_comm=self_, peer_comm=self_)
    peer = build_peer(load_config(run / "config.yaml"), world)
    peer.load_state_dict(tree)
    assert peer.progress.step == 22 and peer.progress.epoch == 1
    assert _same(peer.state_dict(), tree)
    assert mgr.load_run(info)["config"] == (run / "config.yaml").read_text()
