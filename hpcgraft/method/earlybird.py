"""Early-bird tickets: BatchNorm channel masks, their distances and the early-bird detectors.

Two views of when a network's pruning mask stops changing during training:

- the channel mask of You et al. (ICLR 2020, GATECH-EIC/Early-Bird-Tickets): rank |gamma| of every
  BatchNorm2d globally and prune the smallest fraction; an early bird is found once the newest mask is
  close to each of the previous few;
- the spline view (You, Balestriero et al., TMLR 2022, GATECH-EIC/Spline-EB): the sign patterns of the
  BatchNorm outputs over a fixed 2-D grid of inputs (the max-affine spline partition the network draws
  there); an early bird once the partition stops moving.

Pure torch on modules and tensors: the monitors in ``hpcgraft.training`` call these per epoch and the
``bn`` pruning criterion uses :func:`bn_channel_masks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpcgraft.errors import NoBatchNormError


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BatchNorm2d modules that carry a gamma, in module order (the order the masks concatenate in).

    Raises NoBatchNormError when there is none: every mask here is defined by those layers.
    """
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.BatchNorm2d) and m.weight is not None]
    if not found:
        raise NoBatchNormError(
            f"model {type(model).__name__} has no BatchNorm2d layer with a weight (gamma): the bn channel "
            "masks and the early-bird monitors rank BatchNorm gammas; use a model with BatchNorm2d "
            "(every registered model has them) or another criterion / prune.monitor=off")
    return found


def pruned_count(total: int, ratio: float) -> int:
    """How many of ``total`` channels ratio p prunes: floor(total * p), as the reference's int(total * p).

    The 1e-9 keeps a ratio written as a difference (1 - 0.9 = 0.0999...) from losing a whole channel.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"pruning ratio must lie in [0, 1], got {ratio}")
    return min(total, math.floor(total * ratio + 1e-9))


def bn_channel_masks(model: nn.Module, ratio: float) -> dict[str, torch.Tensor]:
    """BatchNorm2d name -> bool mask over its channels (True = kept), from one global ranking of |gamma|.

    Exactly ``pruned_count(n, ratio)`` of the n channels are pruned: the smallest |gamma|, ties broken by
    position (earlier layer, then lower channel index, is pruned first), so the count never depends on
    ties. The reference (threshold = sorted(v)[int(n p)], keep v > threshold) prunes int(n p) + 1
    channels when all |gamma| differ and every channel equal to the threshold at ties; we keep the
    requested fraction exactly instead, which the pruning command needs and which makes the mask of a
    network with many equal gammas (a fresh BatchNorm: all ones) well defined.
    """
    layers = batchnorm_layers(model)
    values = torch.cat([m.weight.detach().abs().flatten().float().cpu() for _, m in layers])
    pruned = pruned_count(values.numel(), ratio)
    order = torch.sort(values, stable=True).indices
    keep = torch.ones(values.numel(), dtype=torch.bool)
    keep[order[:pruned]] = False
    masks, start = {}, 0
    for name, m in layers:
        n = m.weight.numel()
        masks[name] = keep[start:start + n].to(m.weight.device)
        start += n
    return masks


def flat_mask(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-layer masks as one bool vector on the CPU, in their (module) order."""
    return torch.cat([m.flatten().bool().cpu() for m in masks.values()])


def mask_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised Hamming distance 1 - mean(a == b) between two masks of the same channels."""
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.bool() != b.bool()).sum()) / max(1, a.numel())


def add_bn_l1_subgradient(model: nn.Module, s: float) -> None:
    """grad += s sign(gamma) on every BatchNorm2d: the subgradient of s * sum |gamma| (network slimming),
    which the reference adds after backward and before the optimizer step to push gammas apart."""
    if s == 0:
        return
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.weight is not None and m.weight.grad is not None:
                m.weight.grad.add_(torch.sign(m.weight), alpha=s)


# ------------------------------------------------------------------------------------------ detectors
class EarlyBirdDetector:
    """A window of the newest masks (or sign patterns) and the rule that finds an early bird in it.

    A window is ``window`` items, the newest included; once it is full, the newest is compared with each
    older one and the epoch is an early bird when the largest distance is within ``threshold``
    (``<=``: the bn reference fails only on a distance ``> 0.1``) or below it (``strict``: the spline
    reference's ``maxi < 0.16``). The first such epoch is the early-bird epoch; later epochs keep being
    measured (the flag says whether the rule holds at that epoch) but never move it.
    """

    def __init__(self, window: int, threshold: float, distance: Callable[[Any, Any], float],
                 strict: bool = False) -> None:
        if window < 2:
            raise ValueError(f"an early-bird window needs at least 2 items, got {window}")
        self.window, self.threshold, self.distance, self.strict = window, threshold, distance, strict
        self.items: list[Any] = []
        self.epochs: list[int] = []
        self.eb_epoch: int | None = None

    def update(self, item: Any, epoch: int) -> dict[str, Any]:
        """Add the item of ``epoch``; returns the distance to the previous item (None for the first), the
        largest distance over the full window (None until full), the flag and the early-bird epoch."""
        dist_prev = self.distance(item, self.items[-1]) if self.items else None
        dist_max, flag = None, False
        if len(self.items) == self.window - 1:
            dist_max = max(self.distance(item, old) for old in self.items)
            flag = dist_max < self.threshold if self.strict else dist_max <= self.threshold
            if flag and self.eb_epoch is None:
                self.eb_epoch = epoch
        # Only the window - 1 newest are ever compared again: what memory and checkpoints hold.
        self.items.append(item)
        self.epochs.append(epoch)
        del self.items[:-(self.window - 1)], self.epochs[:-(self.window - 1)]
        return {"dist_prev": dist_prev, "dist_max": dist_max, "flag": flag, "eb_epoch": self.eb_epoch}


def bn_detector(window: int = 5, threshold: float = 0.1) -> EarlyBirdDetector:
    """The Early-Bird-Tickets rule: the last 5 masks, newest within 0.1 of each of the 4 older."""
    return EarlyBirdDetector(window, threshold, mask_distance)


def spline_detector(lookback: int = 3, threshold: float = 0.16) -> EarlyBirdDetector:
    """The Spline-EB rule: largest distance to the previous 3 epochs' sign patterns below 0.16."""
    return EarlyBirdDetector(lookback + 1, threshold, pattern_distance, strict=True)


# ------------------------------------------------------------------------------------------ spline view
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


@dataclass
class SignPatterns:
    """The sign pattern of one BN layer's outputs over the grid: one row of packed bits per grid point
    (1 bit per output element instead of the reference's stored float activations; the pad bits of a
    row are 0 in every pattern, so they never count as a difference)."""

    bits: torch.Tensor  # uint8 [grid points, ceil(features / 8)]
    features: int  # output elements per grid point (C x H x W)


def pack_signs(out: torch.Tensor) -> torch.Tensor:
    """(out > 0) per sample, packed 8 to a byte, most significant bit first, as uint8 [B, ceil(F / 8)]."""
    bits = (out.detach().flatten(1) > 0).cpu()
    pad = -bits.shape[1] % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(bits.shape[0], pad)], dim=1)
    return (bits.view(bits.shape[0], -1, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8)


def bits_differing(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 22) -> int:
    """Popcount of a XOR b over two packed uint8 tensors, in chunks (bounded memory for CIFAR patterns)."""
    a, b = a.flatten(), b.flatten()
    return sum(int(_POPCOUNT[(a[i:i + chunk] ^ b[i:i + chunk]).long()].sum()) for i in range(0, a.numel(), chunk))


def pattern_distance(a: dict[str, SignPatterns], b: dict[str, SignPatterns]) -> float:
    """Spline-EB's distance: per BN layer the mean |b_t - b_s| over grid points and output elements, then
    the mean over layers."""
    if a.keys() != b.keys():
        raise ValueError(f"sign patterns of different layers: {sorted(a.keys() ^ b.keys())[:3]}")
    per_layer = [bits_differing(a[k].bits, b[k].bits) / max(1, a[k].bits.shape[0] * a[k].features) for k in a]
    return sum(per_layer) / max(1, len(per_layer))


def grid_inputs(img0: torch.Tensor, img1: torch.Tensor, n: int, start: int, stop: int) -> torch.Tensor:
    """Grid points start..stop-1 of x = a img0 + b img1 on an n x n grid of (a, b) in [0, 1]^2, in the
    reference's order (point k: a = linspace[k % n], b = linspace[k // n], numpy's meshgrid flattened)."""
    lin = torch.linspace(0, 1, n, dtype=torch.float64)
    k = torch.arange(start, stop)
    a = lin[k % n].to(img0.device, img0.dtype).view(-1, *([1] * img0.dim()))
    b = lin[k // n].to(img0.device, img0.dtype).view(-1, *([1] * img0.dim()))
    return a * img0.unsqueeze(0) + b * img1.unsqueeze(0)


@torch.no_grad()
def sign_patterns(model: nn.Module, img0: torch.Tensor, img1: torch.Tensor, n: int = 100,
                  chunk: int = 500) -> dict[str, SignPatterns]:
    """Sign patterns of every BatchNorm (1d and 2d, as the reference hooks) output over the n x n grid,
    model in eval mode (running statistics), ``chunk`` grid points per forward pass. The model's
    train/eval mode is restored."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    if not layers:
        batchnorm_layers(model)  # raises the one-line error
    rows: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    features: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
            features[name] = out[0].numel()
            rows[name].append(pack_signs(out))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n * n, chunk):
            model(grid_inputs(img0, img1, n, start, min(n * n, start + chunk)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {name: SignPatterns(torch.cat(rows[name]), features[name]) for name, _ in layers if rows[name]}
