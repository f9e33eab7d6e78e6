"""The unit of grafting: the tensors one coefficient mixes. Its own module because both the paper's
math (:mod:`hpcgraft.method.grafting`) and the authors' (:mod:`hpcgraft.method.authors`) plan in it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerGroup:
    """Tensors mixed with one coefficient (or one per output filter)."""

    anchor: str  # the key whose entropy decides: a conv/linear weight
    members: tuple[str, ...]  # all keys of the group, anchor first
    filters: int  # output filters (first dimension of the anchor)
    per_filter: bool  # False for groups that have no filters (1-D standalone tensors)
    gate: str | None = None  # a DGConv layer's gate logits (a member too): the anchor is then W * U(gate)
