"""A checkpoint on a full file system: refused before a byte is written when the space is known to be short,
and a plain failed write (no HDF5 handle left behind) when the space runs out during the write."""

from __future__ import annotations

import pytest
import torch

from hpcgraft.storage import checkpoints
from hpcgraft.storage.checkpoints import CheckpointManager, CheckpointSpaceError, resolve
from tests._tmpfs import tmpfs
from tests.fakes import SoloComm


def _tree(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 1024, generator=g)}}  # 256 KiB


@pytest.mark.process  # mounts a real tmpfs that fills up
def test_space_running_out_during_the_write_fails_cleanly_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                       capfd):
    with tmpfs(tmp_path / "fs", "400k") as fs:
        mgr = CheckpointManager(fs / "run", SoloComm(), peer=0, peers=1, writer=True, keep=2)
        (fs / "run").mkdir()
        mgr.save(1, 1, _tree(1), {"config": "x"})
        # the free space is not known in advance (as on a file system whose quota df does not show)
        monkeypatch.setattr(checkpoints, "_free_bytes", lambda path: None)
        with pytest.raises(CheckpointSpaceError) as info:
            mgr.save(2, 2, _tree(2), {"config": "x"})
        assert "it ran out during the write" in str(info.value)
        assert "an unknown amount free before the write" in str(info.value)
        assert sorted(p.name for p in (fs / "run" / "checkpoints").iterdir()) == ["step-000000001"]
        assert resolve(fs / "run").step == 1  # intact: every file verifies against its manifest
        monkeypatch.undo()
        with pytest.raises(CheckpointSpaceError, match=r"kB free before the write, the checkpoint needs 2\d\d\.\d kB "
                                                       r"\(2 files\)"):
            mgr.save(2, 2, _tree(2), {"config": "x"})
        assert sorted(p.name for p in (fs / "run" / "checkpoints").iterdir()) == ["step-000000001"]
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "HDF5" not in err, err
