"""Kernel pruning criteria: LEAN (longest chains of operator norms) and its baselines IndivL1 and IndivSV.

LEAN (Schoonhoven et al., arXiv 2011.06923; reference code schoonhovenrichard/LEAN_CNN_pruning) sees a
CNN as a graph whose nodes are channels and whose edges are the 2-D kernels W[o, i] of its convolutions,
weighted by the kernel's operator norm times the BatchNorm scale of its output channel. A kernel is worth
keeping when it lies on a chain of kernels that together amplify a signal (a path whose product of edge
weights is large), not merely when it is large on its own. IndivL1 (per-kernel l1 norm) and IndivSV
(per-kernel operator norm x BN factor) rank the same kernels one at a time, under one global threshold.

Pure torch on a module: no MPI, no files. The prune command builds masks with :func:`kernel_masks`.
"""

from __future__ import annotations

import math
from decimal import Decimal

import torch
from torch import nn

from hpcgraft.errors import UserError

KERNEL_CRITERIA = ("lean", "indiv_l1", "indiv_sv")
DEFAULT_IMAGE_SIZE = 16  # M of the reference for ResNet-50 and U-Net


class CriterionError(UserError, ValueError):
    """A kernel-pruning request that cannot be served (criterion, keep fraction, model): one line."""


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


def operator_norms(weight: torch.Tensor, stride: int, size: int) -> torch.Tensor:
    """Spectral norms of every single-channel convolution W[o, i] on a size x size periodic image: [O, I].

    Stride 1 (Sedghi et al.): the largest |FFT2| of the kernel zero-padded to size x size. Stride 2: the
    operator is a row of four circulant blocks, one per polyphase part W[p::2, q::2] of the kernel, all
    diagonalised by the same (size/2)^2 DFT, so its singular values are sqrt(sum_p |F_p|^2) per frequency.
    """
    raise NotImplementedError


def longest_chains(src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor, n_keep: int,
                   fixed: torch.Tensor | None = None, *, truncate: bool = False) -> torch.Tensor:
    """The LEAN selection on an explicit edge list (edges i -> j with i < j): a bool tensor, True = kept.

    Repeatedly takes the node with the largest multiplicative path value, keeps the non-fixed edges of its
    path and removes them, until n_keep edges are kept or a path keeps nothing; then keeps the remaining
    non-fixed edges by descending weight up to n_keep. ``fixed`` edges (identity shortcuts, pooling) carry
    paths but are never kept or counted. ``truncate=False`` keeps a whole last path as the reference's
    Rust code does (it may keep more than n_keep); ``truncate=True`` stops inside it at exactly n_keep, as
    the reference's Python code does.
    """
    raise NotImplementedError


def kernel_scores(model: nn.Module, criterion: str, image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """Per-kernel weights [O, I/groups] per conv weight name: l1 norms (``indiv_l1``) or operator norm x BN
    factor (``lean``, ``indiv_sv``: LEAN's edge weights)."""
    raise NotImplementedError


def kernel_masks(model: nn.Module, criterion: str, keep: float, image_size: int = DEFAULT_IMAGE_SIZE
                 ) -> dict[str, torch.Tensor]:
    """Bool masks [O, I/groups] per conv weight name (as in ``model.named_parameters()``), True = kept.

    Exactly :func:`kept_count` (keep, N) kernels are kept, N counted over every prunable kernel of the
    network (all conv kernels; identity shortcuts and pooling are not kernels; the classifier is left out).
    """
    raise NotImplementedError
