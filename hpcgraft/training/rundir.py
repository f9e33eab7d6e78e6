"""The run directory: its config check, resume, checkpoints and the logs people read.

    RUN_DIR/config.yaml, metrics.jsonl, graft.jsonl, status.json, checkpoints/step-*/

Rank 0 writes the small files; every rank takes part in checkpoints (:mod:`hpcgraft.storage.checkpoints`).
"""

from __future__ import annotations

import contextlib
import numbers
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import mpi4py
import numpy as np
import torch

from hpcgraft.comm import mpi
from hpcgraft.comm.world import World, agreed, log, start_ranks
from hpcgraft.config import Config
from hpcgraft.errors import CheckpointError, ConfigError, RunError
from hpcgraft.storage.checkpoints import (
    CheckpointInfo,
    CheckpointManager,
    CheckpointSpaceError,
    complete_checkpoints,
    is_step_dir,
)
from hpcgraft.storage.lock import LOCK_FILE, RunDirLock
from hpcgraft.storage.run import CONFIG, config_text, parse_config, write_config
from hpcgraft.storage.runlog import GRAFTS, METRICS, STATUS, RunLog, read_jsonl
from hpcgraft.storage.tbevents import TENSORBOARD, TensorBoardSink, remove_events
from hpcgraft.supervise import on_orphaned
from hpcgraft.text import plural
from hpcgraft.training.peer import Peer

#: Written into every run directory hpcgraft accepts: --restart and resume touch only directories that hold it
#: (or, from before it existed, a config.yaml that parses as an hpcgraft config), never another project's files.
MARKER = ".hpcgraft-run"
EPOCHS = "train.epochs"
#: Keys a resume may change: the number of peers is the checkpoint's to decide (its K, checked on resume), not
#: the config's text, so that a run started with one peer per rank on K ranks goes on with graft.peers=K on fewer.
LAYOUT_KEYS = ("graft.peers",)
LAUNCH_LOGS = "submitit"  # the folder hpcgraft.launch gives submitit inside the run directory
CHECKPOINTS = "checkpoints"
#: Every entry a run writes in its directory, named once: --restart removes these (inside the folders, only
#: hpcgraft's own files) and nothing else; none may be a symlink, which would redirect a write, or the wrong
#: kind of entry. The marker and the lock stay.
RUN_FILES = (CONFIG, METRICS, GRAFTS, STATUS)
RUN_FOLDERS = (CHECKPOINTS, TENSORBOARD)
_CONFIG_MAX_BYTES = 1 << 20  # a config.yaml larger than this is no hpcgraft config: not parsed to find out
_LOCK: RunDirLock | None = None  # rank 0's lock on the run directory, held until the process ends
_RUN_LOG: RunLog | None = None  # rank 0's logs once the run is accepted: Ctrl-C records itself in status.json


def claim_run_dir(run_dir: Path) -> None:
    """Rank 0, before anything slow: make sure ``run_dir`` is a directory this job may use and take its lock
    for the job's lifetime. Nothing is written in it but the lock until the run is accepted
    (:meth:`RunStore.record_config`), and nothing removed until :func:`start_over`. Every refusal is a user
    error (exit 2)."""
    global _LOCK
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is an existing file, not a directory; pass a directory path")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".hpcgraft-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {run_dir} cannot be written ({exc.strerror}); pass a writable directory") from None
    # hpcgraft.launch's own submitit folder (its logs, written before the first rank starts) belongs to the run
    names = {p.name for p in run_dir.iterdir()} - {LOCK_FILE, LAUNCH_LOGS}
    if names and MARKER not in names:
        problem = _not_a_run_config(run_dir / CONFIG)
        if problem:
            raise ConfigError(f"--out {run_dir} is not an hpcgraft run directory (it holds "
                              f"{', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''} and no {MARKER}; "
                              f"{problem}); hpcgraft neither resumes nor clears it: pass an empty or new directory")
    _check_entries(run_dir)
    if _LOCK is None or _LOCK.path.parent != run_dir:
        release_run_dir()
        lock = RunDirLock(run_dir)
        lock.acquire()
        _LOCK = lock


def _not_a_run_config(path: Path) -> str | None:
    """Why ``path`` is not the config.yaml of an hpcgraft run (None: it is one). Another tool's config.yaml
    (keys like ``lr``) must not make its directory hpcgraft's to clear."""
    if path.is_symlink() or not path.is_file():
        return f"no {CONFIG}"
    if path.stat().st_size > _CONFIG_MAX_BYTES:
        return f"its {CONFIG} is too large for an hpcgraft config"
    try:
        parse_config(path.read_bytes())
    except (OSError, ConfigError) as exc:
        return f"its {CONFIG} is not an hpcgraft config ({exc})"
    return None


def _check_entries(run_dir: Path) -> None:
    """The entries a run writes must be what it writes there: a symlink would redirect the write (or the
    removal) to a file hpcgraft did not make, a folder where a file belongs (or a file where a folder does)
    would fail late, after the work."""
    for name in (*RUN_FILES, MARKER, *RUN_FOLDERS):
        path = run_dir / name
        if path.is_symlink():
            raise ConfigError(f"{path} is a symlink; hpcgraft follows no link it did not make: remove it, or use "
                              "another --out")
        want_folder = name in RUN_FOLDERS
        if path.exists() and path.is_dir() != want_folder:
            kind, wanted = ("a directory", "file") if path.is_dir() else ("a file", "folder")
            raise ConfigError(f"{path} is {kind} where hpcgraft writes its {name} {wanted}; move it away, or use "
                              "another --out")
        if want_folder and path.is_dir():
            for inner in (path, *(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())):
                link = next((p for p in inner.iterdir() if p.is_symlink()), None)
                if link is not None:
                    raise ConfigError(f"{link} is a symlink; hpcgraft follows no link it did not make: remove it, "
                                      "or use another --out")


def start_over(run_dir: Path) -> None:
    """Rank 0, on ``--restart``, once the job is set up (config, data, model): remove what earlier runs
    wrote in ``run_dir`` (:data:`RUN_FILES`, the checkpoints and event files), never another file."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    checkpoints = run_dir / CHECKPOINTS
    if checkpoints.is_dir():
        for step in checkpoints.iterdir():
            if step.is_dir() and is_step_dir(Path(step.name.removeprefix(".trash-"))):
                shutil.rmtree(step)
        with contextlib.suppress(OSError):  # kept while it holds files of someone else's
            checkpoints.rmdir()
    remove_events(run_dir / TENSORBOARD)


@contextlib.contextmanager
def noting_interruption() -> Iterator[None]:
    """Ctrl-C ends the job at once, without a checkpoint: status.json says ``interrupted`` (with the last
    epoch and step it recorded), not ``running``, so that a watcher knows the run is not going on."""
    try:
        yield
    except KeyboardInterrupt:
        if _RUN_LOG is not None:
            with contextlib.suppress(OSError, ValueError):
                _RUN_LOG.status(**{"epoch": 0, "step": 0, **_RUN_LOG.read_status(), "state": "interrupted"})
        raise


def release_run_dir() -> None:
    """Give the run directory's lock back (the process's end does it too)."""
    global _LOCK
    if _LOCK is not None:
        _LOCK.release()
        _LOCK = None


def _check_same_config(where: str, old_yaml: str | bytes, cfg: Config, run_dir: Path,
                       extend: bool = False) -> dict[str, Any]:
    """The config a run was started with must be the one that continues it (``extend``: but for a larger
    ``train.epochs``); returns the old config, flat."""
    try:
        old = parse_config(old_yaml).flat()
    except ConfigError as exc:
        raise ConfigError(f"the config of the run in {run_dir} ({where}) is damaged ({exc}); restore it, pass "
                          "--restart to start over, or use another --out") from None
    new = cfg.flat()
    diff = [k for k in new if old.get(k) != new[k] and not (extend and k == EPOCHS) and k not in LAYOUT_KEYS]
    if diff == [EPOCHS] and new[EPOCHS] > old[EPOCHS]:
        raise ConfigError(f"{run_dir} holds a run of {EPOCHS}={old[EPOCHS]}; to continue it to {new[EPOCHS]} epochs "
                          "pass --extend (or --restart to start over)")
    if extend and new[EPOCHS] <= old[EPOCHS]:
        raise ConfigError(f"--extend needs {EPOCHS} larger than the run's {old[EPOCHS]} (got {new[EPOCHS]}); "
                          f"pass e.g. {EPOCHS}={old[EPOCHS] + 1}")
    if diff:
        k = diff[0]
        raise ConfigError(f"{run_dir} holds a run with {k}={old.get(k)!r} ({where}), not {new[k]!r}; resume it "
                          "with the same config, pass --restart to start over, or use another --out")
    return old


class RunStore:
    """One run directory, seen from every rank: checked at start, resumed from, logged to, saved into."""

    def __init__(self, run_dir: Path, cfg: Config, world: World, *, extend: bool = False,
                 from_step: int | None = None) -> None:
        self.dir, self.cfg, self.world = run_dir, cfg, world
        self.extend, self.from_step = extend, from_step
        self.config_path = saved = run_dir / CONFIG
        self.had_config = saved.exists()
        if (extend or from_step is not None) and not self.had_config and not (run_dir / "checkpoints").is_dir():
            raise ConfigError(f"{'--extend' if extend else '--from-step'} continues a run, and {run_dir} holds none; "
                              "drop the flag to start a new run")
        if self.had_config:
            _check_same_config(CONFIG, config_text(run_dir) or b"", cfg, run_dir, extend)
            status = RunLog(run_dir).read_status()
            if status.get("state") == "finished" and not extend and from_step is None:
                raise ConfigError(f"{run_dir} holds a finished run ({plural(status.get('epoch', 0), 'epoch')}); pass "
                                  f"--extend with a larger {EPOCHS} to continue it, --restart to start over, or use "
                                  "another --out")
        self.manager = None
        if cfg.checkpoint.enabled:
            self.manager = CheckpointManager(run_dir, world.comm, peer=world.peer, peers=world.peers,
                                             writer=world.is_peer_lead, keep=cfg.checkpoint.keep,
                                             keep_best=cfg.checkpoint.keep_best, interval=cfg.checkpoint.interval,
                                             hosted=world.per_rank)
        self._passed_over: list[str] = []  # --from-step: the other checkpoints, which resume must not pick
        self.log: RunLog | None = None  # rank 0's logs, opened by record_config
        self._grafts: list[dict[str, Any]] = []  # graft.jsonl as it stands, for run.h5's grafting history

    def record_config(self) -> None:
        """Accept the run: mark the directory as hpcgraft's and write its config.yaml; called once every rank
        has checked the old config and the checkpoint's."""
        global _RUN_LOG
        if self.world.is_root:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / MARKER).touch()
            write_config(self.dir, self.cfg)
            self.log = RunLog(self.dir, [TensorBoardSink(self.dir / TENSORBOARD)] if self.cfg.log.tensorboard else [])
            _RUN_LOG = self.log
            # Killed with its supervisor or its launcher, the job prints nothing anyone may read: status.json says it.
            on_orphaned(lambda what: self.log.last_status(
                "failed", f"{what}; re-run the same command to resume from the last checkpoint"))

    def resume(self, peers: list[Peer]) -> None:
        """Continue the hosted ``peers`` from the latest intact checkpoint, whichever ranks wrote it (a
        checkpoint names its peers, not their ranks). Without config.yaml (deleted), the checkpoint's own
        copy of the config (run.h5) decides whether this config may continue it."""
        info = self._start_checkpoint()
        if info is not None and not self.had_config:  # rank 0 reads it; every rank learns the verdict
            agreed(self.world.comm, lambda: self._check_kept_config(info), root_only=True)
        if info is None:
            self.record_config()
            if self.log:
                self._say_torn(self.log.truncate_after(0, 0))
            return
        if info.peers != self.world.peers:
            how = (f"set graft.peers={info.peers}" if self.cfg.graft.peers is not None
                   else f"start with {start_ranks(str(info.peers * self.world.replicas))}")
            fewer = (f", or with graft.peers={info.peers} on a rank count that divides {info.peers}"
                     if self.cfg.graft.peers is None and self.world.replicas == 1 else "")
            raise ConfigError(f"the checkpoint {info.path} has {plural(info.peers, 'peer')}; {how} to resume it{fewer}")
        info, states = self._fitting_checkpoint(info, peers)
        self.record_config()
        for peer, state in zip(peers, states, strict=True):
            peer.load_state_dict(state)
        prog = peers[0].progress
        if self.log:
            self._say_torn(self.log.truncate_after(prog.epoch, prog.step))
            self._grafts = read_jsonl(self.dir / GRAFTS)  # once; later rows are kept as they are logged
        where = f"epoch {prog.epoch + 1} at batch {prog.batch}" if prog.batch else f"after epoch {prog.epoch}"
        log(f"hpcgraft: resuming {self.dir} from {info.path.name} ({where}, step {prog.step})", world=self.world)

    def _check_kept_config(self, info: CheckpointInfo) -> None:
        """Rank 0: without config.yaml (deleted), the checkpoint's own copy of the config (run.h5) decides
        whether this config may continue the run."""
        stored = self.manager.load_run(info).get("config")
        if isinstance(stored, str | bytes):
            _check_same_config(f"in {info.path.name}/run.h5; its config.yaml is gone", stored, self.cfg, self.dir,
                               self.extend)

    def _start_checkpoint(self) -> CheckpointInfo | None:
        """COLLECTIVE: the newest intact checkpoint, or with ``--from-step N`` the one of step N (an error
        listing the complete ones when it has none)."""
        if self.manager is None:
            if self.from_step is not None:
                raise ConfigError("--from-step needs checkpoints, and checkpoint.enabled=false; drop --from-step")
            return None
        if self.from_step is None:
            return self.manager.latest()
        found = complete_checkpoints(self.manager.root)
        if self.from_step not in [c.step for c in found]:
            steps = ", ".join(str(c.step) for c in reversed(found)) or "none"
            raise CheckpointError(f"{self.dir} has no complete checkpoint at step {self.from_step}; complete "
                                  f"checkpoints are at steps: {steps}")
        self._passed_over = [c.path.name for c in found if c.step != self.from_step]
        info = self.manager.latest(exclude=self._passed_over)
        if info is None or info.step != self.from_step:
            raise CheckpointError(f"the checkpoint at step {self.from_step} in {self.manager.root} is damaged; "
                                  "pick another with --from-step")
        return info

    def _fitting_checkpoint(self, info: CheckpointInfo, peers: list[Peer]
                            ) -> tuple[CheckpointInfo, list[dict[str, Any]]]:
        """COLLECTIVE: the newest intact checkpoint that also fits this run, and the hosted peers' states in it.

        CRCs prove the files are as written, not that the writer was right: a tool that rewrote a dataset
        (and its CRC) with another shape or dtype, or one peer's progress far from the others', would fail
        inside loading, or let one rank finish while the others train on. Such a checkpoint is passed over
        like a damaged one."""
        unfit: list[str] = []
        while True:
            states: list[dict[str, Any]] = []
            problem, wheres = None, []
            for peer in peers:
                try:
                    state: dict[str, Any] | None = self.manager.load_peer(info, peer.index)
                    problem = _state_problem(state, peer.state_dict(), self.cfg.train.epochs)
                except Exception as exc:  # noqa: BLE001 - every rank must reach the allgather below
                    state, problem = None, f"unreadable ({type(exc).__name__}: {exc})"
                if problem:
                    problem = f"peer {peer.index}: {problem}" if len(peers) > 1 else problem
                    break
                states.append(state)  # type: ignore[arg-type]
                wheres.append((peer.index, tuple(state["progress"].get(k) for k in ("epoch", "step", "batch"))))
            found = self.world.comm.allgather((problem, wheres))
            bad = next(((r, p) for r, (p, _) in enumerate(found) if p), None)
            if bad is None and len({where for _, ws in found for _, where in ws}) > 1:
                bad = (0, "the peers' progress (epoch, step, batch) differs: "
                          + ", ".join(f"peer {p} {where}" for _, ws in found for p, where in ws))
            if bad is None:
                return info, states
            unfit.append(info.path.name)
            nxt = self.manager.latest(exclude=[*unfit, *self._passed_over])
            tail = f"falling back to {nxt.path.name}" if nxt else "no earlier checkpoint"
            log(f"hpcgraft: checkpoint {info.path.name} does not fit this run (rank {bad[0]}: {bad[1]}); {tail}",
                world=self.world)
            if nxt is None:
                raise CheckpointError(f"no checkpoint in {self.manager.root} fits this run ({info.path.name}, rank "
                                      f"{bad[0]}: {bad[1]}); restore the files or start over with --restart")
            info = nxt

    def _say_torn(self, torn: list[str]) -> None:
        for name in torn:
            log(f"hpcgraft: {self.dir / name} ended in a torn line (a kill or a full disk during the append); "
                "dropped it; it comes after the checkpoint resumed from, and this run logs it again", world=self.world)

    def log_grafts(self, rows: list[dict[str, Any]]) -> None:
        """Rank 0: append a round's graft reports to graft.jsonl."""
        if self.log:
            self.log.append(GRAFTS, rows)
            self._grafts.extend(rows)

    @property
    def ranks_best(self) -> bool:
        """Whether checkpoints are ranked by their metric (``checkpoint.keep_best``)."""
        return self.manager is not None and self.manager.keep_best

    def save_due(self, epoch: int) -> bool:
        """Whether the epoch just completed ends with a checkpoint (the last one always does)."""
        return self.manager is not None and self.manager.due(epoch, last=epoch == self.cfg.train.epochs)

    def save(self, peers: list[Peer], *, metrics: list[float | None] | None = None) -> None:
        """COLLECTIVE: checkpoint the hosted ``peers`` (``metrics``: what each is ranked by)."""
        if self.manager is None:
            return
        run_tree = None
        if self.log:
            self.log.sync()
        if self.world.is_root:
            run_tree = {"config": self.cfg.to_yaml(), "versions": _versions(), "grafts": _graft_history(self._grafts)}
        states = [peer.state_dict() for peer in peers]
        prog = peers[0].progress
        try:
            with peers[0].watchdog.guard("checkpoint: save"):
                self.manager.save(prog.step, prog.epoch, states, run_tree,
                                  metric=metrics if metrics is not None else [None] * len(peers))
        except CheckpointError as exc:  # raised on every rank alike: one line, exit 1, no abort
            raise RunError(self._save_failure(exc, prog.epoch, prog.step)) from None

    def _save_failure(self, exc: CheckpointError, epoch: int, step: int) -> str:
        """One line, status.json says ``failed``; a full disk is named with the space before the write and the
        space needed (the manager measured both). The last checkpoint is intact, and a re-run resumes from it."""
        if self.log:
            with contextlib.suppress(OSError):
                self.log.status(state="failed", epoch=epoch, step=step)
        if isinstance(exc, CheckpointSpaceError):
            return str(exc)
        return f"{exc}; the last checkpoint in {self.dir} is intact: re-run the same command to resume from it"


def _state_problem(saved: Any, mine: dict[str, Any], epochs: int) -> str | None:
    """What makes a peer's saved state unusable for this model, or None: missing or extra weights, another
    shape or dtype (momentum too: one per parameter stepped so far), progress out of range."""
    if not isinstance(saved, dict):
        return "it holds no peer state"
    model = _flat(mine["model"])
    parts = (("model", model, _flat(saved.get("model", {})), True),
             ("optimizer.momentum", model, _flat(saved.get("optimizer", {}).get("momentum", {})), False))
    for part, want, got, complete in parts:
        for name in sorted(set(want) | set(got)):
            if name not in want:
                return f"{part}.{name} is not part of the model"
            if name not in got:
                if complete:
                    return f"{part}.{name} is missing"
                continue
            a, b = want[name], got[name]
            if not isinstance(b, torch.Tensor) or tuple(b.shape) != tuple(a.shape) or b.dtype != a.dtype:
                kind = f"{b.dtype} {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
                return f"{part}.{name} is {kind}, the model's {a.dtype} {tuple(a.shape)}"
    prog = saved.get("progress")
    if not isinstance(prog, dict) or set(prog) != set(mine["progress"]):
        return "its progress record is not this version's"
    counters = [prog[k] for k in ("epoch", "step", "batch")]
    if not all(isinstance(v, numbers.Integral) and v >= 0 for v in counters) or prog["epoch"] > epochs:
        return f"its progress (epoch {prog['epoch']}, step {prog['step']}) is outside 0..{epochs} epochs"
    return None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _graft_history(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Alpha per layer per graft point and peer, as arrays (rows of graft.jsonl; NaN where a peer skipped)."""
    done = [r for r in rows if "layers" in r]
    if not done:
        return {}
    layers = [layer["name"] for layer in done[0]["layers"]]
    alpha = np.full((len(rows), len(layers)), np.nan)
    for i, r in enumerate(rows):
        if "layers" in r:
            alpha[i] = [layer["alpha"] for layer in r["layers"]]
    return {"layers": layers, "alpha": alpha, "step": np.array([r["step"] for r in rows], dtype=np.int64),
            "epoch": np.array([r["epoch"] for r in rows], dtype=np.int64),
            "peer": np.array([r["peer"] for r in rows], dtype=np.int64)}


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "numpy": np.__version__, "mpi4py": mpi4py.__version__,
            "h5py": h5py.__version__, "mpi": mpi().Get_library_version().splitlines()[0].strip(),
            "python": sys.version.split()[0]}
