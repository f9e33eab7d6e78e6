"""Does grafting prune better? Baseline vs grafted peers on the digits, pruned by LEAN / IndivL1 / bn.

    python tools/study_prune.py [--out runs/study_prune] [--seeds 0 1 2] [--epochs 8] [--finetune-epochs 1]
        [--finetune-lr 0.01] [--keep 0.02,0.1,0.5] [--criteria lean,indiv_l1,bn]

Per seed and arm (baseline: graft.mode=none; grafted: graft.mode=peers), K=2 peers train with
configs/digits.yaml and the early-bird monitor (prune.monitor=bn) under mpirun, then
``python -m hpcgraft.prune RUN --criterion ... --keep ... --finetune-epochs N --out RUN/prune`` (mpirun,
one rank per peer) prunes and fine-tunes each peer. Prints a Markdown table (mean +- sample std over
the seeds of the peers' mean top-1, and the early-bird epoch of each peer from metrics.jsonl) to paste
into docs/pruning.md as measured, whatever it shows; also OUT/study.md and the per-seed numbers in
OUT/study.json. ``python -m hpcgraft.report RUN_DIR ...`` on the run directories plots top-1 against
the kept fraction.
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
QUIET = ["log.progress=off", "dist.threads=1"]


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


def early_birds(run_dir: Path) -> list[int | None]:
    """Each peer's early-bird epoch at the end of training (the monitor's eb_epoch; None: not found)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = max(r["epoch"] for r in rows)
    return [r.get("eb_epoch") for r in sorted((r for r in rows if r["epoch"] == last and r["peer"] is not None),
                                                key=lambda r: r["peer"])]


def stat(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} +- {statistics.stdev(values):.1f}"


def note(args: argparse.Namespace, wall: float) -> str:
    return (f"Top-1 (%) of the peers (mean over K=2 peers, then mean +- std over seeds {args.seeds}), digits, "
            f"{args.epochs} training epochs; per arm right after pruning and after {args.finetune_epochs} "
            f"fine-tune epoch(s) at lr {args.finetune_lr:g}; wall time {wall:.0f} s.")


def table(found: dict[str, dict[int, dict]], criteria_text: str, keep_text: str) -> str:
    criteria, keeps = criteria_text.split(","), [float(k) for k in keep_text.split(",")]

    def cell(arm: str, criterion: str | None, keep: float | None, key: str = "top1") -> str:
        values = []
        for seed in found[arm].values():
            doc = seed["prune"]
            if criterion is None:
                values.append(statistics.fmean(doc["unpruned"].values()))
            else:
                res = next(r for r in doc["results"] if r["criterion"] == criterion and r["keep"] == keep)
                values.append(statistics.fmean(res[key].values()))
        return stat(values)

    lines = ["| criterion | keep | " + " | ".join(f"{a} pruned | {a} fine-tuned" for a in ARMS) + " |",
             "|---|---|" + "---|---|" * len(ARMS),
             "| unpruned | 1 | " + " | ".join(f"{cell(a, None, None)} | " for a in ARMS) + " |"]
    for c in criteria:
        for k in keeps:
            lines.append(f"| {c} | {k:g} | " + " | ".join(f"{cell(a, c, k, 'top1_pruned')} | {cell(a, c, k)}"
                                                         for a in ARMS) + " |")
    eb = {a: [e for s in found[a].values() for e in s["eb_epoch"]] for a in ARMS}
    found_eb = {a: [float(e) for e in eb[a] if e is not None] for a in ARMS}
    lines.append("| early-bird epoch (bn, p=0.5) | | " + " | ".join(
        f"{stat(found_eb[a])} ({len(found_eb[a])}/{len(eb[a])} peers) | " for a in ARMS) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "study_prune")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8, help="training epochs (>= 6 for an early bird of window 5)")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--finetune-lr", type=float, default=0.01,
                    help="train.lr of the fine-tune (the run's 0.1 restarted undoes much of a mild pruning)")
    ap.add_argument("--keep", default="0.02,0.1,0.5")
    ap.add_argument("--criteria", default="lean,indiv_l1,bn")
    ap.add_argument("--table-only", action="store_true", help="print the table of OUT/study.json again")
    args = ap.parse_args()
    started = time.perf_counter()
    if args.table_only:  # the table again from a finished study's numbers
        saved = json.loads((args.out / "study.json").read_text())
        found = {a: {int(s): v for s, v in runs.items()} for a, runs in saved["runs"].items()}
        print(note(args, saved["wall_s"]) + "\n\n" + table(found, args.criteria, args.keep))
        return 0
    found: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    for seed in args.seeds:
        for arm, overrides in ARMS.items():
            run = args.out / f"{arm}-seed{seed}"
            t_train = mpirun(["-m", "hpcgraft.train", "--config", str(ROOT / "configs" / "digits.yaml"), "--out",
                              str(run), "--restart", f"seed={seed}", f"train.epochs={args.epochs}",
                              "prune.monitor=bn", f"checkpoint.interval={args.epochs}", "checkpoint.keep=1",
                              *QUIET, *overrides], f"training {run}")
            t_prune = mpirun(["-m", "hpcgraft.prune", str(run), "--criterion", args.criteria, "--keep", args.keep,
                              "--finetune-epochs", str(args.finetune_epochs), "--out", str(run / "prune"),
                              f"train.lr={args.finetune_lr:g}", *QUIET], f"pruning {run}")
            doc = json.loads((run / "prune" / "prune.json").read_text())
            found[arm][seed] = {"prune": doc, "eb_epoch": early_birds(run), "seconds": [t_train, t_prune]}
            print(f"study: {arm} seed {seed}: trained in {t_train:.0f} s, pruned in {t_prune:.0f} s", flush=True)
    wall = time.perf_counter() - started
    text = note(args, wall) + "\n\n" + table(found, args.criteria, args.keep)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.md").write_text(text + "\n")
    (args.out / "study.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "wall_s": wall, "runs": found}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
