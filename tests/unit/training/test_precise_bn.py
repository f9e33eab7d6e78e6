"""train.precise_bn: BatchNorm statistics recomputed from the current weights before evaluation."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from hpcgraft.config import Config
from hpcgraft.training.loop import recompute_bn_statistics


class Batches:
    """The epoch's batches, as the loader replays them (a pure function of the epoch)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.asked: list[int] = []

    def epoch(self, epoch: int, start: int = 0):
        self.asked.append(epoch)
        return ((x, torch.zeros(len(x), dtype=torch.int64)) for x in self.batches[start:])


class NoReplicas:
    def __init__(self) -> None:
        self.synced = 0

    def sync_buffers(self, model, step, again=False):
        assert again  # the epoch's own sync happened before the statistics were recomputed
        self.synced += 1

    def check_synced(self, model, optimizer, what):
        pass


def fake_peer(model: nn.Module, batches: list[torch.Tensor]) -> SimpleNamespace:
    return SimpleNamespace(model=model, train_loader=Batches(batches), progress=SimpleNamespace(epoch=3, step=66),
                           cfg=Config(), device=torch.device("cpu"), replicas=NoReplicas(), optimizer=None)


def test_statistics_are_the_mean_over_the_batches_of_the_current_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.BatchNorm2d(3, momentum=0.1))
    batches = [torch.randn(5, 2, 4, 4) * (i + 1) for i in range(4)]
    peer = fake_peer(model, batches)
    model[1].running_mean.fill_(7.0)  # stale statistics of weights that no longer exist
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}

    recompute_bn_statistics(peer, batches=3)

    with torch.no_grad():
        outs = [conv(x) for x in batches[:3]]  # the fourth batch is left out: batches=3
    mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert model[1].momentum == 0.1  # restored
    assert peer.train_loader.asked == [2]  # the epoch just trained (progress.epoch counts it already)
    assert peer.replicas.synced == 1  # a peer's replicas then agree on them
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Linear(3, 2))
    peer = fake_peer(model, [torch.randn(4, 3)])
    recompute_bn_statistics(peer, batches=1)
    assert peer.train_loader.asked == [] and peer.replicas.synced == 0
