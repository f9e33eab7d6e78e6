"""Invalid filters of a network, per conv layer: by l1 norm (the papers' criterion) and by entropy.

A filter is one output channel of a conv layer. It is invalid at threshold t when its l1 norm is below t
(docs/method.md, "Reason"); the entropy criterion counts filters whose weights' histogram entropy (10 bins over
the filter's own range, as grafting computes it) is below a threshold: a filter with most of its weights
in one bin varies little whatever its scale. For scale: ln 10 = 2.30 is the most 10 bins can hold,
freshly initialised 3x3 filters have about 1.7 to 2.0 (depthwise ones, 9 weights, down to about 1), and
0.5 is reached when four fifths of the weights share one bin. Only the l1 counts are comparable with the
papers' figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpcgraft.method.grafting import State, filter_entropies, filter_l1_norms

DEFAULT_ENTROPY_BELOW = 0.5


@dataclass
class LayerStats:
    name: str
    shape: tuple[int, ...]
    filters: int
    invalid: dict[str, int]  # threshold (as written) -> filters with l1 norm below it
    low_entropy: int  # filters with entropy below the entropy threshold
    min_l1: float
    mean_entropy: float


def analyze_state(state: State, thresholds: list[float], entropy_below: float, bins: int = 10
                  ) -> list[LayerStats]:
    """Per conv layer (4-D weight): filters, invalid counts per l1 threshold, low-entropy count."""
    out = []
    for name, norms in filter_l1_norms(state).items():
        w = state[name]
        ent = filter_entropies(w.reshape(w.shape[0], -1), bins)
        out.append(LayerStats(
            name=name, shape=tuple(w.shape), filters=int(norms.numel()),
            invalid={f"{t:g}": int((norms < t).sum()) for t in thresholds},
            low_entropy=int((ent < entropy_below).sum()),
            min_l1=float(norms.min()), mean_entropy=float(ent.mean()),
        ))
    return out


def totals(stats: list[LayerStats]) -> dict[str, Any]:
    keys = stats[0].invalid if stats else {}
    return {"layers": len(stats), "filters": sum(s.filters for s in stats),
            "invalid": {k: sum(s.invalid[k] for s in stats) for k in keys},
            "low_entropy": sum(s.low_entropy for s in stats)}
