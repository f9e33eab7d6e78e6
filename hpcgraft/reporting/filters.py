"""The tables of the analyze command: invalid filters per conv layer of each peer, by l1 norm and entropy
(:mod:`hpcgraft.method.validity`), or by each pruning criterion against l1 (:mod:`hpcgraft.method.pruning`);
and reading the peers they are computed for, from a state dict file or a run (:mod:`hpcgraft.storage.run`)."""

from __future__ import annotations

from pathlib import Path

from hpcgraft.errors import InputError
from hpcgraft.method.pruning import LayerOverlap, invalid_overlap
from hpcgraft.method.validity import LayerStats, analyze_state, totals
from hpcgraft.storage.run import load_model, peer_states, read_config


def filter_stats(path: Path, peer: int | None, thresholds: list[float], entropy_below: float, bins: int
                 ) -> dict[str, list[LayerStats]]:
    """Per peer (label -> layers): the invalid filters of each conv layer by l1 norm and by entropy."""
    return {label: analyze_state(s, thresholds, entropy_below, bins)
            for label, s in peer_states(path, peer=peer).items()}


def criteria_overlap(path: Path, criteria: list[str], keep: float, peer: int | None, keep_redundant: bool
                     ) -> dict[str, list[LayerOverlap]]:
    """Per peer: which filters each criterion calls invalid at ``keep``, against the l1 set. The model is
    rebuilt from the run's config, so ``path`` must be a run, a checkpoint or a peer file."""
    trained = read_config(path)
    if trained is None:
        raise InputError(f"{path} holds weights only; --criterion rebuilds the model from its run: give "
                         "the run directory, a checkpoint or a peer .h5 file")
    return {label: invalid_overlap(load_model(trained.cfg, s, f"{path} ({label})"), criteria, keep,
                                   keep_redundant=keep_redundant)
            for label, s in peer_states(path, peer=peer).items()}


def format_table(label: str, stats: list[LayerStats], thresholds: list[float], entropy_below: float) -> str:
    inv = [f"l1<{t:g}" for t in thresholds]
    cols = ["layer", "shape", "filters", *inv, f"H<{entropy_below:g}", "min l1", "mean H"]
    rows = [[s.name, "x".join(map(str, s.shape)), str(s.filters), *[str(s.invalid[f"{t:g}"]) for t in thresholds],
             str(s.low_entropy), f"{s.min_l1:.3g}", f"{s.mean_entropy:.3f}"] for s in stats]
    tot = totals(stats)
    rows.append(["total", f"{tot['layers']} conv layers", str(tot["filters"]),
                 *[str(tot["invalid"][f"{t:g}"]) for t in thresholds], str(tot["low_entropy"]), "", ""])
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                          strict=True)))

    summary = ", ".join(f"{tot['invalid'][f'{t:g}']}/{tot['filters']} below l1 {t:g}" for t in thresholds)
    return "\n".join([f"{label}: {summary}, {tot['low_entropy']}/{tot['filters']} below entropy "
                      f"{entropy_below:g}", line(cols), *[line(r) for r in rows]])


def format_overlap(label: str, layers: list[LayerOverlap], keep: float) -> str:
    """Invalid filters per criterion (and how many l1 shares), then the kernels each criterion keeps:
    "chosen>left", its own choice and what is left after removing the redundant kernels."""
    criteria = list(layers[0].invalid)
    cols = ["layer", "filters", *[h for c in criteria for h in ([c] if c == "l1" else [c, f"{c}&l1"])],
            "kernels", *[f"{c} kept" for c in criteria]]

    def cells(name: str, s: LayerOverlap) -> list[str]:
        return [name, str(s.filters), *[v for c in criteria for v in ([str(s.invalid[c])] if c == "l1" else
                                                                      [str(s.invalid[c]), str(s.with_l1[c])])],
                str(s.kernels), *[f"{s.kept_by_criterion[c]}>{s.kept[c]}" for c in criteria]]

    def summed(field: str) -> dict[str, int]:
        return {c: sum(getattr(s, field)[c] for s in layers) for c in criteria}

    rows = [cells(s.name, s) for s in layers]
    total = summed("invalid")
    rows.append(cells("total", LayerOverlap("total", sum(s.filters for s in layers), total, summed("with_l1"),
                                            sum(s.kernels for s in layers), summed("kept_by_criterion"),
                                            summed("kept"))))
    both = summed("with_l1")
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    summary = ", ".join(f"{c} {total[c]} ({both[c]} also l1)" for c in criteria if c != "l1")
    return "\n".join([f"{label}: invalid filters at keep {keep:g}: l1 {total['l1']}; {summary}",
                      line(cols), *[line(r) for r in rows]])
