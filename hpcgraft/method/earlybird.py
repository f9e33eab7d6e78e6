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
