"""Does a peer of R data-parallel replicas learn what a peer of one rank learns? Accuracy side by side.

For each seed, two real training runs of the same config with the same global batch per peer
(data.batch_size): 2 peers of one rank each (mpirun -np 2), and 2 peers x 2 replicas (mpirun -np 4,
dist.replicas=2, each replica taking half of every batch). Prints the final test accuracy of every
peer and of the ensemble, per seed and as mean +- standard deviation over seeds, and the difference
of the means against the seed-to-seed spread.

    .venv/bin/python tools/compare_replicas.py [--seeds 0 1 2] [--epochs 30] [--out runs/compare_replicas]
        [key=value ...]        (extra overrides for both runs, e.g. graft.level=filter)

The two runs cannot agree bit for bit: the replicas normalise with half-batch BatchNorm statistics,
draw their own augmentations, and average gradients in a different order.
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
MODES = {"1 rank per peer": (2, ["dist.replicas=1"]), "2 replicas per peer": (4, ["dist.replicas=2"])}


def train(ranks: int, out: Path, overrides: list[str]) -> tuple[dict, float]:
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-np", str(ranks), sys.executable, "-m", "hpcgraft.train",
           "--config", str(ROOT / "configs/digits.yaml"), "--out", str(out), "--restart", "log.progress=off",
           "checkpoint.enabled=false", *overrides]
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if r.returncode:
        sys.exit(f"compare_replicas: {' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = max(row["epoch"] for row in rows)
    final = {row["peer"]: row for row in rows if row["epoch"] == last}
    return {"peer 0": final[0]["test_acc"], "peer 1": final[1]["test_acc"],
            "ensemble": final[None]["ensemble_acc"]}, time.perf_counter() - start


def _stats(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} +- {spread:4.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "compare_replicas")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    print(f"digits, 2 peers, batch 64 per peer, {args.epochs} epochs, seeds {args.seeds} "
          f"{' '.join(args.overrides)}".rstrip(), flush=True)
    print(f"  {'seed':>4s}  {'mode':20s} {'peer 0':>7s} {'peer 1':>7s} {'ensemble':>8s} {'wall s':>7s}", flush=True)
    for seed in args.seeds:
        for mode, (ranks, extra) in MODES.items():
            out = args.out / f"seed{seed}-{mode.split()[0]}"
            acc, wall = train(ranks, out, [f"seed={seed}", f"train.epochs={args.epochs}", *extra, *args.overrides])
            results[mode].append(acc)
            print(f"  {seed:4d}  {mode:20s} {acc['peer 0']:7.2f} {acc['peer 1']:7.2f} {acc['ensemble']:8.2f} "
                  f"{wall:7.0f}", flush=True)
    print("mean +- standard deviation over seeds (test accuracy, %):")
    for mode, accs in results.items():
        peers = [a[k] for a in accs for k in ("peer 0", "peer 1")]
        print(f"  {mode:20s} peers {_stats(peers)}   ensemble {_stats([a['ensemble'] for a in accs])}")
    one, two = (list(results.values())[i] for i in (0, 1))
    for key, label in (("peer", "peers"), ("ensemble", "ensemble")):
        a = [x[k] for x in one for k in x if k.startswith(key)]
        b = [x[k] for x in two for k in x if k.startswith(key)]
        spread = max(statistics.stdev(a), statistics.stdev(b)) if len(a) > 1 else float("nan")
        print(f"difference of the means ({label}): {statistics.mean(b) - statistics.mean(a):+.2f} points; "
              f"seed-to-seed standard deviation {spread:.2f}")


if __name__ == "__main__":
    main()
