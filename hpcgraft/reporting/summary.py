"""The report of runs as files: ``summary.md`` with every table of the runs and the plots it links."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from hpcgraft.errors import InputError
from hpcgraft.reporting.plots import (
    plot_accuracy,
    plot_dgconv_groups,
    plot_graft_heatmap,
    plot_invalid,
    plot_layer_invalid,
    plot_pruning,
    plot_training,
)
from hpcgraft.reporting.runs import Run, layer_invalid, load_run, name_runs, prune_results
from hpcgraft.reporting.tables import comparison_table, layer_table, length_warning, mean, results_table
from hpcgraft.storage.outputs import check_output_dir
from hpcgraft.storage.runlog import fmt


def _file_name(run: Run) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run.name)



def write_report(runs: list[Run], out: Path) -> Path:
    """All plots and ``summary.md`` into ``out``; returns the summary's path."""
    out.mkdir(parents=True, exist_ok=True)
    name_runs(runs)
    thresholds = runs[0].cfg.log.thresholds
    md = ["# hpcgraft report", "", "| run | method | model | data | peers | epochs | state |",
          "|---|---|---|---|---|---|---|"]
    for r in runs:
        done = f"{max(r.epochs) if r.epochs else 0}/{r.cfg.train.epochs}"
        md.append(f"| {r.name} | {r.method} | {r.cfg.model.name} | {r.cfg.data.name} | {len(r.peers)} | {done} | "
                  f"{r.state} |")
    warning = length_warning(runs)
    if warning:
        md += ["", f"**Warning:** {warning}."]
    md += ["", "## Accuracy and invalid filters", "",
           "Top-1 on the test set (%); invalid filters: conv filters whose l1 norm is below the threshold, "
           "at the last epoch, out of all conv filters of the model.", "", *results_table(runs, thresholds)]
    baselines = [r for r in runs if r.is_baseline]
    others = [r for r in runs if not r.is_baseline]
    md += ["", "## Baseline vs method", ""]
    if baselines and others:
        md += [f"As in the papers' tables; in brackets the difference to the baseline {baselines[0].name}.", "",
               *comparison_table(baselines[0], others, thresholds)]
    else:
        md.append("Give a baseline run (graft.mode=none, no cultivation) and a run of the method together for "
                  "the side-by-side table.")
    plot_accuracy(runs, out / "accuracy.png")
    plot_invalid(runs, thresholds, out / "invalid.png")
    plot_training(runs, out / "training.png")
    md += ["", "## Plots", "", "![test accuracy per epoch](accuracy.png)", "",
           "![invalid filters per epoch](invalid.png)", "", "![train loss and learning rate](training.png)"]
    layers = {r.name: found for r in runs if (found := layer_invalid(r, thresholds)) is not None}
    md += ["", "## Invalid filters per layer", ""]
    if layers:
        plot_layer_invalid(layers, thresholds, out / "invalid_layers.png")
        md += ["Peer 0 of each run's newest checkpoint (python -m hpcgraft.analyze RUN_DIR shows every layer and "
               "peer); layers without an invalid filter are left out.", "", *layer_table(layers, thresholds), "",
               "![invalid filters per layer](invalid_layers.png)"]
    else:
        md.append("The runs have no checkpoints (checkpoint.enabled=false), so there are no weights to count per "
                  "layer; the per-epoch totals above come from metrics.jsonl.")
    for r in runs:
        if not r.grafts:
            continue
        base = _file_name(r)
        alphas = [layer["alpha"] for g in r.grafts for layer in g["layers"]]
        sources = sorted({g.get("source", "?") for g in r.grafts})
        md += ["", f"### Grafting in {r.name}", "",
               f"{len(r.grafts)} graft reports ({len({g['step'] for g in r.grafts})} graft points x "
               f"{len({g['peer'] for g in r.grafts})} peers), sources {', '.join(sources)}, "
               f"{r.grafts[0].get('level', '?')} level; alpha per layer: mean {fmt(mean(alphas), '.3f')}, "
               f"min {fmt(min(alphas), '.3f')}, max {fmt(max(alphas), '.3f')}."]
        for key, what in (("alpha", "alpha per layer and graft point"), ("h_self", "entropy per layer")):
            if plot_graft_heatmap(r, key, out / f"{base}_{key}.png"):
                md += ["", f"![{what}]({base}_{key}.png)"]
    for r in runs:
        if plot_dgconv_groups(r, out / f"{_file_name(r)}_dgconv_groups.png"):
            md += ["", f"### DGConv groups in {r.name}", "",
                   f"![groups per DGConv layer and epoch]({_file_name(r)}_dgconv_groups.png)"]
    if plot_pruning(prune_results(runs), out / "pruning.png"):
        md += ["", "## Pruning", "", "Top-1 after `python -m hpcgraft.prune` (mean over peers and runs) against the "
               "fraction of each criterion's units kept.", "", "![top-1 vs kept fraction](pruning.png)"]
    summary = out / "summary.md"
    summary.write_text("\n".join(md) + "\n")
    return summary



def report_runs(paths: Sequence[str | Path], out: str | Path | None = None,
                warn: Callable[[str], None] = lambda message: None) -> Path:
    """Read the runs in ``paths`` and write their report into ``out`` (default: ``report/`` in the first
    run); returns summary.md's path. Runs that cover different numbers of epochs are compared all the same,
    after ``warn`` is told. A run without a finished epoch is bad input, found before anything is written."""
    runs = [load_run(p) for p in paths]
    where = check_output_dir(out or runs[0].path / "report", "--out")
    empty = [r.path for r in runs if not r.epochs]
    if empty:
        raise InputError(f"{empty[0]} has no finished epoch yet; wait for one")
    name_runs(runs)
    warning = length_warning(runs)
    if warning:
        warn(warning)
    return write_report(runs, where)
