"""Runs as the report reads them: a run directory's config and logs, the newest checkpoint's per-layer
invalid filters, the pruning results beside it, and a sweep's runs by arm and seed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcgraft.config import Config
from hpcgraft.errors import ConfigError, InputError
from hpcgraft.method.grafting import filter_l1_norms
from hpcgraft.method.pruning import RESULTS_FILE
from hpcgraft.method.validity import DEFAULT_ENTROPY_BELOW, LayerStats, analyze_state
from hpcgraft.storage.run import build_model, holds_run, peer_states, read_config
from hpcgraft.storage.runlog import GRAFTS, METRICS, STATUS, read_jsonl


@dataclass
class Run:
    """One run directory's config and logs, the last row kept where a resumed run logged an epoch twice."""

    path: Path
    cfg: Config
    rows: dict[tuple[int, int], dict[str, Any]]  # (epoch, peer) -> metrics row
    ensemble: dict[int, float]  # epoch -> ensemble accuracy
    grafts: list[dict[str, Any]]  # graft.jsonl rows that carry a report (skipped rounds left out)
    state: str = "unknown"
    name: str = ""
    filters: int | None = None  # conv filters of the model, the denominator of the invalid counts
    peers: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)

    @property
    def is_baseline(self) -> bool:
        return self.cfg.graft.mode == "none" and self.cfg.cultivate.lambda_ == 0

    @property
    def method(self) -> str:
        """What the run did, in the papers' words."""
        g, parts = self.cfg.graft, []
        if g.mode == "peers":
            parts.append(f"grafting ({g.level} level, {g.topology})")
        elif g.mode in ("noise", "self"):
            parts.append(f"grafting from {'noise' if g.mode == 'noise' else 'its own filters'} ({g.level} level)")
        if self.cfg.cultivate.lambda_ > 0:
            parts.append(f"cultivation (lambda={self.cfg.cultivate.lambda_:g}, T={self.cfg.cultivate.temperature:g})")
        text = " + ".join(parts) or "baseline (independent peers)"
        return text + (", dlr" if self.cfg.train.dlr and len(self.peers) > 1 else "")

    def accuracy(self, peer: int) -> list[tuple[int, float]]:
        return [(e, self.rows[e, peer]["test_acc"]) for e in self.epochs if (e, peer) in self.rows]

    def final(self, peer: int, key: str = "test_acc") -> Any:
        last = [self.rows[e, peer][key] for e in self.epochs if (e, peer) in self.rows]
        return last[-1] if last else None

    def best(self, peer: int) -> float | None:
        accs = [a for _, a in self.accuracy(peer)]
        return max(accs) if accs else None


def load_run(path: str | Path) -> Run:
    """A run directory written by ``python -m hpcgraft.train --out PATH``."""
    p = Path(path)
    if not (p / METRICS).is_file() or not holds_run(p):
        raise InputError(f"{p} holds no config.yaml and {METRICS}; give the --out directory of a run "
                         "(python -m hpcgraft.train --out RUN_DIR) that has finished at least one epoch")
    cfg = read_config(p).cfg  # type: ignore[union-attr] - a directory always has a config or an error
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    ensemble: dict[int, float] = {}
    for row in read_jsonl(p / METRICS):
        if row.get("peer") is None:
            ensemble[row["epoch"]] = row["ensemble_acc"]
        else:
            rows[row["epoch"], row["peer"]] = row
    grafts = [g for g in read_jsonl(p / GRAFTS) if g.get("layers")]
    run = Run(p, cfg, rows, ensemble, grafts, state=_state(p))
    run.peers = sorted({peer for _, peer in rows})
    run.epochs = sorted({e for e, _ in rows})
    run.filters = conv_filters(cfg)
    return run


def _state(p: Path) -> str:
    f = p / STATUS
    return json.loads(f.read_text()).get("state", "unknown") if f.is_file() else "unknown"


def conv_filters(cfg: Config) -> int | None:
    """Output filters of all conv layers of the run's model (None if the model cannot be built here)."""
    try:
        model = build_model(cfg, cfg.model.num_classes or 10)
    except (ConfigError, TypeError):
        return None
    return sum(int(n.numel()) for n in filter_l1_norms(model.state_dict()).values())


def layer_invalid(run: Run, thresholds: list[float]) -> tuple[str, list[LayerStats]] | None:
    """Per-layer invalid filters of peer 0 in the run's newest checkpoint (None without checkpoints)."""
    if not (run.path / "checkpoints").is_dir():
        return None
    try:
        states = peer_states(run.path, peer=0)
    except InputError:
        return None
    label, state = next(iter(states.items()))
    return label, analyze_state(state, thresholds, DEFAULT_ENTROPY_BELOW, run.cfg.graft.bins)


def name_runs(runs: list[Run]) -> None:
    """Short unique names: the directory name, with as many parent directories as it takes."""
    parts = [r.path.resolve().parts for r in runs]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            break
        depth += 1
    for r, p in zip(runs, parts, strict=True):
        r.name = "/".join(p[-depth:])


def prune_results(runs: list[Run]) -> list[dict[str, Any]]:
    """The prune.json files directly below the run directories (the pruning command's --out)."""
    return [json.loads(p.read_text()) for r in runs for p in sorted(r.path.glob(f"*/{RESULTS_FILE}"))]


SWEEP_FILE = "sweep.json"  # written by hpcgraft.sweep: {"config", "overrides", "arms": {name: overrides}, "seeds"}


def load_sweep(path: str | Path) -> dict[str, dict[int, Run | None]]:
    """A sweep directory's runs: arm -> seed -> the run (None where it has not logged an epoch yet)."""
    p = Path(path)
    try:
        spec = json.loads((p / SWEEP_FILE).read_text())
        arms, seeds = list(spec["arms"]), [int(s) for s in spec["seeds"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{p / SWEEP_FILE} cannot be read ({exc}); give a directory made by python -m "
                         "hpcgraft.sweep") from None
    found: dict[str, dict[int, Run | None]] = {}
    for arm in arms:
        found[arm] = {}
        for seed in seeds:
            d = p / arm / f"seed{seed}"
            found[arm][seed] = load_run(d) if (d / METRICS).is_file() else None
    return found

