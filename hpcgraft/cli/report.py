"""Plots and a Markdown summary of finished (or running) runs: the evidence for or against grafting.

    python -m hpcgraft.report RUN_DIR [RUN_DIR ...] [--out DIR]
    python -m hpcgraft.report SWEEP_DIR [--out DIR]     (a sweep's table: sweep.md)

Reads each run directory's config (:mod:`hpcgraft.storage.run`), metrics.jsonl and graft.jsonl (see
:mod:`hpcgraft.storage.runlog`) and writes into ``--out`` (default: ``RUN_DIR/report`` of the first run):

- ``accuracy.png``: test top-1 of every peer and of the ensemble per epoch, one panel per run;
- ``invalid.png``: invalid filters (l1 norm below each threshold) per epoch, every run in the same
  panel, so a baseline run given beside a grafted run shows the "before/after" of the papers;
- ``training.png``: train loss and learning rate per epoch, every peer of every run;
- ``<run>_alpha.png`` and ``<run>_h_self.png`` for grafted runs: heat maps (layer x graft point, one
  panel per peer) of the coefficient alpha each layer kept of itself and of the layer's entropy h_self;
- ``invalid_layers.png`` when the runs wrote checkpoints: invalid filters per conv layer of peer 0 in
  each run's newest checkpoint, a heat map with one row per layer and one column per run (before/after,
  given a baseline and a grafted run);
- ``pruning.png`` when a run directory holds results of ``python -m hpcgraft.prune --out RUN_DIR/SUBDIR``:
  top-1 (mean over peers and over the runs of an arm) vs the kept fraction, one line per criterion and
  arm (baseline or grafted);
- ``summary.md``: the runs, their best and final accuracies and invalid-filter counts and, when one run
  is a baseline (graft.mode=none without cultivation), the side-by-side table the papers show.

Runs that cover different numbers of epochs are compared all the same, with a warning (stderr and summary.md).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcgraft.config import Config
from hpcgraft.errors import ConfigError, InputError, report
from hpcgraft.method.grafting import filter_l1_norms
from hpcgraft.method.pruning import RESULTS_FILE
from hpcgraft.method.validity import DEFAULT_ENTROPY_BELOW, LayerStats, analyze_state
from hpcgraft.storage.outputs import check_output_dir
from hpcgraft.storage.run import build_model, holds_run, peer_states, read_config
from hpcgraft.storage.runlog import GRAFTS, METRICS, STATUS, fmt, read_jsonl

PROG = "hpcgraft.report"


# ------------------------------------------------------------------------------------------ loading
@dataclass
class Run:
    """One run directory's config and logs, the last row kept where a resumed run logged an epoch twice."""

    path: Path
    cfg: Config
    rows: dict[tuple[int, int], dict[str, Any]]  # (epoch, peer) -> metrics row
    ensemble: dict[int, float]  # epoch -> ensemble accuracy
    grafts: list[dict[str, Any]]  # graft.jsonl rows that carry a report (skipped rounds left out)
    state: str = "unknown"
    name: str = ""
    filters: int | None = None  # conv filters of the model, the denominator of the invalid counts
    peers: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)

    @property
    def is_baseline(self) -> bool:
        return self.cfg.graft.mode == "none" and self.cfg.cultivate.lambda_ == 0

    @property
    def method(self) -> str:
        """What the run did, in the papers' words."""
        g, parts = self.cfg.graft, []
        if g.mode == "peers":
            parts.append(f"grafting ({g.level} level, {g.topology})")
        elif g.mode in ("noise", "self"):
            parts.append(f"grafting from {'noise' if g.mode == 'noise' else 'its own filters'} ({g.level} level)")
        if self.cfg.cultivate.lambda_ > 0:
            parts.append(f"cultivation (lambda={self.cfg.cultivate.lambda_:g}, T={self.cfg.cultivate.temperature:g})")
        text = " + ".join(parts) or "baseline (independent peers)"
        return text + (", dlr" if self.cfg.train.dlr and len(self.peers) > 1 else "")

    def accuracy(self, peer: int) -> list[tuple[int, float]]:
        return [(e, self.rows[e, peer]["test_acc"]) for e in self.epochs if (e, peer) in self.rows]

    def final(self, peer: int, key: str = "test_acc") -> Any:
        last = [self.rows[e, peer][key] for e in self.epochs if (e, peer) in self.rows]
        return last[-1] if last else None

    def best(self, peer: int) -> float | None:
        accs = [a for _, a in self.accuracy(peer)]
        return max(accs) if accs else None


def load_run(path: str | Path) -> Run:
    """A run directory written by ``python -m hpcgraft.train --out PATH``."""
    p = Path(path)
    if not (p / METRICS).is_file() or not holds_run(p):
        raise InputError(f"{p} holds no config.yaml and {METRICS}; give the --out directory of a run "
                         "(python -m hpcgraft.train --out RUN_DIR) that has finished at least one epoch")
    cfg = read_config(p).cfg  # type: ignore[union-attr] - a directory always has a config or an error
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    ensemble: dict[int, float] = {}
    for row in read_jsonl(p / METRICS):
        if row.get("peer") is None:
            ensemble[row["epoch"]] = row["ensemble_acc"]
        else:
            rows[row["epoch"], row["peer"]] = row
    grafts = [g for g in read_jsonl(p / GRAFTS) if g.get("layers")]
    run = Run(p, cfg, rows, ensemble, grafts, state=_state(p))
    run.peers = sorted({peer for _, peer in rows})
    run.epochs = sorted({e for e, _ in rows})
    run.filters = conv_filters(cfg)
    return run


def _state(p: Path) -> str:
    f = p / STATUS
    return json.loads(f.read_text()).get("state", "unknown") if f.is_file() else "unknown"


def conv_filters(cfg: Config) -> int | None:
    """Output filters of all conv layers of the run's model (None if the model cannot be built here)."""
    try:
        model = build_model(cfg, cfg.model.num_classes or 10)
    except (ConfigError, TypeError):
        return None
    return sum(int(n.numel()) for n in filter_l1_norms(model.state_dict()).values())


def layer_invalid(run: Run, thresholds: list[float]) -> tuple[str, list[LayerStats]] | None:
    """Per-layer invalid filters of peer 0 in the run's newest checkpoint (None without checkpoints)."""
    if not (run.path / "checkpoints").is_dir():
        return None
    try:
        states = peer_states(run.path, peer=0)
    except InputError:
        return None
    label, state = next(iter(states.items()))
    return label, analyze_state(state, thresholds, DEFAULT_ENTROPY_BELOW, run.cfg.graft.bins)


def name_runs(runs: list[Run]) -> None:
    """Short unique names: the directory name, with as many parent directories as it takes."""
    parts = [r.path.resolve().parts for r in runs]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            break
        depth += 1
    for r, p in zip(runs, parts, strict=True):
        r.name = "/".join(p[-depth:])


# ------------------------------------------------------------------------------------------ numbers
def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


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


# ------------------------------------------------------------------------------------------ plots
DPI = 110
TICK_PT = 9.0  # tick labels at DPI 110: 13.75 px per em, capitals ~10 px, readable at 100 % zoom
ROW_IN = 0.16  # height of one layer's row in the per-layer heat maps (17.6 px: a 9 pt label fits)
MAX_ROWS_IN = 24.0  # taller than this, only every k-th layer is named
MARKERS = "osD^vP*X"


def _pyplot():  # noqa: ANN202 - the matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"xtick.labelsize": TICK_PT, "ytick.labelsize": TICK_PT, "legend.fontsize": TICK_PT,
                         "axes.titlesize": 10, "axes.labelsize": 10})
    return plt


def _save(fig, path: Path, **kw: Any) -> None:  # noqa: ANN001 - a matplotlib Figure
    fig.savefig(path, dpi=DPI, **kw)
    _pyplot().close(fig)


def _series_style(i: int, length: int) -> dict[str, Any]:
    """Series that coincide stay visible (grafted peers often hold the same values, every run starts with 0
    invalid filters): each has its own hollow marker, earlier series larger so later ones sit inside them,
    and on long series the markers of different series fall on different epochs."""
    every = max(1, length // 15)
    return {"marker": MARKERS[i % len(MARKERS)], "markersize": max(5.0, 10.0 - 1.5 * i), "fillstyle": "none",
            "markeredgewidth": 1.2, "markevery": (i % every, every) if every > 1 else None}


def _epoch_axis(ax) -> None:  # noqa: ANN001 - a matplotlib Axes
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _layer_rows(names: list[str]) -> tuple[float, int]:
    """(height in inches of the layer rows, name every k-th layer) for a heat map with one row per layer."""
    every = max(1, math.ceil(len(names) * ROW_IN / MAX_ROWS_IN))
    return min(MAX_ROWS_IN, len(names) * ROW_IN), every


def length_warning(runs: list[Run]) -> str | None:
    """Runs of different lengths side by side: their final and best values are not comparable."""
    done = {r.name: max(r.epochs) if r.epochs else 0 for r in runs}
    if len(set(done.values())) < 2:
        return None
    return ("the runs cover different numbers of epochs (" + ", ".join(f"{n}: {e}" for n, e in done.items())
            + "); their final and best values are not comparable")


def plot_accuracy(runs: list[Run], path: Path) -> None:
    plt = _pyplot()
    cols = min(3, len(runs))
    nrows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False, sharey=True)
    for ax, r in zip(axes.flat, runs, strict=False):
        for i, p in enumerate(r.peers):
            e, a = zip(*r.accuracy(p), strict=True)
            ax.plot(e, a, lw=1.2, label=f"peer {p}", **_series_style(i, len(e)))
        if len(r.peers) > 1 and r.ensemble:
            e = sorted(r.ensemble)
            ax.plot(e, [r.ensemble[x] for x in e], "k--", lw=1.6, label="ensemble")
        ax.set_title(f"{r.name}\n{r.method}")
        _epoch_axis(ax)
        ax.legend(loc="lower right")
    for ax in axes[:, 0]:
        ax.set_ylabel("test top-1 (%)")
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    fig.tight_layout()
    _save(fig, path)


def plot_invalid(runs: list[Run], thresholds: list[float], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(thresholds), figsize=(5.5 * len(thresholds), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, t in zip(axes[0], thresholds, strict=True):
        series = 0
        for i, r in enumerate(runs):
            for j, p in enumerate(r.peers):
                pts = [(e, r.rows[e, p].get(f"invalid_{t:g}")) for e in r.epochs if (e, p) in r.rows]
                pts = [(e, n) for e, n in pts if n is not None]
                if pts:
                    e, n = zip(*pts, strict=True)
                    ax.plot(e, n, styles[j % len(styles)], color=colors[i % len(colors)], lw=1.2,
                            label=f"{r.name} peer {p}" + (" (baseline)" if r.is_baseline else ""),
                            **_series_style(series, len(e)))
                    series += 1
        total = {r.filters for r in runs}
        of = f" of {total.pop()}" if len(total) == 1 and None not in total else ""
        ax.set_title(f"filters with l1 norm < {t:g}{of}")
        _epoch_axis(ax)
        ax.set_ylabel("invalid filters")
        top = max(1.0, ax.get_ylim()[1])
        ax.set_ylim(bottom=-0.05 * top, top=top)  # a series at 0 is drawn above the axis, not on it
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_training(runs: list[Run], path: Path) -> None:
    """Train loss (log scale) and learning rate per epoch: every peer of every run, one colour per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, key, label in zip(axes[0], ("train_loss", "lr"), ("train loss", "learning rate"), strict=True):
        series = 0
        for i, r in enumerate(runs):
            for j, p in enumerate(r.peers):
                pts = [(e, r.rows[e, p].get(key)) for e in r.epochs if (e, p) in r.rows]
                pts = [(e, v) for e, v in pts if isinstance(v, int | float) and v > 0 and math.isfinite(v)]
                if pts:
                    e, v = zip(*pts, strict=True)
                    ax.plot(e, v, styles[j % len(styles)], color=colors[i % len(colors)], lw=1.2,
                            label=f"{r.name} peer {p}", **_series_style(series, len(e)))
                    series += 1
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per epoch" + (" (at the epoch's last step)" if key == "lr" else ""))
        _epoch_axis(ax)
    axes[0][1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    _save(fig, path, bbox_inches="tight")


def plot_layer_invalid(layers: dict[str, tuple[str, list[LayerStats]]], thresholds: list[float], path: Path
                       ) -> None:
    """Invalid filters per conv layer of peer 0 (newest checkpoint): a heat map with one row per layer (named
    horizontally, so even resnet110's 109 convs read), one column per run and one panel per threshold; the
    colour is the share of the layer's filters that are invalid, the number in a cell their count."""
    plt = _pyplot()
    order = list(dict.fromkeys(st.name for _, stats in layers.values() for st in stats))
    by_run = {name: {st.name: st for st in stats} for name, (_, stats) in layers.items()}
    rows_in, every = _layer_rows(order)
    width = 1.0 + 1.3 * len(layers)
    fig, axes = plt.subplots(1, len(thresholds), figsize=(2.2 + width * len(thresholds) + 1.2, rows_in + 1.8),
                             squeeze=False, sharey=True, layout="constrained")
    shares = [st.invalid[f"{t:g}"] / max(1, st.filters) for t in thresholds for _, stats in layers.values()
              for st in stats]
    cmap = plt.get_cmap("Reds").with_extremes(bad="0.85")  # grey: a layer the run's model does not have
    top = max(0.1, *shares)
    image = None
    for ax, t in zip(axes[0], thresholds, strict=True):
        share = [[float("nan")] * len(layers) for _ in order]
        for j, name in enumerate(layers):
            for i, layer in enumerate(order):
                st = by_run[name].get(layer)
                if st is not None:
                    count = st.invalid[f"{t:g}"]
                    share[i][j] = count / max(1, st.filters)
                    if count and every == 1:
                        ax.text(j, i, str(count), ha="center", va="center", fontsize=TICK_PT - 1,
                                color="white" if share[i][j] > 0.55 * top else "black")
        image = ax.imshow(share, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0.0, vmax=top)
        ax.set_title(f"l1 norm < {t:g}")
        ax.set_xticks(range(len(layers)), list(layers))
        ax.set_xticks([x + 0.5 for x in range(len(layers) - 1)], minor=True)
        ax.grid(which="minor", axis="x", color="0.6", lw=0.8)
        ax.tick_params(which="minor", length=0)
    axes[0][0].set_yticks(range(0, len(order), every), [_short(n) for n in order[::every]])
    axes[0][0].set_ylabel("conv layer" + (f" (every {every}th named)" if every > 1 else ""))
    fig.colorbar(image, ax=axes[0].tolist(), label="share of the layer's filters that are invalid", shrink=0.9)
    labels = "; ".join(f"{name}: {label}" for name, (label, _) in layers.items())
    fig.suptitle(f"invalid filters per conv layer (count in each cell), peer 0, newest checkpoint\n{labels}")
    _save(fig, path, bbox_inches="tight")


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


def graft_matrix(run: Run, peer: int, key: str) -> tuple[list[str], list[tuple[int, int]], list[list[float]]]:
    """(layer names, (epoch, step) of every graft point, values[layer][point]) of one peer."""
    rows = sorted((g for g in run.grafts if g["peer"] == peer), key=lambda g: g["step"])
    if not rows:
        return [], [], []
    names = [layer["name"] for layer in rows[0]["layers"]]
    values = [[float("nan")] * len(rows) for _ in names]
    for j, g in enumerate(rows):
        for i, layer in enumerate(g["layers"][: len(names)]):
            values[i][j] = layer[key]
    return names, [(g["epoch"], g["step"]) for g in rows], values


def plot_dgconv_groups(run: Run, path: Path) -> bool:
    """The learning dynamics of the group numbers (GroupNet's figure): per peer, each DGConv layer's
    group count by epoch, on a log2 axis since counts are powers of two. False for runs without DGConv."""
    series = {p: [(e, run.rows[e, p]["dgconv_groups"]) for e in run.epochs
                  if "dgconv_groups" in run.rows.get((e, p), {})] for p in run.peers}
    if not any(series.values()):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4), squeeze=False, sharey=True)
    for ax, (p, rows) in zip(axes.flat, series.items(), strict=True):
        epochs = [e for e, _ in rows]
        for layer, counts in enumerate(zip(*(g for _, g in rows), strict=True)):
            ax.plot(epochs, counts, lw=1.0, marker=".", label=f"DGConv {layer}")
        ax.set_yscale("log", base=2)
        ax.set_title(f"{run.name}: peer {p}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("groups")
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    _save(fig, path, bbox_inches="tight")
    return True


def plot_graft_heatmap(run: Run, key: str, path: Path) -> bool:
    """Heat map of ``alpha`` or ``h_self`` per layer (rows) and graft point (columns), one panel per peer."""
    plt = _pyplot()
    peers = sorted({g["peer"] for g in run.grafts})
    if not peers:
        return False
    names = graft_matrix(run, peers[0], key)[0]
    rows_in, every = _layer_rows(names)
    fig, axes = plt.subplots(1, len(peers), figsize=(2.2 + 4.2 * len(peers), rows_in + 1.6), squeeze=False,
                             sharey=True, layout="constrained")
    if key == "alpha":
        a = run.cfg.graft.a
        opts: dict[str, Any] = {"cmap": "RdBu_r", "vmin": 0.5 - a / 2, "vmax": 0.5 + a / 2}
        label = "alpha (share a layer keeps of itself)"
    else:
        opts = {"cmap": "viridis"}
        label = "entropy H of the layer's weights (nats)"
    image = None
    for ax, p in zip(axes[0], peers, strict=True):
        _, points, values = graft_matrix(run, p, key)
        image = ax.imshow(values, aspect="auto", interpolation="nearest", **opts)
        ax.set_title(f"peer {p}")
        ax.set_xlabel("graft point (epoch)")
        ticks = list(range(0, len(points), max(1, len(points) // 8)))
        ax.set_xticks(ticks, [str(points[i][0]) for i in ticks])
    axes[0][0].set_yticks(range(0, len(names), every), [_short(n) for n in names[::every]])
    fig.colorbar(image, ax=axes[0].tolist(), label=label, shrink=0.9)
    fig.suptitle(f"{run.name}: {label}\n{run.method}")
    _save(fig, path, bbox_inches="tight")
    return True


def prune_results(runs: list[Run]) -> list[dict[str, Any]]:
    """The prune.json files directly below the run directories (the pruning command's --out)."""
    return [json.loads(p.read_text()) for r in runs for p in sorted(r.path.glob(f"*/{RESULTS_FILE}"))]


def plot_pruning(docs: list[dict[str, Any]], path: Path) -> bool:
    """Top-1 vs kept fraction, one line per (criterion, arm), averaged over peers and over runs."""
    points: dict[tuple[str, str], dict[float, list[float]]] = {}
    for doc in docs:
        for res in doc["results"]:
            line = points.setdefault((res["criterion"], doc["arm"]), {})
            line.setdefault(res["kept_fraction"], []).append(statistics.fmean(res["top1"].values()))
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (criterion, arm), line in sorted(points.items()):
        xs = sorted(line)
        ax.plot(xs, [statistics.fmean(line[x]) for x in xs], "--" if arm == "baseline" else "-", marker="o",
                ms=3, label=f"{criterion} ({arm})")
    ax.set_xscale("log")
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.set_xlabel("kept fraction (kernels, filters or BN channels, as the criterion counts)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _short(name: str) -> str:
    return name.removesuffix(".weight")


def _file_name(run: Run) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run.name)


# ------------------------------------------------------------------------------------------ sweeps
SWEEP_FILE = "sweep.json"  # written by hpcgraft.sweep: {"config", "overrides", "arms": {name: overrides}, "seeds"}


def load_sweep(path: str | Path) -> dict[str, dict[int, Run | None]]:
    """A sweep directory's runs: arm -> seed -> the run (None where it has not logged an epoch yet)."""
    p = Path(path)
    try:
        spec = json.loads((p / SWEEP_FILE).read_text())
        arms, seeds = list(spec["arms"]), [int(s) for s in spec["seeds"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{p / SWEEP_FILE} cannot be read ({exc}); give a directory made by python -m "
                         "hpcgraft.sweep") from None
    found: dict[str, dict[int, Run | None]] = {}
    for arm in arms:
        found[arm] = {}
        for seed in seeds:
            d = p / arm / f"seed{seed}"
            found[arm][seed] = load_run(d) if (d / METRICS).is_file() else None
    return found


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


# ------------------------------------------------------------------------------------------ the report
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcgraft.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (--out of hpcgraft.train)")
    ap.add_argument("--out", help="where to write the plots and summary.md (default: RUN_DIR/report of the first)")
    args = ap.parse_args(argv)
    if len(args.runs) == 1 and (Path(args.runs[0]) / SWEEP_FILE).is_file():  # a sweep: its table
        try:
            md = write_sweep_report(Path(args.runs[0]), check_output_dir(args.out or Path(args.runs[0]) / "report",
                                                                         "--out"))
        except InputError as exc:
            return report(PROG, exc)
        print(md.read_text(), end="")
        print(f"hpcgraft.report: wrote {md}")
        return 0
    try:
        runs = [load_run(p) for p in args.runs]
        out = check_output_dir(args.out or runs[0].path / "report", "--out")
    except InputError as exc:
        return report(PROG, exc)
    empty = [r.path for r in runs if not r.epochs]
    if empty:
        return report(PROG, f"{empty[0]} has no finished epoch yet; wait for one")
    name_runs(runs)
    warning = length_warning(runs)
    if warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)
    summary = write_report(runs, out)
    print(f"hpcgraft.report: wrote {summary} and {len(list(out.glob('*.png')))} plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
