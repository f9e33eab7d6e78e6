"""User errors decided before any MPI work, checked in process: the same validation functions the ranks
run, and the training command's own ``main`` in this process (a world of one rank). One real
end-to-end exit-2 check through mpirun stays in tests/e2e/test_train.py."""

from __future__ import annotations

import sys

import pytest

from hpcgraft import train
from hpcgraft.config import load_config
from hpcgraft.dist.replicas import require_horovod
from hpcgraft.dist.world import agreed, check_peers_agree, init_world
from hpcgraft.errors import ConfigError, LayoutError, PeerMismatchError, SetupError
from hpcgraft.training.peer import check_peer_count
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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ((), "grafting between peers needs at least 2 peers but this run has 1; start it with mpirun -np K (K >= 2) "
             "or set graft.mode=none"),
        (("graft.mode=none", "cultivate.lambda=1"),
         "cultivation (cultivate.lambda=1) distils between peers and needs at least 2 but this run has 1; start "
         "it with mpirun -np K (K >= 2) or set cultivate.lambda=0"),
        (("trian.epochs=1",), "unknown config key 'trian.epochs'; did you mean 'train.epochs'?"),
        (("graft.a=2",), "graft.a=2.0 is outside [0, 1]"),
        (("graft.mode=none", "data.name=cifar10"), "data.name=cifar10 needs data.root"),
        (("graft.mode=none", "model.name=resnet33"), "unknown model 'resnet33' (model.name); did you mean"),
    ],
    ids=["grafting-alone", "cultivation-alone", "unknown-key", "bad-value", "missing-data", "unknown-model"],
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


def test_layout_errors_name_the_rank_count_to_start():
    with pytest.raises(LayoutError, match=r"^3 ranks cannot form peers of dist\.replicas=2 ranks each; start a "
                                          r"multiple of 2 ranks \(mpirun -np 4\) or change dist\.replicas$"):
        init_world(2, FakeComm(size=3))
    cfg = load_config(None, ["dist.replicas=2"])
    with pytest.raises(ConfigError, match=r"^grafting between peers needs at least 2 peers but this run has 1; start "
                                          r"it with mpirun -np K \(K >= 2 peers x dist\.replicas=2\) or set "
                                          r"graft\.mode=none$"):
        check_peer_count(cfg, peers=1, replicas=2)


def test_missing_horovod_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod", None)
    monkeypatch.delitem(sys.modules, "horovod.torch", raising=False)
    with pytest.raises(ConfigError) as info:
        require_horovod(load_config(None, ["dist.replicas=2"]).dist)
    message = str(info.value)
    assert "dist.replicas=2 needs Horovod, but 'import horovod.torch' failed" in message
    assert "install it with bash tools/build_horovod.sh .venv" in message and "dist.replicas=1" in message
