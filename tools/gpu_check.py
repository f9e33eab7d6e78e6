#!/usr/bin/env python
"""Every CUDA path of hpcgraft, checked on one machine in one go (run through tools/gpu_check.sh).

    bash tools/gpu_check.sh                   on a GPU machine (after tools/gpu_wheels.sh here)
    bash tools/gpu_check.sh --cpu --fast      the dry run CI executes, so that the check cannot rot

Items, each PASS or FAIL with its figures, in a summary at the end (and in OUT/gpu_check.txt):

1. env       versions of torch, CUDA, cuDNN, the GPU, MPI, and that every dependency imports
2. unit      tests/unit/training/test_device.py on the device (kernels, pinned staging, RNG state, autocast,
             channels-last)
3. graft     2 ranks on the one GPU train a digits epoch with cultivation, AMP and channels-last, then
             graft (layer and filter level): the grafted weights against the offline ``graft_state`` of
             the pre-graft states, on the device (must agree) and on the CPU (how far the GPU is)
4. resume    the training command under mpirun: a run stopped by SIGUSR1 (exit 75) and resumed
             against an uninterrupted one (bitwise on the CPU; on a GPU the difference is reported)
5. speed     tools/bench_train.py (hpcgraft's loop vs a bare loop; resnet32 CIFAR-shaped, resnet50 at
             224; AMP on and off) and tools/bench_graft.py (entropies vs the authors' per-bin loop, one
             graft round vs a raw Sendrecv of the same bytes; resnet56, resnet50)
6. compile   train.compile against the eager bare loop: resnet50 at batch 256 in bf16 + channels-last,
             eager and compiled (mode default: at this batch the GPU is busy, and CUDA graphs would only
             add memory), and resnet32 compiled with reduce-overhead (CUDA graphs: its small steps are
             launch-bound)
7. peers     tools/bench_train.py --peers 1,2,4,8 (P peers on one rank, sequential and batched), resnet32;
             SKIP where this bench_train.py has no --peers mode

The orchestrating process imports neither torch nor MPI (every item is a child process), so that no
MPI singleton of its own sits beside the mpirun jobs it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MPIRUN = str(Path(PY).parent / "mpirun")
DIGITS = str(ROOT / "configs/digits.yaml")


@dataclass
class Item:
    name: str
    ok: bool | None  # None: skipped (what it measures is not in this checkout)
    seconds: float
    figures: list[str] = field(default_factory=list)


@dataclass
class Check:
    device: str
    fast: bool
    out: Path
    items: list[Item] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        e = dict(os.environ)
        e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
        e["PATH"] = str(Path(PY).parent) + os.pathsep + e.get("PATH", "")
        e["HPCGRAFT_TEST_DEVICE"] = self.device
        e.pop("HPCGRAFT_INJECT", None)
        e.update(extra)
        return e

    def run(self, log: str, cmd: list[str], timeout: float, **extra: str) -> subprocess.CompletedProcess:
        """A child process; its output goes to OUT/<log>.log (and comes back for parsing)."""
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env(**extra), cwd=ROOT)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            p = subprocess.CompletedProcess(cmd, 124, out, err + f"\ngpu_check: timed out after {timeout:.0f} s")
        with open(self.out / f"{log}.log", "a") as f:
            f.write(f"$ {' '.join(cmd)}\n[exit {p.returncode}]\n{p.stdout}\n{p.stderr}\n")
        return p

    def item(self, name: str, fn: Callable[[], tuple[bool | None, list[str]]]) -> None:
        started = time.monotonic()
        try:
            ok, figures = fn()
        except Exception as exc:  # a broken item must not hide the others
            ok, figures = False, [f"{type(exc).__name__}: {exc}"]
        it = Item(name, ok, time.monotonic() - started, figures)
        self.items.append(it)
        print(f"{_verdict(ok)} {name} ({it.seconds:.0f} s)", flush=True)
        for line in figures:
            print(f"     {line}", flush=True)

    def summary(self) -> str:
        lines = [f"hpcgraft gpu_check: device {self.device}{' (fast dry run)' if self.fast else ''}, "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}"]
        for it in self.items:
            lines.append(f"{_verdict(it.ok)} {it.name} ({it.seconds:.0f} s)")
            lines += [f"     {line}" for line in it.figures]
        failed = [it.name for it in self.items if it.ok is False]
        skipped = sum(it.ok is None for it in self.items)
        lines.append(f"{len(self.items) - len(failed) - skipped} passed, {len(failed)} failed"
                     + (f": {', '.join(failed)}" if failed else "") + (f"; {skipped} skipped" if skipped else ""))
        return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return "SKIP" if ok is None else "PASS" if ok else "FAIL"


def tail(p: subprocess.CompletedProcess, n: int = 6) -> list[str]:
    return [line for line in (p.stdout + p.stderr).strip().splitlines()[-n:]]


# --------------------------------------------------------------------------------------------- items
ENV_PROBE = r"""
import importlib, json, sys
import torch
from mpi4py import MPI
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                 for i in range(torch.cuda.device_count())],
        "mpi": MPI.Get_library_version().splitlines()[0].strip(), "missing": []}
for mod in ("numpy", "h5py", "yaml", "mpi4py", "submitit", "tqdm", "PIL", "hpcgraft"):
    try:
        m = importlib.import_module(mod)
        info[mod] = getattr(m, "__version__", "?")
    except Exception as exc:
        info["missing"].append(f"{mod} ({type(exc).__name__}: {exc})")
print(json.dumps(info))
"""


def check_env(c: Check) -> tuple[bool, list[str]]:
    p = c.run("env", [PY, "-c", ENV_PROBE], 120)
    if p.returncode:
        return False, tail(p)
    info = json.loads(p.stdout.strip().splitlines()[-1])
    figures = [f"python {info['python']}, torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}",
               f"GPUs: {', '.join(info['gpus']) or 'none'}",
               f"MPI: {info['mpi']}; mpi4py {info.get('mpi4py')}, h5py {info.get('h5py')}, "
               f"numpy {info.get('numpy')}, submitit {info.get('submitit')}"]
    ok = not info["missing"] and (c.device == "cpu" or bool(info["gpus"]))
    if info["missing"]:
        figures.append("missing: " + "; ".join(info["missing"]) + " (add its wheel to tools/gpu_wheels.sh)")
    if not os.path.exists(MPIRUN):
        ok = False
        figures.append(f"no mpirun beside {PY} (the MPICH wheel installs it there)")
    return ok, figures


def check_unit(c: Check) -> tuple[bool, list[str]]:
    cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/training/test_device.py"]
    if c.fast:  # the whole file runs in the test suite anyway; the dry run checks that this item works
        cmd += ["-k", "packed or checkpoint_state"]
    p = c.run("unit", cmd, 300)
    counts = re.findall(r"(\d+) (passed|failed|error|skipped)", p.stdout)
    return p.returncode == 0, [", ".join(f"{n} {what}" for n, what in counts) or "no result"] + (
        tail(p, 15) if p.returncode else [])


def check_graft(c: Check) -> tuple[bool, list[str]]:
    result = c.out / "graft.json"
    p = c.run("graft", [MPIRUN, "-np", "2", PY, __file__, "rank-graft", "--device", c.device,
                        "--json", str(result)], 300)
    if p.returncode or not result.exists():
        return False, tail(p, 15)
    ok, figures = True, []
    for level, r in json.loads(result.read_text()).items():
        ok = ok and r["same_device_max_abs"] <= 1e-5 and r["alpha_max_diff_device"] <= 1e-5
        figures.append(f"{level}: MPI graft vs offline graft_state on {c.device}: max |dW| "
                       f"{r['same_device_max_abs']:.2e}, max |d alpha| {r['alpha_max_diff_device']:.2e}; "
                       f"vs offline on the CPU: max |dW| {r['cpu_max_abs']:.2e}, max |d alpha| "
                       f"{r['alpha_max_diff_cpu']:.2e} ({r['layers']} layers, {r['tensors']} tensors)")
    return ok, figures


def check_resume(c: Check) -> tuple[bool, list[str]]:
    """Uninterrupted vs stopped by SIGUSR1 (HPCGRAFT_INJECT: rank 0 signals itself after a given step)
    and resumed, with grafting, cultivation, AMP and channels-last."""
    epochs, stop_at = ("1", "10") if c.fast else ("3", "30")
    overrides = [f"train.epochs={epochs}", "graft.mode=peers", "cultivate.lambda=1", "dist.amp=true",
                 "dist.channels_last=true", f"dist.device={c.device}", "log.progress=off"]
    if c.fast:
        overrides += ["graft.interval_steps=8", "dist.threads=1"]  # grafts inside the one epoch
    work = c.out / "runs"

    def train(out: str, restart: bool = False, **extra: str) -> subprocess.CompletedProcess:
        cmd = [MPIRUN, "-np", "2", PY, "-m", "hpcgraft.train", "--config", DIGITS, "--out", str(work / out),
               *(["--restart"] if restart else []), *overrides]
        return c.run("resume", cmd, 300, **extra)

    full = train("full", restart=True)
    if full.returncode:
        return False, ["uninterrupted run failed:"] + tail(full, 10)
    stopped = train("stopped", restart=True, HPCGRAFT_INJECT=f"0:{stop_at}:usr1")
    if stopped.returncode != 75:
        return False, [f"stopped run: exit {stopped.returncode}, expected 75"] + tail(stopped, 10)
    resumed = train("stopped")
    if resumed.returncode or "resuming" not in resumed.stderr:
        return False, [f"resumed run: exit {resumed.returncode}"] + tail(resumed, 10)
    p = c.run("resume", [PY, __file__, "compare-runs", str(work / "full"), str(work / "stopped")], 120)
    if p.returncode:
        return False, tail(p, 10)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    where = re.findall(r"resuming .*\((.*)\)", resumed.stderr)
    figures = [f"stopped after step {stop_at} (exit 75), resumed ({where[-1] if where else '?'}), finished (exit 0)",
               f"final weights vs the uninterrupted run: {r['differing']} of {r['tensors']} tensors differ, "
               f"max |dW| {r['max_abs']:.2e}; test accuracy per peer {r['acc_full']} vs {r['acc_resumed']}"]
    bitwise = r["differing"] == 0 and r["acc_full"] == r["acc_resumed"]
    if c.device == "cpu":
        return bitwise, figures + ([] if bitwise else ["on the CPU the resumed run must be bitwise the same"])
    figures.append("bitwise equal" if bitwise else
                   "not bitwise: expected on a GPU (cuDNN picks kernels and atomics per run); what differs is above")
    return all(map(_finite, r["acc_resumed"])), figures


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def check_speed_train(c: Check) -> tuple[bool, list[str]]:
    cmd = [PY, "tools/bench_train.py", "--device", c.device, "--models", "resnet32,resnet50"]
    cmd += (["--rounds", "1", "--steps", "1", "--batch", "2", "--pixels", "32", "--amp", "off"] if c.fast else
            ["--rounds", "5", "--amp", "off,on", "--threads", "4"])
    p = c.run("speed_train", cmd, 420)
    table = [line for line in p.stdout.splitlines() if line.strip()]
    return p.returncode == 0, table if p.returncode == 0 else tail(p, 15)


PEERS_TARGET = 3.0  # aggregate images/s of 4 batched ResNet-32 peers over one peer's, on a GPU


def _bench_rows(p: subprocess.CompletedProcess) -> list[str]:
    """The table of a tools/bench_train.py run (its header line and rows), else the run's last lines."""
    if p.returncode:
        return tail(p, 15)
    return [line for line in p.stdout.splitlines() if line.strip() and not line.startswith(("torch ", "-----"))]


def check_speed_compile(c: Check) -> tuple[bool, list[str]]:
    """Each run is its own process, so that one that fails or runs out of time leaves the others' rows."""
    bench = [PY, "tools/bench_train.py", "--device", c.device]
    if c.fast:  # the eager ResNet-50 row in miniature, and a compile of the linear model (seconds, not minutes)
        runs = [["--models", "resnet50", "--batch", "2", "--pixels", "32", "--steps", "1", "--rounds", "1",
                 "--channels-last"],
                ["--models", "linear", "--steps", "2", "--rounds", "1", "--compile", "default"]]
    else:
        runs = [["--models", "resnet50", "--batch", "256", "--amp", "on", "--channels-last", "--compile", "off,default",
                 "--rounds", "3", "--threads", "4"],
                ["--models", "resnet32", "--compile", "reduce-overhead", "--rounds", "3", "--threads", "4"]]
    ok, figures = True, []
    for args in runs:
        p = c.run("speed_compile", bench + args, 150 if c.fast else 270)
        ok = ok and p.returncode == 0
        figures += _bench_rows(p)
    return ok, figures


def check_speed_peers(c: Check) -> tuple[bool, list[str]]:
    """P peers on one rank, stepped one after another, batched and as P processes; on the GPU, 4 batched
    ResNet-32 peers must reach PEERS_TARGET times one peer's images/s."""
    rows = c.out / "bench_peers.json"
    cmd = [PY, "tools/bench_train.py", "--device", c.device, "--json", str(rows)]
    cmd += (["--peers", "1,2", "--models", "digits_resnet", "--rounds", "1", "--steps", "2"] if c.fast
            else ["--peers", "1,2,4,8", "--models", "resnet32"])
    p = c.run("speed_peers", cmd, 120 if c.fast else 300)
    if p.returncode != 0:
        return False, _bench_rows(p)
    found = {r["peers"]: r for r in json.loads(rows.read_text())}
    if c.fast:
        return True, _bench_rows(p)
    ratio = found[4]["batched"] / found[1]["sequential"]
    return ratio >= PEERS_TARGET, [*_bench_rows(p), f"4 batched peers: {ratio:.2f}x one peer's images/s "
                                                     f"(target >= {PEERS_TARGET:g}x)"]


def check_speed_graft(c: Check) -> tuple[bool, list[str]]:
    cmd = [PY, "tools/bench_graft.py", "--device", c.device, "--json", str(c.out / "bench_graft.json")]
    cmd += ["--models", "resnet56", "--repeats", "1"] if c.fast else ["--models", "resnet56", "resnet50",
                                                                     "--repeats", "7"]
    p = c.run("speed_graft", cmd, 420)
    keep = [line for line in p.stdout.splitlines() if line.strip() and not line.startswith(("(a) xfer", "In the"))]
    return p.returncode == 0, keep if p.returncode == 0 else tail(p, 15)


# ------------------------------------------------------------------------ the parts that run as ranks
def rank_graft(device: str, out: Path) -> None:
    """Under mpirun -np 2: each rank a peer on ``device``; train an epoch of the digits (cultivation,
    AMP, channels-last), graft with the real exchange, and compare on rank 0 with the offline math."""
    import torch
    from mpi4py import MPI

    from hpcgraft.comm.failure import StopRequest, abort_on_error
    from hpcgraft.comm.world import init_world
    from hpcgraft.config import load_config
    from hpcgraft.method import grafting
    from hpcgraft.training.loop import graft, train_one_epoch
    from hpcgraft.training.peer import build_peer, make_exchange
    from hpcgraft.training.peers import PeerSet

    comm = MPI.COMM_WORLD
    results = {}
    with abort_on_error(comm):
        for level in ("layer", "filter"):
            cfg = load_config(DIGITS, [f"dist.device={device}", "graft.mode=peers", f"graft.level={level}",
                                       "cultivate.lambda=1", "dist.amp=true", "dist.channels_last=true",
                                       "checkpoint.enabled=false", "log.progress=off", "dist.threads=1"])
            world = init_world(1, comm)
            peer = build_peer(cfg, world)
            peer.exchange = make_exchange(peer)
            stop = StopRequest(world.comm)
            train_one_epoch(peer, stop)
            stop.close()
            pre = {k: v.detach().cpu().clone() for k, v in peer.model.state_dict().items()}
            ps = PeerSet([peer], exchange=peer.exchange)  # rank 0's set collects every peer's graft rows
            graft(ps)
            post = {k: v.detach().cpu().clone() for k, v in peer.model.state_dict().items()}
            states = comm.gather((pre, post), root=0)
            if comm.Get_rank() != 0:
                continue
            rows = {r["peer"]: r for r in ps.graft_rows}
            r = dict(same_device_max_abs=0.0, cpu_max_abs=0.0, alpha_max_diff_device=0.0, alpha_max_diff_cpu=0.0)
            g = cfg.graft
            for me in range(2):
                mine, source = states[me][0], states[(me - 1) % 2][0]
                dev = torch.device(peer.device)
                on_dev, rep_dev = grafting.graft_state({k: v.to(dev) for k, v in mine.items()},
                                                       {k: v.to(dev) for k, v in source.items()},
                                                       a=g.a, c=g.c, bins=g.bins, level=level)
                on_cpu, rep_cpu = grafting.graft_state(mine, source, a=g.a, c=g.c, bins=g.bins, level=level)
                got = states[me][1]
                r["same_device_max_abs"] = max(r["same_device_max_abs"], _max_abs(got, on_dev))
                r["cpu_max_abs"] = max(r["cpu_max_abs"], _max_abs(got, on_cpu))
                live = [layer["alpha"] for layer in rows[me]["layers"]]
                r["alpha_max_diff_device"] = max([r["alpha_max_diff_device"]] + [
                    abs(a - b.alpha) for a, b in zip(live, rep_dev.layers, strict=True)])
                r["alpha_max_diff_cpu"] = max([r["alpha_max_diff_cpu"]] + [
                    abs(a - b.alpha) for a, b in zip(live, rep_cpu.layers, strict=True)])
                r["layers"], r["tensors"] = len(live), len(got)
            results[level] = r
    if comm.Get_rank() == 0:
        out.write_text(json.dumps(results, indent=1))


def _max_abs(got: dict, want: dict) -> float:
    return max(float((got[k].double() - want[k].cpu().double()).abs().max()) if got[k].numel() else 0.0
               for k in want if got[k].is_floating_point())


def compare_runs(full: Path, resumed: Path) -> None:
    """Final weights and per-peer test accuracy of two finished runs, as one JSON line."""
    import h5py
    import torch

    from hpcgraft.storage.tree import read_tree

    def newest(run: Path) -> Path:
        return max((p.parent for p in (run / "checkpoints").glob("step-*/MANIFEST.json")), key=lambda p: p.name)

    def accs(run: Path) -> list[float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        last = max(r["epoch"] for r in rows)
        return [r["test_acc"] for r in sorted(rows, key=lambda r: r["peer"] if r["peer"] is not None else -1)
                if r["epoch"] == last and r["peer"] is not None]

    differing = tensors = 0
    max_abs = 0.0
    a_dir, b_dir = newest(full), newest(resumed)
    for peer_file in sorted(a_dir.glob("peer-*.h5")):
        with h5py.File(peer_file) as fa, h5py.File(b_dir / peer_file.name) as fb:
            a, b = read_tree(fa["model"]), read_tree(fb["model"])
        for k, t in a.items():
            tensors += 1
            if not torch.equal(t, b[k]):
                differing += 1
                if t.is_floating_point():
                    max_abs = max(max_abs, float((t.double() - b[k].double()).abs().max()))
    print(json.dumps(dict(tensors=tensors, differing=differing, max_abs=max_abs, acc_full=accs(full),
                          acc_resumed=accs(resumed))))


# ------------------------------------------------------------------------------------------ command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rank-graft"]:
        p = argparse.ArgumentParser(prog="gpu_check.py rank-graft")
        p.add_argument("--device", default="cuda")
        p.add_argument("--json", type=Path, required=True)
        a = p.parse_args(argv[1:])
        rank_graft(a.device, a.json)
        return 0
    if argv[:1] == ["compare-runs"]:
        compare_runs(Path(argv[1]), Path(argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="check on the CPU (a dry run of the GPU check)")
    p.add_argument("--fast", action="store_true", help="the smallest form of every item (CI runs it)")
    p.add_argument("--out", type=Path, help="logs and gpu_check.txt (default: $OUT, else a temporary folder)")
    p.add_argument("--only", help="comma-separated items to run (env,unit,graft,resume,speed_train,speed_graft,"
                                  "speed_compile,speed_peers)")
    a = p.parse_args(argv)
    out = a.out or Path(os.environ.get("OUT") or f"/tmp/hpcgraft-gpu-check-{os.getpid()}")
    out.mkdir(parents=True, exist_ok=True)
    c = Check("cpu" if a.cpu else "cuda", a.fast, out)
    items = {"env": check_env, "unit": check_unit, "graft": check_graft, "resume": check_resume,
             "speed_train": check_speed_train, "speed_graft": check_speed_graft, "speed_compile": check_speed_compile,
             "speed_peers": check_speed_peers}
    chosen = a.only.split(",") if a.only else list(items)
    unknown = [n for n in chosen if n not in items]
    if unknown:
        print(f"gpu_check: unknown item {unknown[0]!r}; items: {', '.join(items)}", file=sys.stderr)
        return 2
    print(f"gpu_check: device {c.device}, logs in {out}", flush=True)
    for name in chosen:
        c.item(name, lambda fn=items[name]: fn(c))
    text = c.summary()
    (out / "gpu_check.txt").write_text(text + "\n")
    print("\n" + text, flush=True)
    return 0 if all(it.ok is not False for it in c.items) else 1


if __name__ == "__main__":
    sys.exit(main())
