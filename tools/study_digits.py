"""A small controlled study on the digits data: baseline vs grafting vs cultivation, several seeds each.

    python tools/study_digits.py [--out runs/study_digits] [--seeds 3] [--arms ...] [--epochs 30]

A call of the sweep (``python -m hpcgraft.sweep digits --arms ... --seeds N``, see hpcgraft/launch/arms.py for
what each arm overrides): every arm trains K=2 peers with configs/digits.yaml (real mpirun ranks), changing
only what the arm is about; each seed changes initialisation, data order and augmentation together.
Re-running resumes an interrupted study and skips the runs that finished. The Markdown table it prints
(mean and sample standard deviation over the seeds of the final test accuracy per peer, of the peers'
mean and of the ensemble, and of the invalid-filter counts over peers and seeds) is meant to be pasted
into docs/running.md as measured, whatever it shows. Runs go under --out (one directory per arm and seed,
readable by ``python -m hpcgraft.report``); the table is also written to OUT/study.md with the per-seed
numbers in OUT/study.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpcgraft.cli import sweep  # noqa: E402
from hpcgraft.reporting.runs import Run, load_run  # noqa: E402

ARMS = ("baseline", "grafting", "cultivation", "grafting+cultivation")
THRESHOLDS = ("0.1", "0.01")


def final_numbers(run: Run) -> dict:
    last = max(run.epochs)
    return {
        "peers": {p: run.rows[last, p]["test_acc"] for p in run.peers},
        "ensemble": run.ensemble.get(last),
        "invalid": {t: [run.rows[last, p][f"invalid_{t}"] for p in run.peers] for t in THRESHOLDS},
        "filters": run.filters,
    }


def spread(values: list[float], spec: str = ".2f") -> str:
    """mean ± sample standard deviation."""
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{spec}} ± {sd:{spec}}"


def table(results: dict[str, list[dict]], peers: int, seeds: list[int], epochs: int, filters: int | None) -> str:
    inv = [f"invalid @{t} (of {filters})" for t in THRESHOLDS]
    head = ["arm", *[f"peer {p} top-1" for p in range(peers)], "mean of peers", "ensemble", *inv]
    lines = [f"Digits study: {peers} peers, configs/digits.yaml, {epochs} epochs, seeds {seeds}; final test "
             f"top-1 (%) and invalid filters (l1 norm below the threshold) as mean ± sample std over the "
             f"{len(seeds)} seeds (invalid counts over peers and seeds).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in results.items():
        cells = [arm]
        for p in range(peers):
            cells.append(spread([r["peers"][p] for r in runs]))
        cells.append(spread([statistics.fmean(r["peers"].values()) for r in runs]))
        cells.append(spread([r["ensemble"] for r in runs]))
        for t in THRESHOLDS:
            cells.append(spread([float(n) for r in runs for n in r["invalid"][t]], ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/study_digits", help="directory of the runs and the table")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm: 0..N-1")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(sweep.ARMS))
    ap.add_argument("--epochs", type=int, default=30, help="epochs per run (configs/digits.yaml: 30)")
    ap.add_argument("--peers", type=int, default=2, help="peers (MPI ranks) per run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    os.environ["OMP_NUM_THREADS"] = "1"
    rc = sweep.main(["digits", "--arms", ",".join(args.arms), "--seeds", str(args.seeds), "--np", str(args.peers),
                     "--out", str(out), f"train.epochs={args.epochs}", "checkpoint.enabled=false", "log.progress=off",
                     "dist.threads=1"])
    if rc != 0:
        return rc
    results: dict[str, list[dict]] = {}
    filters = None
    for arm in args.arms:
        for seed in seeds:
            numbers = final_numbers(load_run(out / arm / f"seed{seed}"))
            numbers.update(seed=seed)
            filters = numbers["filters"]
            results.setdefault(arm, []).append(numbers)
            print(f"study: {arm} seed {seed}: peers {[round(a, 2) for a in numbers['peers'].values()]}, ensemble "
                  f"{numbers['ensemble']:.2f}, invalid@0.1 {numbers['invalid']['0.1']}", file=sys.stderr, flush=True)
    text = table(results, args.peers, seeds, args.epochs, filters)
    total = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    text += (f"\n\n{len(args.arms) * args.seeds} runs in {total / 60:.1f} min wall, {cpu / 60:.1f} CPU-min over "
             f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end "
             f"(`python tools/study_digits.py`).")
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.md").write_text(text + "\n")
    (out / "study.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
