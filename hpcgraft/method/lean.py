"""Kernel pruning criteria: LEAN (longest chains of operator norms) and its baselines IndivL1 and IndivSV.

LEAN (Schoonhoven et al., arXiv 2011.06923; reference code schoonhovenrichard/LEAN_CNN_pruning) sees a
CNN as a graph whose nodes are channels and whose edges are the 2-D kernels W[o, i] of its convolutions,
weighted by the kernel's operator norm times the BatchNorm scale of its output channel. A kernel is worth
keeping when it lies on a chain of kernels that together amplify a signal (a path whose product of edge
weights is large), not merely when it is large on its own. IndivL1 (per-kernel l1 norm) and IndivSV
(per-kernel operator norm x BN factor) rank the same kernels one at a time, under one global threshold.

The parts live in their own modules: the operator norms (:mod:`hpcgraft.method.opnorm`), the channel
graph read off the model by torch.fx (:mod:`hpcgraft.method.channelgraph`), the chain selection
(:mod:`hpcgraft.method.chains`); this module ranks kernels by a criterion. Pure torch and numpy on a
module: no MPI, no files. The prune command builds masks with :func:`kernel_masks`.
"""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import torch
from torch import nn

from hpcgraft.method.chains import largest, longest_chains, select_chains
from hpcgraft.method.channelgraph import ChannelGraph, ConvOp, conv_ops, read_graph
from hpcgraft.method.opnorm import CriterionError, operator_norms

__all__ = ["DEFAULT_IMAGE_SIZE", "KERNEL_CRITERIA", "CriterionError", "check_criterion", "kept_count",
           "kernel_masks", "kernel_scores", "longest_chains", "operator_norms"]

KERNEL_CRITERIA = ("lean", "indiv_l1", "indiv_sv")
DEFAULT_IMAGE_SIZE = 16  # M of the reference for ResNet-50 and U-Net


def check_criterion(criterion: str) -> None:
    if criterion not in KERNEL_CRITERIA:
        raise CriterionError(f"unknown kernel pruning criterion {criterion!r}; use one of: "
                             f"{', '.join(KERNEL_CRITERIA)}")


def kept_count(keep: float, total: int) -> int:
    """ceil(keep x total), with keep read as the decimal it prints as (0.7 x 10 is 7, not 8).

    Ceil so that any keep > 0 keeps at least one kernel; the decimal reading so that a fraction typed on
    the command line gives the count a person would compute from it, whatever its binary rounding."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise CriterionError(f"keep fraction must lie in (0, 1], got {keep!r}")
    return min(total, math.ceil(Decimal(repr(float(keep))) * total))


def _edge_weights(conv: ConvOp, image_size: int) -> torch.Tensor:
    """[O, I/groups]: the kernel's operator norm times the BN factor of its output channel (float64)."""
    layer = conv.name[: -len(".weight")]
    if len(set(conv.stride)) != 1:
        raise CriterionError(f"conv '{layer}' has stride {conv.stride}; the operator norm needs a square stride")
    if set(conv.dilation) != {1}:
        raise CriterionError(f"conv '{layer}' has dilation {conv.dilation}; the operator norm is implemented "
                             "for dilation 1 only")
    try:
        norms = operator_norms(conv.weight, conv.stride[0], image_size).double().cpu()
    except CriterionError as e:
        raise CriterionError(f"conv '{layer}': {e}") from None
    return norms if conv.bn is None else norms * conv.bn[:, None]


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise CriterionError(f"image_size must be a positive integer, got {image_size!r}")


def kernel_scores(model: nn.Module, criterion: str, image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """Per-kernel weights [O, I/groups] per conv weight name: l1 norms (``indiv_l1``) or operator norm x BN
    factor (``lean``, ``indiv_sv``: LEAN's edge weights), float64 on the CPU, in the graph's layer order."""
    check_criterion(criterion)
    _check_size(image_size)
    graph = read_graph(model, image_size)
    if criterion == "indiv_l1":
        return {c.name: c.weight.double().abs().sum(dim=(2, 3)).cpu() for c in conv_ops(graph)}
    return {c.name: _edge_weights(c, image_size) for c in conv_ops(graph)}


def _top(scores: dict[str, torch.Tensor], n_keep: int) -> dict[str, torch.Tensor]:
    """The n_keep largest scores over all layers (one global threshold); ties go to the earlier kernel."""
    return _split(largest(_finite(torch.cat([s.reshape(-1) for s in scores.values()]).numpy()), n_keep), scores)


def _finite(values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():
        raise CriterionError("the model's conv or BatchNorm weights hold NaN or Inf: no kernel ranking exists")
    return values


def _split(kept: np.ndarray, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, s in like.items():
        out[name] = torch.from_numpy(kept[start:start + s.numel()].copy()).view(s.shape)
        start += s.numel()
    return out


def _lean(graph: ChannelGraph, image_size: int, keep: float) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    src, dst, w, fixed = [], [], [], []
    for op in graph.ops:
        if isinstance(op, ConvOp):
            weights[op.name] = ew = _edge_weights(op, image_size)
            src.append(op.src.reshape(-1))
            dst.append(op.out.repeat_interleave(op.src.shape[1]))
            w.append(ew.reshape(-1))
            fixed.append(torch.zeros(ew.numel(), dtype=torch.bool))
        else:
            src.append(op.src)
            dst.append(op.dst)
            w.append(op.weight)
            fixed.append(torch.ones(len(op.src), dtype=torch.bool))
    s, d = torch.cat(src).numpy(), torch.cat(dst).numpy()
    f = torch.cat(fixed).numpy()
    # Ops create their nodes in trace order, so the edges come out sorted by target already.
    n_keep = kept_count(keep, int((~f).sum()))
    kept = select_chains(graph.nodes, s, d, _finite(torch.cat(w).numpy()), f, n_keep, truncate=True)
    return _split(kept[~f], weights)


def kernel_masks(model: nn.Module, criterion: str, keep: float, image_size: int = DEFAULT_IMAGE_SIZE
                 ) -> dict[str, torch.Tensor]:
    """Bool masks [O, I/groups] per conv weight name (as in ``model.named_parameters()``), True = kept.

    Exactly :func:`kept_count` (keep, N) kernels are kept, N counted over every conv kernel of the network
    (identity shortcuts and pooling are not kernels; the classifier is left out). LEAN stops inside its
    last path at that count (the reference's Python does; its Rust keeps the whole path).
    """
    check_criterion(criterion)
    _check_size(image_size)
    kept_count(keep, 1)  # a keep outside (0, 1] is refused before any work
    if criterion == "lean":
        return _lean(read_graph(model, image_size), image_size, keep)
    scores = kernel_scores(model, criterion, image_size)
    return _top(scores, kept_count(keep, sum(s.numel() for s in scores.values())))
