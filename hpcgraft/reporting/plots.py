"""The report's PNG plots (matplotlib, installed by ``pip install 'hpcgraft[report]'``).

Importing this module without matplotlib raises the :class:`~hpcgraft.errors.InputError` that names the
extra, so the report command can say so in one line before it reads any run.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from hpcgraft.errors import InputError
from hpcgraft.method.validity import LayerStats
from hpcgraft.reporting.runs import Run

try:
    import matplotlib  # noqa: F401 - the check only; _pyplot sets the backend when a plot is drawn
except ImportError:
    raise InputError("the report's plots need matplotlib, which is not installed; install it with "
                     "pip install 'hpcgraft[report]'") from None

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

