"""The run directory: its config check, resume, checkpoints and the logs people read.

    RUN_DIR/config.yaml, metrics.jsonl, graft.jsonl, status.json, checkpoints/step-*/

Rank 0 writes the small files; every rank takes part in checkpoints (:mod:`hpcgraft.storage.checkpoints`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import h5py
import mpi4py
import numpy as np
import torch
import yaml

from hpcgraft.config import Config, config_from_dict
from hpcgraft.dist import mpi
from hpcgraft.dist.world import World, log
from hpcgraft.errors import ConfigError
from hpcgraft.storage import atomic
from hpcgraft.storage.checkpoints import CheckpointManager
from hpcgraft.storage.runlog import GRAFTS, METRICS, STATUS, RunLog, read_jsonl
from hpcgraft.training.peer import Peer


class RunStore:
    """One run directory, seen from every rank: checked at start, resumed from, logged to, saved into."""

    def __init__(self, run_dir: Path, cfg: Config, world: World, *, restart: bool) -> None:
        self.dir, self.cfg, self.world = run_dir, cfg, world
        self.config_path = saved = run_dir / "config.yaml"
        if restart and world.is_root:
            _clear_run(run_dir)
        world.comm.Barrier()
        if saved.exists():
            old = config_from_dict(yaml.safe_load(saved.read_text()) or {}).flat()
            new = cfg.flat()
            diff = [k for k in new if old.get(k) != new[k]]
            if diff:
                k = diff[0]
                raise ConfigError(f"{run_dir} holds a run with {k}={old.get(k)!r}, not {new[k]!r}; resume it with "
                                  "the same config, pass --restart to start over, or use another --out")
            status = RunLog(run_dir).read_status()
            if status.get("state") == "finished":
                raise ConfigError(f"{run_dir} holds a finished run ({status.get('epoch')} epochs); pass --restart "
                                  "to start over or use another --out")
        self.manager = None
        if cfg.checkpoint.enabled:
            self.manager = CheckpointManager(run_dir, world.comm, peer=world.peer, peers=world.peers,
                                             writer=world.is_peer_lead, keep=cfg.checkpoint.keep,
                                             keep_best=cfg.checkpoint.keep_best, interval=cfg.checkpoint.interval)
        self.log: RunLog | None = None  # rank 0's logs, opened by record_config
        self._grafts: list[dict[str, Any]] = []  # graft.jsonl as it stands, for run.h5's grafting history

    def record_config(self) -> None:
        """Write the run's config.yaml; called once every rank has checked the old one (see ``__init__``)."""
        if self.world.is_root:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.config_path, self.cfg.to_yaml())
            self.log = RunLog(self.dir)

    def resume(self, peer: Peer) -> None:
        info = self.manager.latest() if self.manager else None
        if info is None:
            if self.log:
                self.log.truncate_after(0, 0)
            return
        if info.peers != self.world.peers:
            raise ConfigError(f"the checkpoint {info.path} has {info.peers} peers; start with mpirun -np "
                             f"{info.peers * self.world.replicas} to resume it")
        peer.load_state_dict(self.manager.load_peer(info, self.world.peer))
        prog = peer.progress
        if self.log:
            self.log.truncate_after(prog.epoch, prog.step)
            self._grafts = read_jsonl(self.dir / GRAFTS)  # once; later rows are kept as they are logged
        where = f"epoch {prog.epoch + 1} at batch {prog.batch}" if prog.batch else f"after epoch {prog.epoch}"
        log(f"hpcgraft: resuming {self.dir} from {info.path.name} ({where}, step {prog.step})", world=self.world)

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

    def save(self, peer: Peer, *, metric: float | None = None) -> None:
        if self.manager is None:
            return
        run_tree = None
        if self.world.is_root:
            run_tree = {"config": self.cfg.to_yaml(), "versions": _versions(), "grafts": _graft_history(self._grafts)}
        with peer.watchdog.guard("checkpoint: save"):
            self.manager.save(peer.progress.step, peer.progress.epoch, peer.state_dict(), run_tree, metric=metric)


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


def _clear_run(run_dir: Path) -> None:
    for name in ("config.yaml", METRICS, GRAFTS, STATUS):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "numpy": np.__version__, "mpi4py": mpi4py.__version__,
            "h5py": h5py.__version__, "mpi": mpi().Get_library_version().splitlines()[0].strip(),
            "python": sys.version.split()[0]}
