"""User errors decided before any MPI work, checked in process: the same validation functions the ranks
run, and the training command's own ``main`` in this process (a world of one rank). One real
end-to-end exit-2 check through mpirun stays in tests/e2e/test_train.py."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from hpcgraft.cli import train
from hpcgraft.comm import failure, mpi
from hpcgraft.comm.replicas import require_horovod
from hpcgraft.comm.world import agreed, check_peers_agree, init_world, peers_per_group
from hpcgraft.config import load_config
from hpcgraft.errors import ConfigError, LayoutError, PeerMismatchError, SetupError
from hpcgraft.training.peer import check_layout, check_peer_count
from tests._util import ROOT


class FakeComm:
    """A rank of a world of ``size``: collectives return what ``others`` says the other ranks hold."""

    def __init__(self, size: int = 2, rank: int = 0, others: object = None) -> None:
        self.size, self.rank, self.others = size, rank, others

    def Get_size(self) -> int:  # noqa: N802 - mpi4py's name
        return self.size

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's name
        return self.rank

    def allgather(self, value: object) -> list:
        other = self.others(value) if callable(self.others) else self.others
        return [value, *[other] * (self.size - 1)]


def run_main(capsys: pytest.CaptureFixture, tmp_path, *overrides: str) -> tuple[int, list[str], str]:
    """``python -m hpcgraft.train`` without mpirun, in this process: (status, error lines, stderr)."""
    rc = train.main(["--config", str(ROOT / "configs/digits.yaml"), "--out", str(tmp_path / "run"),
                     "train.epochs=1", "log.progress=off", *overrides])
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.startswith("hpcgraft: error:")], err


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ((), "grafting between peers needs at least 2 peers but this run has 1; start it with mpirun -np K (K >= 2) "
             "or set graft.mode=none"),
        (("graft.mode=none", "cultivate.lambda=1"),
         "cultivation (cultivate.lambda=1) distils between peers and needs at least 2 but this run has 1; start "
         "it with mpirun -np K (K >= 2) or set cultivate.lambda=0"),
        (("graft.peers=1",), "grafting between peers needs at least 2 peers but this run has 1; set graft.peers=K "
                             "(K >= 2) or set graft.mode=none"),
        (("graft.peers=0",), "graft.peers=0 must be >= 1, or left unset for one peer per rank (per dist.replicas "
                             "ranks)"),
        (("trian.epochs=1",), "unknown config key 'trian.epochs'; did you mean 'train.epochs'?"),
        (("graft.a=2",), "graft.a=2.0 is outside [0, 1]"),
        (("graft.mode=none", "data.name=cifar10"), "data.name=cifar10 needs data.root"),
        (("graft.mode=none", "model.name=resnet33"), "unknown model 'resnet33' (model.name); did you mean"),
        (("graft.mode=none", "train.batched=true", "model.dgconv=true"),
         "train.batched=true cannot batch DGConv layers (model.dgconv=true)"),
    ],
    ids=["grafting-alone", "cultivation-alone", "one-peer", "no-peers", "unknown-key", "bad-value", "missing-data",
         "unknown-model", "batched-dgconv"],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, stop_signals_kept, overrides, message):
    rc, errors, err = run_main(capsys, tmp_path, *overrides)
    assert rc == 2, err
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


def test_mismatched_peers_name_the_rank_and_the_key():
    cfg = load_config(None, ["train.epochs=2"])
    flat, sig = cfg.flat(), [("conv1.weight", (16, 1, 3, 3), "torch.float32")]

    def with_lr(value: tuple) -> tuple:
        other = dict(value[0], **{"train.lr": 0.2})
        return (other, *value[1:])

    with pytest.raises(PeerMismatchError, match=r"^rank 1 was started with a different config: train\.lr=0\.2 there, "
                                                r"0\.1 on rank 0; start every rank with the same config"):
        check_peers_agree(FakeComm(others=with_lr), flat, sig)

    def other_model(value: tuple) -> tuple:
        return value[0], "another hash", [("conv1.weight", (8, 1, 3, 3), "torch.float32")]

    with pytest.raises(PeerMismatchError, match=r"rank 1 built a different model: \('conv1\.weight', \(8, 1, 3, 3\)"):
        check_peers_agree(FakeComm(others=other_model), flat, sig)


def test_agreement_turns_any_ranks_error_into_one_line_on_every_rank():
    def fails() -> None:
        raise ConfigError("graft.a=2.0 is outside [0, 1]")

    with pytest.raises(SetupError, match=r"^graft\.a=2\.0 is outside \[0, 1\]$"):  # every rank: no rank prefix
        agreed(FakeComm(others="graft.a=2.0 is outside [0, 1]"), fails)
    with pytest.raises(SetupError, match=r"^rank 1: data\.root=/x does not exist$"):  # one rank: named
        agreed(FakeComm(others="data.root=/x does not exist"), lambda: 7)
    assert agreed(FakeComm(others=None), lambda: 7) == 7
    # A step for the job as a whole (the run directory's lock) runs on rank 0; its error is everyone's.
    with pytest.raises(SetupError, match=r"^run is in use$"):
        agreed(FakeComm(rank=1, others="run is in use"), lambda: 7, root_only=True)


@pytest.mark.process  # init_world imports MPI
def test_layout_errors_name_the_rank_count_to_start():
    with pytest.raises(LayoutError, match=r"^3 ranks cannot form peers of dist\.replicas=2 ranks each; start a "
                                          r"multiple of 2 ranks \(mpirun -np 4\) or change dist\.replicas$"):
        init_world(2, FakeComm(size=3))
    cfg = load_config(None, ["dist.replicas=2"])
    with pytest.raises(ConfigError, match=r"^grafting between peers needs at least 2 peers but this run has 1; start "
                                          r"it with mpirun -np K \(K >= 2 peers x dist\.replicas=2\) or set "
                                          r"graft\.mode=none$"):
        check_peer_count(cfg, peers=1, replicas=2)


@pytest.mark.process  # init_world imports MPI
def test_a_peer_count_the_ranks_cannot_share_names_the_rank_counts_that_fit():
    assert peers_per_group(None, 4, 1) == 1 and peers_per_group(8, 4, 1) == 2 and peers_per_group(4, 4, 2) == 2
    with pytest.raises(LayoutError, match=r"^graft\.peers=6 cannot be spread evenly over 4 ranks; rank counts that "
                                          r"fit: 1, 2, 3, 6 \(mpirun -np 6\), or change graft\.peers$"):
        peers_per_group(6, 4, 1)
    with pytest.raises(LayoutError, match=r"^graft\.peers=3 cannot be spread evenly over 2 rank groups of "
                                          r"dist\.replicas=2; rank counts that fit: 2, 6 \(mpirun -np 6\)"):
        peers_per_group(3, 4, 2)
    world = init_world(1, mpi().COMM_SELF, peers=4)
    assert (world.peers, world.per_rank, list(world.local_peers)) == (4, 4, [0, 1, 2, 3])


def test_several_peers_per_replica_group_are_refused_before_horovod_is_asked():
    cfg = load_config(None, ["dist.replicas=2", "graft.peers=4"])
    world = SimpleNamespace(peers=4, replicas=2, per_rank=2, size=4)
    with pytest.raises(ConfigError, match=r"^graft\.peers=4 on 4 ranks with dist\.replicas=2 puts 2 peers on each "
                                          r"replica group, and replicas train one peer per group; set graft\.peers=2"):
        check_layout(cfg, world)


def test_missing_horovod_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod", None)
    monkeypatch.delitem(sys.modules, "horovod.torch", raising=False)
    with pytest.raises(ConfigError) as info:
        require_horovod(load_config(None, ["dist.replicas=2"]).dist)
    message = str(info.value)
    assert "dist.replicas=2 needs Horovod, but 'import horovod.torch' failed" in message
    assert "install it with bash tools/build_horovod.sh .venv" in message and "dist.replicas=1" in message


# ---------------------------------------------------------------------------- bad input decided before training
@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.num_classes=3",), "model.num_classes=3 is fewer than the 10 classes of data.name=digits"),
        (("model.num_classes=0",), "model.num_classes=0 must be >= 1"),
        (("model.name=resnet20",), "model.name=resnet20 does not take the images of data.name=digits"),
        (("log.thresholds=[]",), "log.thresholds=[] must list at least one l1 norm"),
        (("train.lr=.inf",), "train.lr=inf must be a finite number > 0"),
    ],
    ids=["too-few-classes", "zero-classes", "wrong-channels", "no-thresholds", "infinite-lr"],
)
def test_bad_values_are_refused_before_training(capsys, tmp_path, stop_signals_kept, overrides, message):
    rc, errors, err = run_main(capsys, tmp_path, "graft.mode=none", *overrides)
    assert rc == 2, err
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
def test_a_binary_config_file_is_one_line(capsys, tmp_path, stop_signals_kept):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)))
    rc = train.main(["--config", str(binary), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and f"hpcgraft: error: config file '{binary}' is not a text (UTF-8) file" in err, err
    assert "Traceback" not in err


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
@pytest.mark.parametrize("kind", ["existing-file", "read-only"])
def test_an_unusable_out_is_refused_before_the_data_is_loaded(capsys, tmp_path, stop_signals_kept, monkeypatch, kind):
    import hpcgraft.training.peer as peer_module

    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("the data was loaded before --out was checked")

    monkeypatch.setattr(peer_module, "build_datasets", never)
    out = tmp_path / "file"
    if kind == "existing-file":
        out.write_text("x")
        message = f"--out {out} is an existing file, not a directory"
    else:
        out = Path("/sys/hpcgraft-test-run")  # sysfs: no directory can be made there, whoever runs the test
        message = f"--out {out} cannot be written"
    rc = train.main(["--config", str(ROOT / "configs/digits.yaml"), "--out", str(out), "graft.mode=none"])
    err = capsys.readouterr().err
    assert rc == 2 and f"hpcgraft: error: {message}" in err, err
    assert "Traceback" not in err


def test_overrides_may_follow_out(capsys, tmp_path):
    """Parsed as a run parses them; the resolved config shown by --print-config, which trains nothing."""
    rc = train.main(["--config", str(ROOT / "configs/digits.yaml"), "train.epochs=1", "--out", str(tmp_path / "run"),
                     "graft.mode=none", "log.progress=off", "--print-config"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (tmp_path / "resolved.yaml").write_text(out)
    saved = load_config(tmp_path / "resolved.yaml")
    assert (saved.train.epochs, saved.graft.mode) == (1, "none")


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
def test_a_foreign_directory_is_neither_cleared_nor_resumed(capsys, tmp_path, stop_signals_kept):
    """Another project's run: --restart must not delete its checkpoints, resume must not read its logs."""
    out = tmp_path / "run"
    (out / "checkpoints" / "resnet_best").mkdir(parents=True)
    (out / "checkpoints" / "resnet_best" / "model.pth").write_bytes(b"weights")
    (out / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    for restart in ([], ["--restart"]):
        rc = train.main(["--config", str(ROOT / "configs/digits.yaml"), *restart, "--out", str(out), "graft.mode=none"])
        err = capsys.readouterr().err
        assert rc == 2 and f"hpcgraft: error: --out {out} is not an hpcgraft run directory" in err, err
    assert (out / "checkpoints" / "resnet_best" / "model.pth").read_bytes() == b"weights"
    assert (out / "metrics.jsonl").read_text() == '{"loss": 1.0}\n'


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
def test_a_garbage_saved_config_is_one_line(capsys, tmp_path, stop_signals_kept):
    """In a directory hpcgraft marked as its own: damage, not another tool's file."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".hpcgraft-run").touch()
    (out / "config.yaml").write_bytes(b"\x00\xff garbage: [")
    rc, errors, err = run_main(capsys, tmp_path, "graft.mode=none")
    assert rc == 2 and len(errors) == 1 and f"the config of the run in {out} (config.yaml) is damaged" in errors[0], err


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
def test_resume_without_config_yaml_checks_the_checkpoints_config_and_drops_a_torn_log_line(
        capsys, tmp_path, stop_signals_kept, monkeypatch):
    """run.h5 holds the config when config.yaml is gone, and a torn last metrics line is dropped."""
    out = tmp_path / "run"
    monkeypatch.setenv("HPCGRAFT_INJECT", "0:25:usr1")  # a stop in epoch 2, after epoch 1's checkpoint
    rc, _, err = run_main(capsys, tmp_path, "graft.mode=none", "train.epochs=2")
    assert rc == 75, err
    monkeypatch.delenv("HPCGRAFT_INJECT")
    failure._stop_signal = None  # this process is the next "job" too (stop_signals_kept resets it after)
    (out / "config.yaml").unlink()
    rc, errors, err = run_main(capsys, tmp_path, "graft.mode=none", "train.epochs=2", "train.lr=0.05")
    assert rc == 2 and len(errors) == 1, err
    assert f"{out} holds a run with train.lr=0.1 (in step-" in errors[0], err
    assert "run.h5; its config.yaml is gone" in errors[0], err
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "pe')
    rc, errors, err = run_main(capsys, tmp_path, "graft.mode=none", "train.epochs=2")
    assert rc == 0 and not errors, err
    assert f"{out / 'metrics.jsonl'} ended in a torn line" in err
    rows = [(r["epoch"], r["peer"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert rows == [(1, 0), (1, None), (2, 0), (2, None)]


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
def test_a_full_disk_is_one_line_naming_the_directory_and_the_space(capsys, tmp_path, stop_signals_kept, monkeypatch):
    """A checkpoint larger than the free space ends the run with exit 1 and one line that states the
    space before the write and the space needed, before anything is written (the disk is made "full" where
    free space is read; tests/e2e/test_disk_full.py fills a real one)."""
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10 * 2**20, 10 * 2**20 - 4096, 4096))
    rc, errors, err = run_main(capsys, tmp_path, "graft.mode=none")
    out = tmp_path / "run"
    assert rc == 1 and len(errors) == 1, err
    assert errors[0].startswith(f"hpcgraft: error: no space left in {out} for the checkpoint at step 22: 4.1 kB "
                                "free before the write, the checkpoint needs "), err
    assert "Traceback" not in err
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
    assert not list((out / "checkpoints").glob("*"))


def _rewrite_with_crc(ckpt: Path, name: str, edit: Callable[[h5py.File], None]) -> None:
    """Change a checkpoint file and regenerate its manifest entry, as a buggy tool would: the CRC passes."""
    from hpcgraft.storage.atomic import crc_of

    with h5py.File(ckpt / name, "r+") as f:
        edit(f)
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    size, crc = crc_of(ckpt / name)
    manifest["files"][name].update(size=size, crc32=f"{crc:08x}")
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))


def _wrong_shape(f: h5py.File) -> None:
    name = "model/conv1.weight" if "model/conv1.weight" in f else next(
        f"model/{k}" for k in f["model"] if isinstance(f["model"][k], h5py.Dataset))
    attrs = dict(f[name].attrs)
    del f[name]
    f.create_dataset(name, data=np.zeros((3, 3), dtype=np.float32))
    f[name].attrs.update(attrs)


def _far_progress(f: h5py.File) -> None:
    epoch = f["progress"]["epoch"] if isinstance(f["progress"], h5py.Group) and "epoch" in f["progress"] else None
    if isinstance(epoch, h5py.Dataset):
        epoch[()] = 1000
    else:
        f["progress"].attrs["epoch"] = 1000


@pytest.mark.process  # the training command's main in this process: a world of one MPI rank
@pytest.mark.parametrize("tamper", [_wrong_shape, _far_progress], ids=["wrong-shape", "progress-epoch-1000"])
def test_a_checkpoint_that_does_not_fit_is_passed_over_like_a_damaged_one(
        capsys, tmp_path, stop_signals_kept, monkeypatch, tamper):
    """CRCs regenerated over a wrong dataset (they prove only that files are as written); the run falls back to
    the previous checkpoint."""
    out = tmp_path / "run"
    monkeypatch.setenv("HPCGRAFT_INJECT", "0:25:usr1")
    rc, _, err = run_main(capsys, tmp_path, "graft.mode=none", "train.epochs=2")
    assert rc == 75, err
    monkeypatch.delenv("HPCGRAFT_INJECT")
    failure._stop_signal = None
    newest, older = sorted((out / "checkpoints").glob("step-*"), reverse=True)[:2]
    _rewrite_with_crc(newest, "peer-000.h5", tamper)
    rc, errors, err = run_main(capsys, tmp_path, "graft.mode=none", "train.epochs=2")
    assert rc == 0 and not errors, err
    assert f"hpcgraft: checkpoint {newest.name} does not fit this run (rank 0: " in err, err
    assert f"; falling back to {older.name}" in err and f"resuming {out} from {older.name}" in err, err


@pytest.mark.process  # the task runs the training rank in a process of its own
def test_a_submitit_task_is_a_training_rank_with_its_exit_status(tmp_path, capsys):
    """A submitit task started by srun runs the training rank in its own process, as `python -m
    hpcgraft.train` does: bad input is the same one line, and the task fails on its status 2."""
    from hpcgraft.launch import GraftRun

    task = GraftRun(str(ROOT / "configs/digits.yaml"), str(tmp_path / "run"), ["train.lrr=1"])
    with pytest.raises(RuntimeError, match="exited with status 2"):
        task()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hpcgraft: error:")]
    assert len(lines) == 1 and "unknown config key 'train.lrr'" in lines[0], lines
