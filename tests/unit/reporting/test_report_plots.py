"""The report's figures on hand-made records shaped like a resnet110 run (109 conv layers plus fc, two peers):
labels that read at 100 % zoom, every layer named, series that do not hide each other, the train loss and
lr panels, and the warning for runs of different lengths. Real runs go through tests/e2e/test_report.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hpcgraft.cli import report
from hpcgraft.config import load_config
from hpcgraft.method.validity import analyze_state
from hpcgraft.models import create_model
from hpcgraft.reporting import plots, tables
from hpcgraft.reporting.runs import load_run, name_runs

MIN_PX = 12.0  # 9 pt at 110 dpi is 13.75 px per em


def layer_names() -> list[str]:
    state = create_model("resnet110", 10).state_dict()
    return [k for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)]


def write_run(path, mode: str, epochs: int, names: list[str]) -> None:
    path.mkdir(parents=True)
    cfg = load_config(None, [f"graft.mode={mode}", "model.name=resnet110", "data.name=cifar10",
                             f"train.epochs={epochs}"])
    (path / "config.yaml").write_text(cfg.to_yaml())
    rows, grafts = [], []
    for e in range(1, epochs + 1):
        for p in (0, 1):
            rows.append({"epoch": e, "peer": p, "step": 390 * e, "train_loss": 2 * math.exp(-e / 8), "train_acc": 50.0,
                         "test_acc": 40.0 + e, "lr": 0.1 / e, "alpha_mean": 0.5, "invalid_0.1": 0, "invalid_0.01": 0,
                         "seconds": 60.0})  # the peers agree and sit at 0: the lines that used to hide each other
            if mode == "peers":
                grafts.append({"epoch": e, "step": 390 * e, "peer": p, "source": f"peer {1 - p}", "level": "layer",
                               "seconds": 0.05, "alpha_mean": 0.5,
                               "layers": [{"name": n, "alpha": 0.5 + 0.1 * math.sin(i + e), "h_self": 2.0,
                                           "h_source": 2.0, "alpha_min": 0.5, "alpha_max": 0.5, "filters": 16}
                                          for i, n in enumerate(names)]})
        rows.append({"epoch": e, "peer": None, "step": 390 * e, "ensemble_acc": 41.0 + e})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if grafts:
        (path / "graft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in grafts))


@pytest.fixture
def figures(monkeypatch):
    """Every figure the report saves, kept open (and drawn) so that its texts can be measured."""
    kept = {}

    def keep(fig, path, **kw):
        fig.savefig(path, dpi=plots.DPI, **kw)
        kept[path.name] = fig

    monkeypatch.setattr(plots, "_save", keep)
    yield kept
    import matplotlib.pyplot as plt

    plt.close("all")


def labels(ax, axis: str) -> list:
    return [t for t in getattr(ax, f"get_{axis}ticklabels")() if t.get_visible() and t.get_text()]


def assert_readable(fig) -> None:
    """Every tick label of every panel is at least 9 pt at the saved resolution, and the named rows of a
    heat map are at least one label height apart (no overlap)."""
    fig.canvas.draw()
    for ax in fig.axes:
        for axis in ("x", "y"):
            for t in labels(ax, axis):
                assert t.get_fontsize() * plots.DPI / 72 >= MIN_PX, (ax.get_title(), t.get_text(), t.get_fontsize())
        named = [t.get_position()[1] for t in labels(ax, "y")]
        if len(named) > 20:  # a layer axis: the distance of neighbouring named rows, in pixels of the PNG
            ys = [ax.transData.transform((0, y))[1] * plots.DPI / fig.dpi for y in named]
            pitch = min(abs(a - b) for a, b in zip(ys, ys[1:], strict=False))
            assert pitch >= MIN_PX, (ax.get_title(), pitch)


def test_report_of_resnet110_runs_reads_at_full_size_and_warns_about_their_lengths(tmp_path, figures, capsys):
    names = layer_names()
    write_run(tmp_path / "base", "none", 6, names)
    write_run(tmp_path / "graft", "peers", 5, names)
    assert report.main([str(tmp_path / "base"), str(tmp_path / "graft"), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert ("hpcgraft.report: warning: the runs cover different numbers of epochs (base: 6, graft: 5); their "
            "final and best values are not comparable") in err
    assert "**Warning:** the runs cover different numbers of epochs" in (tmp_path / "rep" / "summary.md").read_text()
    assert {"accuracy.png", "invalid.png", "training.png", "graft_alpha.png", "graft_h_self.png"} <= set(figures)
    for fig in figures.values():
        assert_readable(fig)

    alpha = figures["graft_alpha.png"].axes[0]
    assert [t.get_text() for t in labels(alpha, "y")] == [n.removesuffix(".weight") for n in names]  # all 110

    training = figures["training.png"].axes
    assert [ax.get_ylabel() for ax in training[:2]] == ["train loss", "learning rate"]
    assert len(training[0].get_lines()) == 4 and all(ax.get_yscale() == "log" for ax in training[:2])
    lr = [line for line in training[1].get_lines() if line.get_label() == "graft peer 1"][0]
    assert list(lr.get_ydata()) == pytest.approx([0.1 / e for e in range(1, 6)])

    # four series at 0 (two runs x two peers): each keeps its own marker, so none hides another
    invalid = figures["invalid.png"].axes[0]
    styles = {(line.get_marker(), line.get_markersize()) for line in invalid.get_lines()}
    assert len(invalid.get_lines()) == 4 and len(styles) == 4
    assert invalid.get_ylim()[0] < 0  # the series at 0 lie above the axis line


def test_only_runs_of_different_lengths_are_warned_about(tmp_path):
    names = layer_names()[:3]
    for name, epochs in (("a", 3), ("b", 3), ("c", 2)):
        write_run(tmp_path / name, "none", epochs, names)
    runs = [load_run(tmp_path / n) for n in "abc"]
    name_runs(runs)
    assert tables.length_warning(runs[:2]) is None
    assert tables.length_warning(runs) == ("the runs cover different numbers of epochs (a: 3, b: 3, c: 2); their "
                                           "final and best values are not comparable")


def test_invalid_filters_of_every_resnet110_layer_are_named_and_counted(tmp_path, figures):
    state = create_model("resnet110", 10).state_dict()
    convs = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 4]
    with torch.no_grad():
        state[convs[5]][:3] *= 1e-6  # three dead filters in one layer
    stats = analyze_state(state, [0.1, 0.01], 0.5)
    plots.plot_layer_invalid({"base": ("peer 0", stats), "graft": ("peer 0", stats[:-1])}, [0.1, 0.01],
                              tmp_path / "invalid_layers.png")
    fig = figures["invalid_layers.png"]
    assert_readable(fig)
    ax = fig.axes[0]
    named = labels(ax, "y")
    assert [t.get_text() for t in named] == [c.removesuffix(".weight") for c in convs] and len(named) == 109
    assert all(t.get_rotation() == 0 for t in named)
    cells = [(t.get_text(), t.get_position()) for t in ax.texts]
    assert cells == [("3", (0, 5)), ("3", (1, 5))]  # the count, in both runs' column, on the layer's row
