"""The batch loader's order, pinned: the batches every epoch yields (indices and augmentation draws) are the ones
the loader gave when it still built its DataLoader once per epoch, with and without worker processes, across a
resume mid-epoch and after an epoch that was left early; and the workers live for the whole run."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import pytest
import torch

from hpcgraft.data import BatchLoader

# sha256 (first 16 hex digits) of the batches below, recorded from the loader that built a DataLoader per epoch
EPOCHS = ["4c3efeb29cbd0ebb", "95d4e7ab61551f10", "6fa879faceed7a61"]  # epochs 0, 1, 2 of one peer
RESUMED = "2bd45d23f2eef135"  # epoch 1 from batch 5 on
REPLICA = ["dd9ec83dc37b55fa", "68ee789f01c2ebb5"]  # epochs 0, 1 of replica 1 of 2
TEST = "7f7274db34c098c4"  # the evaluation order of replica 1 of 2


class Probe:
    """A data set that returns what the loader asked of it: the indices, and three draws of the batch's
    augmentation generator (zeros without one)."""

    num_classes = 10

    def __len__(self) -> int:
        return 1000

    def get_batch(self, indices: torch.Tensor, augment: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        draws = torch.zeros(3, dtype=torch.int64) if augment is None else torch.randint(0, 2**62, (3,),
                                                                                         generator=augment)
        return indices.clone(), draws


class Pids(Probe):
    """Which process built each batch."""

    def get_batch(self, indices: torch.Tensor, augment: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return indices.clone(), torch.tensor([os.getpid()])


def digest(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for x, y in batches:
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


def train(workers: int, **kw: int) -> BatchLoader:
    return BatchLoader(Probe(), 64, shuffle=True, seed=7, stream=1, augment=True, workers=workers, **kw)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.process)])  # 2: worker processes
def test_every_epoch_yields_the_recorded_batches(workers):
    loader = train(workers)
    assert [digest(loader.epoch(e)) for e in range(3)] == EPOCHS
    replica = train(workers, replica=1, replicas=2)
    assert [digest(replica.epoch(e)) for e in range(2)] == REPLICA
    test = BatchLoader(Probe(), 100, shuffle=False, replica=1, replicas=2, workers=workers)
    assert digest(test.epoch(0)) == TEST


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.process)])  # 2: worker processes
def test_a_resumed_run_and_an_epoch_left_early_keep_the_order(workers):
    resumed = train(workers)  # a restarted job: a new loader, mid-epoch 1
    assert digest(resumed.epoch(1, start=5)) == RESUMED
    assert digest(resumed.epoch(2)) == EPOCHS[2]
    loader = train(workers)
    for i, _ in enumerate(loader.epoch(0)):  # precise BN replays only the first batches of an epoch
        if i == 2:
            break
    assert digest(loader.epoch(1)) == EPOCHS[1]
    assert digest(loader.epoch(1, start=5)) == RESUMED


@pytest.mark.process  # DataLoader worker processes
def test_the_workers_are_started_once_per_run():
    loader = BatchLoader(Pids(), 100, shuffle=True, augment=False, workers=2)
    seen = [{int(y) for _, y in loader.epoch(e)} for e in range(3)]
    assert len(seen[0]) == 2 and os.getpid() not in seen[0]
    assert seen[1] == seen[0] and seen[2] == seen[0]
