"""Early-bird monitors during training (``prune.monitor``), and the BN L1 penalty (``prune.bn_l1``).

At every epoch end, on the weights just evaluated (before the graft, like the epoch's ``test_acc``), each
peer takes its pruning mask (``bn``: the BatchNorm-gamma channel mask; ``spline``: the sign patterns of the
BatchNorm outputs over a grid of two test images), feeds it to its early-bird detector and reports the
distances in its metrics row; rank 0 also gets every peer's mask and reports the distances between peers.
The detector's window is part of the peer's checkpoint, so a resumed run finds the same early-bird epoch.
The math lives in :mod:`hpcgraft.method.earlybird`.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcgraft.comm.failure import Watchdog
from hpcgraft.comm.world import World, gather_peers
from hpcgraft.config import Config
from hpcgraft.data import ImageSet
from hpcgraft.errors import ConfigError
from hpcgraft.method import earlybird as eb


class EarlyBirdMonitor:
    """One peer's monitor: how it measures a mask, and the detector holding the last masks."""

    def __init__(self, cfg: Config, model: nn.Module, images: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        p = cfg.prune
        self.kind, self.ratio, self.grid, self.images = p.monitor, p.ratio, p.spline_grid, images
        self.chunk = cfg.data.test_batch_size
        eb.batchnorm_layers(model)  # a model without BatchNorm2d: one line before training starts
        self.detector = (eb.bn_detector(p.window, p.threshold) if self.kind == "bn"
                         else eb.spline_detector(p.spline_lookback, p.spline_threshold))

    def measure(self, model: nn.Module) -> Any:
        """The mask of the weights as they are now: a flat bool tensor (bn) or the sign patterns (spline)."""
        if self.kind == "bn":
            return eb.flat_mask(eb.bn_channel_masks(model, self.ratio))
        assert self.images is not None
        return eb.sign_patterns(model, *self.images, n=self.grid, chunk=self.chunk)

    def distance(self, a: Any, b: Any) -> float:
        return self.detector.distance(a, b)

    # -------------------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The detector's window as tensors: bn masks as uint8 [items, channels]; spline patterns as packed
        uint8 bits per item and layer (what a checkpoint can hold without pickle)."""
        d = self.detector
        state: dict[str, Any] = {"kind": self.kind, "epochs": list(d.epochs), "eb_epoch": d.eb_epoch}
        if self.kind == "bn":
            state["masks"] = (torch.stack(d.items).to(torch.uint8) if d.items else torch.zeros(0, 0, dtype=torch.uint8))
        else:
            state["patterns"] = {i: {name: p.bits for name, p in item.items()} for i, item in enumerate(d.items)}
            state["features"] = {name: p.features for name, p in d.items[0].items()} if d.items else {}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        d = self.detector
        d.epochs = [int(e) for e in state["epochs"]]
        d.eb_epoch = None if state["eb_epoch"] is None else int(state["eb_epoch"])
        if self.kind == "bn":
            d.items = [m.bool() for m in state["masks"]][: len(d.epochs)]
        else:
            features = state["features"]
            d.items = [{name: eb.SignPatterns(bits, int(features[name])) for name, bits in state["patterns"][i].items()}
                       for i in range(len(d.epochs))]


def spline_images(test_set: ImageSet, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two fixed test images of the spline grid: the first test image and the first after it of
    another class (the reference takes image 4690 of the CIFAR test set and the first of class 1)."""
    x0, y0 = test_set.get_batch(torch.zeros(1, dtype=torch.int64), None)
    for start in range(1, len(test_set), 256):
        idx = torch.arange(start, min(len(test_set), start + 256))
        x, y = test_set.get_batch(idx, None)
        other = (y.cpu() != y0.cpu()[0]).nonzero()
        if len(other):
            return x0[0].to(device), x[int(other[0])].to(device)
    raise ConfigError("the spline monitor needs two test images of different classes; "
                      "use a test set with at least two classes or prune.monitor=bn")


def build_monitor(cfg: Config, model: nn.Module, test_set: ImageSet, device: torch.device) -> EarlyBirdMonitor | None:
    """The peer's monitor for ``prune.monitor`` (None when off); raises the one-line error of a model
    without BatchNorm2d."""
    if cfg.prune.monitor == "off":
        return None
    images = spline_images(test_set, device) if cfg.prune.monitor == "spline" else None
    return EarlyBirdMonitor(cfg, model, images)


def monitor_epoch(monitors: list[EarlyBirdMonitor | None], models: list[nn.Module], epoch: int, world: World,
                  watchdog: Watchdog, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """COLLECTIVE over the peer leads. Adds each hosted peer's early-bird fields to its metrics row (``rows``,
    one per hosted peer, as ``monitors`` and ``models``) and returns the fields of the epoch's ``peer: null``
    row (the distances between peers, on rank 0; {} elsewhere). Takes the peers' parts, not the peers: the
    peer builds its monitor here, so this module never imports it."""
    if monitors[0] is None:
        return {}
    masks = []
    for monitor, model, row in zip(monitors, models, rows, strict=True):
        assert monitor is not None
        mask = monitor.measure(model)
        found = monitor.detector.update(mask, epoch)
        row.update({"eb_monitor": monitor.kind, "eb_dist_prev": found["dist_prev"], "eb_dist_max": found["dist_max"],
                    "eb_flag": found["flag"], "eb_epoch": found["eb_epoch"]})
        masks.append(mask)
    with watchdog.guard("early-bird monitor: gather of the peers' masks"):
        everyone = gather_peers(world, masks)
    if not everyone:
        return {}
    k = len(everyone)
    dist = np.zeros((k, k))
    for i, j in itertools.combinations(range(k), 2):
        dist[i, j] = dist[j, i] = monitors[0].distance(everyone[i], everyone[j])
    pairs = [dist[i, j] for i, j in itertools.combinations(range(k), 2)]
    return {"eb_peer_dist": dist.tolist(), "eb_peer_dist_mean": float(np.mean(pairs)) if pairs else None}


def bn_l1_step(model: nn.Module, cfg: Config) -> None:
    """``prune.bn_l1=s``: grad += s sign(gamma) on every BatchNorm2d, between backward and the optimizer
    step, as the reference's ``--sr`` training does."""
    eb.add_bn_l1_subgradient(model, cfg.prune.bn_l1)
