"""Wording shared by every command's output: counts with the right plural, durations and sizes people read.

Standard library only, at the bottom of the layers, so that messages anywhere (the loop, launchers,
reports) say "1 peer" and "2 peers" alike.
"""

from __future__ import annotations

import math


def plural(count: int, word: str, many: str | None = None) -> str:
    """``plural(1, "epoch") == "1 epoch"``, ``plural(2, "epoch") == "2 epochs"``; ``many`` for irregular
    words (``plural(n, "replica(s)")`` is what this replaces)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def size(n: int) -> str:
    """A byte count as people read it: ``712.3 kB``, ``1.4 GB`` (decimal units, one decimal)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def duration(seconds: float | None) -> str:
    """A duration at the precision a person waiting needs: ``42 s``, ``3m05s``, ``2h07m``, ``3d04h``;
    ``?`` when unknown (no measurement yet, or not finite)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"
