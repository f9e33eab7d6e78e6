"""The pruning study: every criterion on grafted and baseline peers of two networks, tables and a plot.

    python tools/study_prune.py [--out runs/study_prune] [--models digits_resnet,resnet20] [--seeds 0 1 2]
        [--epochs 8] [--finetune-epochs 1] [--finetune-lr 0.01] [--keep 0.5,0.2,0.1,0.05]
        [--criteria l1,entropy,bn,indiv_l1,indiv_sv,lean]

Networks: the digits ResNet on the 8x8 digits (configs/digits.yaml) and ResNet-20 on the same images
resized to 32x32 over 3 channels (``data.name=digits32``), so a CIFAR architecture with its shortcuts is
covered. Per network, seed and arm (baseline: graft.mode=none; grafted: graft.mode=peers), K=2 peers
train under mpirun with the early-bird monitor, then ``python -m hpcgraft.prune RUN --criterion ...
--keep ... --finetune-epochs N`` (mpirun, one rank per peer) prunes each peer, removes the redundant
kernels (the default), and measures top-1 right after pruning and after fine-tuning.

Writes OUT/study.md (Markdown tables: mean +- sample std over the seeds of the peers' mean top-1, and the
kernels each criterion chose and those left), OUT/study.png (top-1 after fine-tuning against the fraction
of kernels left, one panel per network) and the per-seed numbers in OUT/study.json; ``--table-only``
remakes the tables and the plot from OUT/study.json. A finished run (its prune.json exists) is not redone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"baseline": ["graft.mode=none"], "grafted": ["graft.mode=peers"]}
MODELS = {"digits_resnet": ["model.name=digits_resnet", "data.name=digits"],
          "resnet20": ["model.name=resnet20", "data.name=digits32"]}
QUIET = ["log.progress=off", "dist.threads=1"]
CRITERIA = "l1,entropy,bn,indiv_l1,indiv_sv,lean"


def mpirun(args: list[str], what: str) -> float:
    """One command under mpirun -np 2; returns its wall time (a failure stops the study)."""
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-np", "2", sys.executable, *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"study: {what} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def stat(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def result(doc: dict, criterion: str, keep: float) -> dict:
    return next(r for r in doc["results"] if r["criterion"] == criterion and r["keep"] == keep)


def per_seed(found: dict[str, dict], model: str, arm: str, criterion: str | None, keep: float | None,
             key: str) -> list[float]:
    """One value per seed: the peers' mean of ``key`` (top-1, or the kernels left as a fraction)."""
    values = []
    for doc in found[model][arm].values():
        if criterion is None:
            values.append(statistics.fmean(doc["unpruned"].values()))
            continue
        res = result(doc, criterion, keep)
        if key == "kernels":
            values.append(statistics.fmean(res["kernels"]["kept"].values()) / res["kernels"]["total"])
        elif key == "chosen":
            values.append(statistics.fmean(res["kernels"]["kept_by_criterion"].values()) / res["kernels"]["total"])
        else:
            values.append(statistics.fmean(res[key].values()))
    return values


def table(found: dict[str, dict], model: str, criteria: list[str], keeps: list[float]) -> str:
    arms = list(ARMS)
    lines = ["| criterion | keep | kernels chosen -> left (%) | "
             + " | ".join(f"{a} pruned | {a} fine-tuned" for a in arms) + " |",
             "|---|---|---|" + "---|---|" * len(arms),
             "| unpruned | 1 | 100 | " + " | ".join(f"{stat(per_seed(found, model, a, None, None, ''))} | "
                                                 for a in arms) + " |"]
    for c in criteria:
        for k in keeps:
            both = [v for a in arms for v in per_seed(found, model, a, c, k, "chosen")]
            left = [v for a in arms for v in per_seed(found, model, a, c, k, "kernels")]
            kernels = f"{100 * statistics.fmean(both):.1f} -> {100 * statistics.fmean(left):.1f}"
            cells = [stat(per_seed(found, model, a, c, k, key)) for a in arms for key in ("top1_pruned", "top1")]
            lines.append(f"| {c} | {k:g} | {kernels} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(found: dict[str, dict], criteria: list[str], keeps: list[float], path: Path) -> None:
    """Top-1 after fine-tuning against the kernels left, one panel per network, one line per criterion
    and arm (solid grafted, dashed baseline), error bars the std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(found), figsize=(6 * len(found), 4.5), squeeze=False)
    for ax, model in zip(axes[0], found, strict=True):
        for i, c in enumerate(criteria):
            for arm, style in (("grafted", "-"), ("baseline", "--")):
                xs = [statistics.fmean(per_seed(found, model, arm, c, k, "kernels")) for k in keeps]
                ys = [per_seed(found, model, arm, c, k, "top1") for k in keeps]
                ax.errorbar(xs, [statistics.fmean(y) for y in ys],
                            yerr=[statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys],
                            fmt=style + "o", color=f"C{i}", label=f"{c} ({arm})", markersize=3, capsize=2)
        ax.set_xscale("symlog", linthresh=1e-3)  # linear near 0: a criterion that leaves no kernel still shows
        ax.set_xlabel("fraction of conv kernels left (after removing redundant kernels)")
        ax.set_ylabel("top-1 (%) after fine-tuning")
        ax.set_title(model)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args: argparse.Namespace, found: dict[str, dict], wall: float) -> str:
    criteria, keeps = args.criteria.split(","), [float(k) for k in args.keep.split(",")]
    head = (f"Top-1 (%) of the peers (mean over K=2 peers, then mean +- sample std over seeds {args.seeds}), "
            f"{args.epochs} training epochs; per arm right after pruning and after {args.finetune_epochs} "
            f"fine-tune epoch(s) at lr {args.finetune_lr:g}; redundant kernels removed; kernels as % of the "
            f"network's conv kernels (mean over arms, seeds and peers); wall time {wall:.0f} s.")
    parts = [head] + [f"### {m}\n\n" + table(found, m, criteria, keeps) for m in found]
    plot(found, criteria, keeps, args.out / "study.png")
    return "\n\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "study_prune")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {','.join(MODELS)}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8, help="training epochs (>= 6 for an early bird of window 5)")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--finetune-lr", type=float, default=0.01,
                    help="train.lr of the fine-tune (the run's 0.1 restarted undoes much of a mild pruning)")
    ap.add_argument("--keep", default="0.5,0.2,0.1,0.05")
    ap.add_argument("--criteria", default=CRITERIA)
    ap.add_argument("--table-only", action="store_true", help="remake the tables and plot from OUT/study.json")
    args = ap.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {unknown[0]!r}; use of {','.join(MODELS)}")
    if args.table_only:
        saved = json.loads((args.out / "study.json").read_text())
        print(report(args, saved["runs"], saved["wall_s"]))
        return 0
    started = time.perf_counter()
    found: dict[str, dict] = {m: {arm: {} for arm in ARMS} for m in models}
    for model in models:
        for seed in args.seeds:
            for arm, overrides in ARMS.items():
                run = args.out / f"{model}-{arm}-seed{seed}"
                pruned = run / "prune" / "prune.json"
                if not pruned.exists():
                    mpirun(["-m", "hpcgraft.train", "--config", str(ROOT / "configs" / "digits.yaml"), "--out",
                            str(run), "--restart", f"seed={seed}", f"train.epochs={args.epochs}",
                            "prune.monitor=bn", f"checkpoint.interval={args.epochs}", "checkpoint.keep=1",
                            *MODELS[model], *QUIET, *overrides], f"training {run}")
                    mpirun(["-m", "hpcgraft.prune", str(run), "--criterion", args.criteria, "--keep", args.keep,
                            "--finetune-epochs", str(args.finetune_epochs), "--out", str(run / "prune"),
                            "--set", f"train.lr={args.finetune_lr:g}", *QUIET], f"pruning {run}")
                found[model][arm][str(seed)] = json.loads(pruned.read_text())
                print(f"study: {model} {arm} seed {seed} done after {time.perf_counter() - started:.0f} s",
                      flush=True)
    wall = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "wall_s": wall, "runs": found}, indent=1) + "\n")
    text = report(args, found, wall)
    print(text)
    (args.out / "study.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
