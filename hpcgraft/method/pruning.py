"""Pruning masks by six criteria, and a mask that keeps pruned weights at exactly zero while fine-tuning.

Two kinds of criteria, and what ``keep`` counts in each (always exactly ceil(keep x N) units kept,
:func:`hpcgraft.method.lean.kept_count`, so 0.5 of 75 keeps 38 and any keep > 0 keeps at least one):

- kernel criteria ``lean``, ``indiv_l1``, ``indiv_sv`` (:mod:`hpcgraft.method.lean`): the unit is a 2-D
  kernel W[o, i] of a conv, N = every conv kernel of the network (the classifier is left out);
- channel criteria ``l1``, ``entropy``: the unit is a filter (one output channel of a conv, all its
  kernels), N = the filters of every conv layer, ranked globally: the smallest l1 norms (the papers'
  "invalid filters", :func:`hpcgraft.method.grafting.filter_l1_norms`) or the lowest histogram entropies
  (10 bins, :func:`hpcgraft.method.grafting.filter_entropies`, as grafting measures them) are pruned;
- ``bn``: the unit is a BatchNorm2d channel, N = the channels of every BatchNorm2d, the smallest |gamma|
  pruned globally (:func:`hpcgraft.method.earlybird.bn_channel_masks` at ratio (N - kept) / N).

A pruned channel is structural: the conv filter that produces it and the gamma and beta of its
BatchNorm are zero, so the channel's output is exactly zero in training and in evaluation. A kernel
criterion that prunes every kernel of a filter has pruned that channel too, and zeroes its BatchNorm
(otherwise beta would feed the next layers a constant). The BatchNorm of a conv is the BatchNorm2d that
follows it directly in module order with as many channels (every registered model is conv -> BN).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hpcgraft.errors import UserError
from hpcgraft.method import earlybird, lean
from hpcgraft.method.channelgraph import read_graph
from hpcgraft.method.grafting import filter_entropies, filter_l1_norms
from hpcgraft.method.redundancy import remove_redundant
from hpcgraft.models.dgconv import DGConv2d

CHANNEL_CRITERIA = ("l1", "entropy", "bn")
CRITERIA = ("l1", "entropy", *lean.KERNEL_CRITERIA, "bn")
RESULTS_FILE = "prune.json"  # what hpcgraft.prune writes into its --out; hpcgraft.report plots it
# A DGConv layer is a conv whose kernels are masked by its learned groups: its filters are pruned like any
# conv's, and the BatchNorm after it is its BatchNorm.
CONVS = (nn.Conv2d, DGConv2d)
UNITS = {"l1": "filters", "entropy": "filters", "bn": "BatchNorm channels",
         **{c: "kernels" for c in lean.KERNEL_CRITERIA}}


class PruneError(UserError, ValueError):
    """A pruning request that cannot be served (criterion, keep fraction): one line."""


def check_request(criterion: str, keep: float) -> None:
    if criterion not in CRITERIA:
        raise PruneError(f"unknown pruning criterion {criterion!r}; use one of: {', '.join(CRITERIA)}")
    if isinstance(keep, bool) or not 0 < keep <= 1:
        raise PruneError(f"keep fraction {keep!r} must lie in (0, 1] (0.5 keeps half the {UNITS[criterion]})")


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """Conv module name -> the BatchNorm2d module that normalises its output (see the module docstring)."""
    pairs, last = {}, None
    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue  # containers: only leaves follow one another
        if isinstance(m, nn.BatchNorm2d) and last is not None and last[1].out_channels == m.num_features:
            pairs[last[0]] = name
        last = (name, m) if isinstance(m, CONVS) else None
    return pairs


def _param(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def convs(model: nn.Module) -> dict[str, nn.Conv2d | DGConv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CONVS)}


@dataclass
class Mask:
    """Bool masks by parameter name (True = kept): [out, in/groups] for a conv weight (one per kernel),
    [channels] for a conv bias or a BatchNorm's weight and bias. Saved beside the pruned weights."""

    criterion: str
    keep: float
    masks: dict[str, torch.Tensor]
    unit: str
    kept: int  # units kept by the criterion, of
    total: int
    # Conv kernels W[o, i]: kept by the criterion, kept after removing the redundant ones, of the network's.
    kernels_by_criterion: int = 0
    kernels: int = 0
    kernels_total: int = 0

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every pruned weight. Called once, then after every optimizer step of a fine-tune (momentum
        and weight decay would otherwise move them): pruned weights stay exactly zero."""
        for name, p in model.named_parameters():
            m = self.masks.get(name)
            if m is not None:
                p.mul_(m.to(p.device, p.dtype).reshape(*m.shape, *([1] * (p.dim() - m.dim()))))

    def channels(self) -> dict[str, torch.Tensor]:
        """Conv weight name -> bool [out] of its filters that still have a kept kernel."""
        return {k: m.any(1) for k, m in self.masks.items() if m.dim() == 2}

    def state_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "keep": self.keep, "unit": self.unit, "kept": self.kept,
                "total": self.total, "kernels_by_criterion": self.kernels_by_criterion, "kernels": self.kernels,
                "kernels_total": self.kernels_total, "masks": dict(self.masks)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Mask:
        return cls(str(state["criterion"]), float(state["keep"]), {k: v.bool() for k, v in state["masks"].items()},
                   str(state["unit"]), int(state["kept"]), int(state["total"]),
                   *(int(state.get(k, 0)) for k in ("kernels_by_criterion", "kernels", "kernels_total")))


def _ranked_filters(scores: dict[str, torch.Tensor], keep: float) -> tuple[dict[str, torch.Tensor], int, int]:
    """Keep the ceil(keep N) highest scores over all layers (ties: the later position is kept)."""
    flat = torch.cat([s.flatten().float().cpu() for s in scores.values()])
    kept = lean.kept_count(keep, flat.numel())
    order = torch.sort(flat, stable=True).indices
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    mask[order[:flat.numel() - kept]] = False
    out, start = {}, 0
    for k, s in scores.items():
        out[k] = mask[start:start + s.numel()]
        start += s.numel()
    return out, kept, flat.numel()


def channel_scores(model: nn.Module, criterion: str, bins: int = 10) -> dict[str, torch.Tensor]:
    """Conv weight name -> one score per filter, higher = more worth keeping (l1 norm or entropy)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    norms = filter_l1_norms(state)
    if criterion == "l1":
        return norms
    return {k: filter_entropies(state[k].reshape(state[k].shape[0], -1), bins) for k in norms}


def _without_redundant(model: nn.Module, masks: dict[str, torch.Tensor], image_size: int) -> dict[str, torch.Tensor]:
    try:
        graph = read_graph(model, image_size)
    except lean.CriterionError as e:
        raise PruneError(f"{e}; --keep-redundant skips the removal of redundant kernels that needs it") from None
    return remove_redundant(graph, masks)


def make_mask(model: nn.Module, criterion: str, keep: float, image_size: int = lean.DEFAULT_IMAGE_SIZE,
              keep_redundant: bool = False) -> Mask:
    """The mask of ``criterion`` keeping exactly ``keep`` of its units (module docstring), then, unless
    ``keep_redundant``, without the kernels that lie on no path from the image to the end of the network
    (:mod:`hpcgraft.method.redundancy`): ``kept`` counts the criterion's choice, ``kernels`` what remains."""
    check_request(criterion, keep)
    layers = convs(model)
    pairs = conv_bn_pairs(model)
    bn_of_weight = {_param(c, "weight"): pairs.get(c) for c in layers}
    filters: dict[str, torch.Tensor] = {}  # conv weight name -> bool [out]
    masks: dict[str, torch.Tensor] = {}
    if criterion in lean.KERNEL_CRITERIA:
        masks = {k: v.bool().cpu() for k, v in lean.kernel_masks(model, criterion, keep, image_size).items()}
        kept, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
    elif criterion == "bn":
        layers_bn = earlybird.batchnorm_layers(model)
        total = sum(m.num_features for _, m in layers_bn)
        kept = lean.kept_count(keep, total)
        by_bn = earlybird.bn_channel_masks(model, (total - kept) / total)
        for conv_weight, bn in bn_of_weight.items():
            if bn is not None:
                filters[conv_weight] = by_bn[bn].bool().cpu()
        for bn, m in by_bn.items():  # a BatchNorm without a conv before it: its channels alone
            masks[_param(bn, "weight")] = m.bool().cpu()
    else:
        filters, kept, total = _ranked_filters(channel_scores(model, criterion), keep)
    weights = dict(model.named_parameters())
    for conv_weight, f in filters.items():
        if conv_weight not in masks:
            masks[conv_weight] = f[:, None].expand(weights[conv_weight].shape[:2]).clone()
    kernel_masks = {_param(c, "weight"): torch.ones(m.weight.shape[:2], dtype=torch.bool) for c, m in layers.items()}
    kernel_masks.update({k: m for k, m in masks.items() if m.dim() == 2})  # a conv without a mask keeps every kernel
    by_criterion = sum(int(m.sum()) for m in kernel_masks.values())
    if not keep_redundant:
        kernel_masks = _without_redundant(model, kernel_masks, image_size)
    masks.update(kernel_masks)
    filters = {k: m.any(1) for k, m in kernel_masks.items()}
    for conv_weight, f in filters.items():
        conv = conv_weight[: -len(".weight")] if conv_weight.endswith(".weight") else ""
        if _param(conv, "bias") in weights:
            masks[_param(conv, "bias")] = f.clone()
        if bn_of_weight.get(conv_weight) is not None:
            masks[_param(bn_of_weight[conv_weight], "weight")] = f.clone()
    for name in [k for k in masks if k.endswith("weight") and masks[k].dim() == 1]:
        bias = name[: -len("weight")] + "bias"
        if bias in weights:
            masks[bias] = masks[name].clone()
    return Mask(criterion, keep, masks, UNITS[criterion], kept, total, by_criterion,
                sum(int(m.sum()) for m in kernel_masks.values()), sum(m.numel() for m in kernel_masks.values()))


def invalid_filters(model: nn.Module, criterion: str, keep: float,
                    image_size: int = lean.DEFAULT_IMAGE_SIZE, keep_redundant: bool = False) -> dict[str, torch.Tensor]:
    """Conv weight name -> bool [out], True where ``criterion`` at ``keep`` calls the filter invalid: a
    pruned filter for the channel criteria, the conv feeding a pruned BatchNorm channel for ``bn``, and
    a filter with every one of its kernels pruned for the kernel criteria (redundant kernels removed
    first unless ``keep_redundant``)."""
    mask = make_mask(model, criterion, keep, image_size, keep_redundant)
    return {k: ~v for k, v in mask.channels().items()}


@dataclass
class LayerOverlap:
    name: str
    filters: int
    invalid: dict[str, int]  # criterion -> filters it calls invalid in this layer
    with_l1: dict[str, int]  # criterion -> of those, how many the l1 criterion (same keep) calls invalid too
    kernels: int = 0  # the layer's 2-D kernels
    kept_by_criterion: dict[str, int] = field(default_factory=dict)  # criterion -> kernels its choice keeps
    kept: dict[str, int] = field(default_factory=dict)  # criterion -> of those, left after removing redundant ones


def invalid_overlap(model: nn.Module, criteria: list[str], keep: float,
                    image_size: int = lean.DEFAULT_IMAGE_SIZE, keep_redundant: bool = False) -> list[LayerOverlap]:
    """Per conv layer: the filters each criterion at ``keep`` calls invalid (:func:`invalid_filters`), how
    many of them the l1 criterion at the same ``keep`` calls invalid as well, and the kernels each keeps
    before and after the redundant ones are removed."""
    raw = {c: make_mask(model, c, keep, image_size, keep_redundant=True) for c in dict.fromkeys(["l1", *criteria])}
    final = raw if keep_redundant else {c: make_mask(model, c, keep, image_size) for c in raw}
    sets = {c: {k: ~v for k, v in m.channels().items()} for c, m in final.items()}
    return [LayerOverlap(name, int(l1.numel()),
                         {c: int(sets[c][name].sum()) for c in sets},
                         {c: int((sets[c][name] & l1).sum()) for c in sets},
                         final["l1"].masks[name].numel(),
                         {c: int(raw[c].masks[name].sum()) for c in sets},
                         {c: int(final[c].masks[name].sum()) for c in sets})
            for name, l1 in sets["l1"].items()]
