"""A sweep: every arm of a comparison, several seeds each, one run per (arm, seed) in ``DIR/<arm>/seed<k>``.

Each run is an ordinary run directory, trained by ``hpcgraft.train`` with the config, then the sweep's
overrides, then the arm's, then ``seed=k``. Locally the runs go one after another under ``mpirun -np K``;
submitted, each becomes its own job through :func:`hpcgraft.launch.submit`, with its requeue and resume.
Running the same sweep again skips the finished runs (``status.json`` says ``finished``), leaves runs
another job holds alone, and resumes the rest from their last checkpoint, so a sweep cut short by a time
limit or a crash continues where it was. ``DIR/sweep.json`` records the arms and seeds the report
tabulates. The sweep command (:mod:`hpcgraft.cli.sweep`) is its command line.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpcgraft.config import Config, load_config, resolve_config
from hpcgraft.errors import EXIT_FAILURE, EXIT_USAGE, ConfigError, LaunchError, UserError, report
from hpcgraft.launch import jobs
from hpcgraft.reporting.runs import SWEEP_FILE, load_sweep
from hpcgraft.reporting.tables import sweep_table
from hpcgraft.slurm.check import parse_nodes
from hpcgraft.storage.atomic import write_text
from hpcgraft.storage.lock import LOCK_FILE, RunDirLock, RunDirLockedError
from hpcgraft.storage.outputs import check_output_dir, check_output_file, check_run_outputs
from hpcgraft.storage.run import holds_run, read_config
from hpcgraft.storage.runlog import STATUS

PROG = "hpcgraft.sweep"

#: The arms of the papers' comparisons, as overrides of the config. Each arm sets everything it is about,
#: so a config that already changes one of these keys still yields the arm its name promises.
#: baseline: the peers train independently with the config's common learning rate (the papers' baseline is
#: the plain recipe; per-peer learning rates, train.dlr, belong to the grafted "dlr" columns).
#: cultivation: lambda = 1 (the distillation term weighted like the cross-entropy, at the config's
#: temperature); docs/method.md leaves lambda open, and --arm defines other values.
ARMS: dict[str, tuple[str, ...]] = {
    "baseline": ("graft.mode=none", "cultivate.lambda=0", "train.dlr=false"),
    "grafting": ("graft.mode=peers", "cultivate.lambda=0"),
    "grafting+cultivation": ("graft.mode=peers", "cultivate.lambda=1"),
    "cultivation": ("graft.mode=none", "cultivate.lambda=1"),
}
DEFAULT_ARMS = ("baseline", "grafting", "grafting+cultivation")
_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclasses.dataclass(frozen=True)
class Planned:
    """One (arm, seed) of the sweep: where it runs and the overrides that make it."""

    arm: str
    seed: int
    out: Path
    overrides: tuple[str, ...]
    cfg: Config = dataclasses.field(compare=False)

    @property
    def label(self) -> str:
        return f"{self.arm} seed {self.seed}"


def parse_arms(names: str, defined: Sequence[str | Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """The arms to run, in order: the built-in ones named in ``names`` and those each ``--arm NAME key=value
    ...`` defines (a defined arm runs whether or not ``names`` lists it)."""
    custom: dict[str, tuple[str, ...]] = {}
    for spec in defined:
        name, overrides = arm_words([spec] if isinstance(spec, str) else list(spec))
        if name in ARMS or name in custom:
            raise ConfigError(f"--arm {name}: the arm '{name}' is already defined; pick another name")
        custom[name] = overrides
    chosen: dict[str, tuple[str, ...]] = {}
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        if name in chosen:
            raise ConfigError(f"--arms names '{name}' twice; name each arm once")
        if name not in ARMS and name not in custom:
            raise ConfigError(f"unknown arm '{name}'; built-in arms: {', '.join(ARMS)} (or define it: "
                             f"--arm {name} key=value ...)")
        chosen[name] = ARMS.get(name) or custom[name]
    for name, overrides in custom.items():
        chosen.setdefault(name, overrides)
    if not chosen:
        raise ConfigError("--arms names no arm; e.g. --arms baseline,grafting")
    return chosen


def arm_words(words: list[str]) -> tuple[str, tuple[str, ...]]:
    """One ``--arm``: ``NAME key=value ...``, or the older single word ``'NAME=key=value ...'``."""
    name, sep, rest = words[0].partition("=") if words else ("", "", "")
    overrides = (*shlex.split(rest), *words[1:]) if sep else tuple(words[1:])
    if not _ARM_NAME.fullmatch(name) or not overrides:
        raise ConfigError(f"--arm {' '.join(words)!r} is not NAME key=value ...; e.g. --arm filter graft.level=filter")
    return name, overrides


def plan(config: str, arms: dict[str, tuple[str, ...]], seeds: int, out: Path, overrides: list[str]) -> list[Planned]:
    """Every (arm, seed) with its resolved config; bad input of any run fails here, before anything starts."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give the number of seeds per arm, at least 1 (seeds 0..N-1)")
    if any(o.partition("=")[0].strip() == "seed" for o in overrides):
        raise ConfigError("a seed=... override: the sweep sets the seed of each run (--seeds N runs seeds 0..N-1)")
    runs = []
    for arm, arm_overrides in arms.items():
        for seed in range(seeds):
            ov = (*overrides, *arm_overrides, f"seed={seed}")
            try:
                cfg = load_config(config, list(ov))
            except ConfigError as exc:
                raise ConfigError(f"arm {arm}: {exc}") from None
            runs.append(Planned(arm, seed, out / arm / f"seed{seed}", ov, cfg))
    return runs


def run_state(run: Planned) -> str:
    """``new``, ``finished``, ``running`` (another job holds its lock) or ``unfinished``; a directory that
    holds a run of another config is an error, named before any run starts."""
    if not holds_run(run.out):
        return "new"
    try:
        old = read_config(run.out, fix=f"delete {run.out} to run it again").cfg.flat()  # type: ignore[union-attr]
    except UserError as exc:
        raise ConfigError(str(exc)) from None
    new = run.cfg.flat()
    diff = [k for k in new if old.get(k) != new[k]]
    if diff:
        k = diff[0]
        raise ConfigError(f"{run.out} holds a run with {k}={old.get(k)!r}, not {new[k]!r} as this sweep asks; run "
                         "the sweep with its first arguments, pass --restart to start every run over, or use "
                         "another --out")
    if (run.out / LOCK_FILE).exists():
        lock = RunDirLock(run.out)
        try:
            lock.acquire()
        except RunDirLockedError:
            return "running"
        lock.release()
    status = json.loads((run.out / STATUS).read_text()) if (run.out / STATUS).is_file() else {}
    return "finished" if status.get("state") == "finished" else "unfinished"


def read_spec(out: Path) -> dict[str, Any] | None:
    """DIR/sweep.json as a previous command wrote it, None when there is none; one that is not a sweep's
    (torn by a kill before it was written atomically, or another tool's file) is an error naming it."""
    f = out / SWEEP_FILE
    if not f.exists():
        return None
    try:
        spec = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(spec, dict):
            raise ValueError(f"a JSON {type(spec).__name__}, not an object")
        arms, seeds, job_ids = spec.get("arms"), spec.get("seeds"), spec.get("jobs", {})
        if not isinstance(arms, dict) or not all(isinstance(v, list) and all(isinstance(o, str) for o in v)
                                                 for v in arms.values()):
            raise ValueError("'arms' is not a mapping of arm names to override lists")
        if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError("'seeds' is not a list of integers")
        if not isinstance(job_ids, dict):
            raise ValueError("'jobs' is not a mapping")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else " ".join(str(exc).split())
        raise ConfigError(f"{f} is damaged or not a sweep's ({reason}); move it away (the runs beside it stay and "
                          "are resumed) or use another --out") from None
    return spec


def _write_spec(out: Path, spec: dict[str, Any]) -> None:
    """Atomically, like every state file: a kill or a full disk leaves the old sweep.json or the new one."""
    write_text(out / SWEEP_FILE, json.dumps(spec, indent=1) + "\n")


def record(out: Path, config: str, arms: dict[str, tuple[str, ...]], seeds: int, overrides: list[str]) -> None:
    """DIR/sweep.json: the arms (with their overrides) and seeds the report tabulates. A later command on the
    same DIR adds its arms and seeds; an arm name cannot change its meaning."""
    spec = read_spec(out) or {"config": config, "overrides": overrides, "arms": {}, "seeds": []}
    for name, ov in arms.items():
        if spec["arms"].setdefault(name, list(ov)) != list(ov):
            raise ConfigError(f"{out} already has an arm '{name}' with {' '.join(spec['arms'][name])}; give this "
                             "one another name or use another --out")
    spec.update(config=config, overrides=overrides, seeds=sorted(set(spec["seeds"]) | set(range(seeds))))
    out.mkdir(parents=True, exist_ok=True)
    _write_spec(out, spec)


def queued(out: Path, run: Planned) -> bool:
    """Whether the SLURM job this sweep last submitted for ``run`` is still in the queue (pending jobs hold
    no lock yet, and a second job for the same run would only be refused when it starts)."""
    spec = read_spec(out) or {}
    job = spec.get("jobs", {}).get(f"{run.arm}/seed{run.seed}")
    if not job or shutil.which("squeue") is None:
        return False
    r = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=60)
    return r.returncode == 0 and bool(r.stdout.strip())


def note_job(out: Path, run: Planned, job_id: str) -> None:
    spec = read_spec(out) or {}
    spec.setdefault("jobs", {})[f"{run.arm}/seed{run.seed}"] = str(job_id)
    _write_spec(out, spec)


def submissions(runs: list[Planned], config: str, restart: bool, job: dict) -> list[tuple[Planned, dict]]:
    """The :func:`hpcgraft.launch.submit` call of every run: one job per (arm, seed), logs in its run dir."""
    return [(r, dict(config=config, out=r.out, overrides=list(r.overrides), restart=restart, **job)) for r in runs]


# ------------------------------------------------------------------------------------------ running
def run_local(run: Planned, config: str, ranks: int, restart: bool) -> int:
    """One run under mpirun in the foreground; its exit status. SIGTERM/SIGUSR1 reach the ranks, which
    checkpoint and exit 75."""
    argv = ["--config", config, "--out", str(run.out), *(["--restart"] if restart else []), *run.overrides]
    proc = subprocess.Popen(jobs.mpirun_command(ranks, argv))
    previous = {s: signal.signal(s, lambda signum, _f: proc.send_signal(signum))
                for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached mpirun too, through the process group
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------ the sweep
@dataclasses.dataclass
class Sweep:
    """A sweep as this start of it finds it: every run, the state each is in, and the ranks per run."""

    out: Path
    config: str
    runs: list[Planned]
    states: dict[Planned, str]
    ranks: int
    tasks_per_node: int | None  # the submitted jobs' CPU ranks per node (--np given with --submitit)
    restart: bool

    def todo(self) -> list[Planned]:
        """The runs to start or resume, after saying which are skipped and why."""
        for r in self.runs:
            if self.states[r] in SKIPPED:
                print(f"{PROG}: {r.label}: {self.states[r]}, skipped ({r.out})", flush=True)
        return [r for r in self.runs if self.states[r] not in SKIPPED]


SKIPPED = ("finished", "running", "queued")


def open_sweep(config: str, out: str | None, arm_names: str, arm_specs: Sequence[str | Sequence[str]], seeds: int,
               overrides: list[str], *, np: int | None = None, restart: bool = False, submitted: bool = False,
               nodes: int | str = 1, gpus_per_node: int = 0, tasks_per_node: int | None = None) -> Sweep:
    """Check everything a sweep asks for (config, arms, every run's config and outputs, the ranks, runs of
    another config in the way) before any run starts, then record it in ``DIR/sweep.json``."""
    config = str(resolve_config(config).absolute())
    where = check_output_dir(out or f"runs/sweep-{Path(config).stem}", "--out")
    check_output_file(where / SWEEP_FILE, "--out")
    arms = parse_arms(arm_names, arm_specs)
    runs = plan(config, arms, seeds, where, overrides)
    for r in runs:
        check_run_outputs(r.out, r.cfg)
    ranks, tasks_per_node = ranks_per_run(runs, np, submitted, nodes, gpus_per_node, tasks_per_node)
    states = {r: ("restart" if restart else run_state(r)) for r in runs}
    if submitted:
        states.update({r: "queued" for r in runs if states[r] in ("new", "unfinished") and queued(where, r)})
    record(where, config, arms, seeds, overrides)
    return Sweep(where, config, runs, states, ranks, tasks_per_node, restart)


def ranks_per_run(runs: list[Planned], np: int | None, submitted: bool, nodes: int | str, gpus_per_node: int,
                  tasks_per_node: int | None) -> tuple[int, int | None]:
    """(ranks per run, CPU ranks per node of a submitted job); grafting and cultivation need two peers at
    least, refused here rather than per run."""
    if np is not None and np < 1:
        raise ConfigError(f"--np {np}: give the ranks per run, at least 1")
    if submitted:
        if np is not None:
            if gpus_per_node > 0:
                raise ConfigError("--np with --gpus-per-node: a GPU job has one rank per GPU (nodes x GPUs); "
                                  "leave --np out")
            tasks_per_node = tasks_per_node or np
        ranks = parse_nodes(str(nodes))[0] * (gpus_per_node or tasks_per_node or 2)  # the fewest it may get
    else:
        ranks = np or 2
    needs_peers = [r.arm for r in runs if r.cfg.graft.mode == "peers" or r.cfg.cultivate.lambda_ > 0]
    if ranks // max(1, runs[0].cfg.dist.replicas) < 2 and needs_peers:
        raise ConfigError(f"arm {needs_peers[0]} grafts or cultivates between peers: give at least 2 peers "
                          f"(--np 2 or more; {ranks} rank(s) now)")
    return ranks, tasks_per_node


def run_locally(sweep: Sweep) -> int:
    """Every run still to do, one after another under mpirun; 0 when all finished, 1 when some failed (the
    rest still ran), 2 when a run refused its input (the others would too), else the stopped run's status."""
    todo = sweep.todo()
    failed = []
    for i, r in enumerate(todo, 1):
        verb = {"new": "starting", "restart": "restarting"}.get(sweep.states[r], "resuming")
        print(f"{PROG}: [{i}/{len(todo)}] {r.label}: {verb} in {r.out} ({sweep.ranks} ranks)", flush=True)
        rc = run_local(r, sweep.config, sweep.ranks, sweep.restart)
        if rc == EXIT_USAGE:
            return rc  # the run said why; the other runs would fail the same way
        if rc != 0 and rc != EXIT_FAILURE:
            print(f"{PROG}: {r.label} stopped (exit {rc}); re-run the same command to resume the sweep",
                  file=sys.stderr, flush=True)
            return rc if rc > 0 else 128 - rc
        if rc == EXIT_FAILURE:
            failed.append(r)
    print(sweep_table(load_sweep(sweep.out)), flush=True)
    print(f"{PROG}: {len(sweep.runs) - len(todo)} run(s) skipped, {len(todo) - len(failed)} trained; the table and "
          f"plots: python -m hpcgraft.report {sweep.out}", flush=True)
    if failed:
        return report(PROG, f"{len(failed)} run(s) failed: {', '.join(r.label for r in failed)}; their output is "
                            "above, and re-running the same command retries them", EXIT_FAILURE)
    return 0


def submit_all(sweep: Sweep, job: dict[str, Any], wait_for: bool = False) -> int:
    """One job per run still to do (``job``: :func:`hpcgraft.launch.submit`'s shape and scheduler options);
    with ``wait_for``, wait for them all and print the table."""
    started = []
    try:
        for r, call in submissions(sweep.todo(), sweep.config, sweep.restart, job):
            submitted = jobs.submit(**call)
            print(f"{PROG}: {r.label}: submitted job {submitted.job_id} ({r.out}; logs {submitted.paths.stdout})",
                  flush=True)
            started.append((r, submitted))
            note_job(sweep.out, r, submitted.job_id)
    except (LaunchError, ConfigError) as exc:
        return report(PROG, exc, EXIT_USAGE)
    if not wait_for:
        print(f"{PROG}: {len(started)} job(s) submitted; re-run the same command to resubmit what ends unfinished, "
              f"python -m hpcgraft.report {sweep.out} for the table", flush=True)
        return 0
    failed = []
    for r, submitted in started:
        try:
            jobs.wait(submitted)
        except LaunchError as exc:
            print(f"{PROG}: {r.label}: {exc}", file=sys.stderr, flush=True)
            failed.append(r)
    print(sweep_table(load_sweep(sweep.out)), flush=True)
    if failed:
        return report(PROG, f"{len(failed)} job(s) failed: {', '.join(r.label for r in failed)}", EXIT_FAILURE)
    return 0
