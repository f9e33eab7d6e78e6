"""Offline references the tests compare the package against (not part of the package: only tests use them)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hpcgraft.method.grafting import WEIGHT_EPS, State, broadcast_to_filters, layer_entropies, plan_layers


def entropy_weighted_mean(states: Sequence[State], exclude: int, *, level: str = "layer", bins: int = 10
                          ) -> dict[str, torch.Tensor]:
    """The allreduce topology's source for peer ``exclude``: the others' layers averaged with weights
    H + eps (per layer, or per filter at filter level). Offline reference of the one-Allreduce version."""
    plan = plan_layers(states[0])
    ents = [layer_entropies(s, plan, level, bins) for s in states]
    out = {k: v.clone() for k, v in states[exclude].items()}
    others = [j for j in range(len(states)) if j != exclude]
    for gi, g in enumerate(plan):
        w = [ents[j][gi].double() + WEIGHT_EPS for j in others]
        total = sum(w)
        for k in g.members:
            acc = sum(broadcast_to_filters(wj, states[j][k]).to(states[j][k].dtype) * states[j][k]
                      for wj, j in zip(w, others, strict=True))
            out[k] = acc / broadcast_to_filters(total, out[k]).to(out[k].dtype)
    return out


