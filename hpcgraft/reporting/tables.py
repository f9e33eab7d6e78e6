"""The report's Markdown tables: per run and peer, the papers' baseline-vs-method table, invalid filters per
layer, and a sweep's mean and spread over seeds. Plain text, so a sweep prints its table without matplotlib."""

from __future__ import annotations

import statistics
from pathlib import Path

from hpcgraft.method.validity import LayerStats
from hpcgraft.reporting.runs import Run, load_sweep
from hpcgraft.storage.runlog import fmt


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None



def length_warning(runs: list[Run]) -> str | None:
    """Runs of different lengths side by side: their final and best values are not comparable."""
    done = {r.name: max(r.epochs) if r.epochs else 0 for r in runs}
    if len(set(done.values())) < 2:
        return None
    return ("the runs cover different numbers of epochs (" + ", ".join(f"{n}: {e}" for n, e in done.items())
            + "); their final and best values are not comparable")



def results_table(runs: list[Run], thresholds: list[float]) -> list[str]:
    """Per run and peer: best and final top-1 and the final invalid-filter counts; then the ensemble."""
    inv = [f"invalid @{t:g}" for t in thresholds]
    lines = ["| run | peer | best top-1 | final top-1 | " + " | ".join(inv) + " |",
             "|---|---|---|---|" + "---|" * len(inv)]
    for r in runs:
        for p in r.peers:
            counts = [_invalid(r, p, t) for t in thresholds]
            lines.append(f"| {r.name} | {p} | {fmt(r.best(p))} | {fmt(r.final(p))} | " + " | ".join(counts) + " |")
        ens = [r.ensemble[e] for e in r.epochs if e in r.ensemble]
        if len(r.peers) > 1 and ens:
            lines.append(f"| {r.name} | ensemble | {fmt(max(ens))} | {fmt(ens[-1])} |" + " |" * len(inv))
    return lines



def _invalid(run: Run, peer: int, t: float) -> str:
    n = run.final(peer, f"invalid_{t:g}")
    return "-" if n is None else f"{n}/{run.filters}" if run.filters else str(n)



def comparison_table(baseline: Run, others: list[Run], thresholds: list[float]) -> list[str]:
    """The papers' table: baseline beside each other run, differences to the baseline in brackets."""
    runs = [baseline, *others]
    peers = sorted({p for r in runs for p in r.peers})
    rows: list[tuple[str, list[float | None], str]] = []
    for p in peers:
        rows.append((f"best top-1, peer {p}", [r.best(p) if p in r.peers else None for r in runs], ".2f"))
    for p in peers:
        rows.append((f"final top-1, peer {p}", [r.final(p) if p in r.peers else None for r in runs], ".2f"))
    rows.append(("best top-1, mean of peers", [mean([r.best(p) for p in r.peers]) for r in runs], ".2f"))
    rows.append(("final top-1, mean of peers", [mean([r.final(p) for p in r.peers]) for r in runs], ".2f"))
    rows.append(("best top-1, ensemble", [max(r.ensemble.values()) if r.ensemble else None for r in runs], ".2f"))
    rows.append(("final top-1, ensemble", [r.ensemble[max(r.ensemble)] if r.ensemble else None for r in runs],
                 ".2f"))
    head = "| | " + " | ".join(f"{r.name}: {r.method}" for r in runs) + " |"
    lines = [head, "|---|" + "---|" * len(runs)]
    for label, values, spec in rows:
        cells = [fmt(values[0], spec)]
        for v in values[1:]:
            diff = f" ({v - values[0]:+.2f})" if v is not None and values[0] is not None else ""
            cells.append(fmt(v, spec) + diff)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for t in thresholds:
        for p in peers:
            cells = [_invalid(r, p, t) if p in r.peers else "-" for r in runs]
            lines.append(f"| invalid filters @{t:g}, peer {p} | " + " | ".join(cells) + " |")
    return lines



def layer_table(layers: dict[str, tuple[str, list[LayerStats]]], thresholds: list[float]) -> list[str]:
    """The layers that hold an invalid filter in any run, with each run's counts."""
    names = list(layers)
    by_run = {n: {st.name: st for st in stats} for n, (_, stats) in layers.items()}
    order = list(dict.fromkeys(st.name for _, stats in layers.values() for st in stats))
    head = "| layer | " + " | ".join(f"{n} @{t:g}" for t in thresholds for n in names) + " |"
    lines = [head, "|---|" + "---|" * (len(names) * len(thresholds))]
    for layer in order:
        cells = [by_run[n][layer].invalid[f"{t:g}"] if layer in by_run[n] else None for t in thresholds for n in names]
        if any(cells):
            lines.append(f"| {layer} | " + " | ".join("-" if c is None else f"{c}/{by_run[n][layer].filters}"
                                                     for c, n in zip(cells, names * len(thresholds), strict=True))
                         + " |")
    return lines if len(lines) > 2 else ["No conv layer holds an invalid filter in these checkpoints."]



def _spread(values: list[float], spec: str = ".2f") -> str:
    """mean +- sample standard deviation over seeds; the mean alone for one seed."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{spec}}"
    return f"{statistics.fmean(values):{spec}} ± {statistics.stdev(values):{spec}}"



def sweep_table(sweep: dict[str, dict[int, Run | None]]) -> str:
    """The papers' table of a sweep: per arm, best and final test top-1 (per seed the mean over the peers)
    and of the ensemble, and the final invalid filters, as mean +- sample std over the finished seeds."""
    done = {arm: [r for r in runs.values() if r is not None and r.state == "finished"] for arm, runs in sweep.items()}
    any_run = next((r for runs in done.values() for r in runs), None)
    thresholds = any_run.cfg.log.thresholds if any_run else []
    of = f" (of {any_run.filters})" if any_run and any_run.filters else ""
    head = ["arm", "seeds done", "best top-1", "final top-1", "best ensemble", "final ensemble",
            *[f"invalid @{t:g}{of}" for t in thresholds]]
    lines = ["Test top-1 (%): per seed the mean over the peers; mean ± sample std over the finished seeds. "
             "Invalid filters: final epoch, mean over the peers.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in done.items():
        cells = [arm, f"{len(runs)}/{len(sweep[arm])}",
                 _spread([statistics.fmean(r.best(p) for p in r.peers) for r in runs]),
                 _spread([statistics.fmean(r.final(p) for p in r.peers) for r in runs]),
                 _spread([max(r.ensemble.values()) for r in runs if r.ensemble]),
                 _spread([r.ensemble[max(r.ensemble)] for r in runs if r.ensemble])]
        cells += [_spread([statistics.fmean(r.final(p, f"invalid_{t:g}") for p in r.peers) for r in runs], ".1f")
                  for t in thresholds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_sweep_report(path: Path, out: Path) -> Path:
    """``sweep.md`` (the table) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / "sweep.md"
    md.write_text(f"# hpcgraft sweep {path}\n\n{sweep_table(load_sweep(path))}\n")
    return md
