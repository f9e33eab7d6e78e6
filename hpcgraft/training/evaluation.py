"""Top-1 and top-5 accuracy of peers and of their ensemble, and the weights to evaluate or start from.

The ensemble is the one of training's ``ensemble_acc``: the arg-max of the peers' summed (equivalently,
mean) softmax. The training loop, ``python -m hpcgraft.evaluate`` and anything else that scores peers
(pruning) share these functions, so a number printed by one means the same in the others:

- :func:`predict` runs one model over a loader (softmax and labels);
- :func:`score` turns the peers' softmax into per-peer and ensemble top-1/top-5 (:class:`Evaluation`);
- :func:`evaluate_models` is both in one call, for models held in memory;
- :func:`evaluate_saved` is the evaluate command's: a run, checkpoint or file read, its models built as
  training builds them, and scored on the run's test set (or the one the overrides name);
- :func:`init_state` reads the weights ``train.init_from`` names (a run is read by
  :mod:`hpcgraft.storage.run`, as every command reads it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpcgraft.config import load_config
from hpcgraft.data import BatchLoader, build_datasets
from hpcgraft.errors import CheckpointError, ConfigError, InputError
from hpcgraft.storage import run
from hpcgraft.storage.checkpoints import peer_file
from hpcgraft.storage.statefile import State, load_states
from hpcgraft.training.peer import select_device

TOP5_MIN_CLASSES = 11  # metrics.jsonl records top-5 only where it says something: more than 10 classes
PEER_FIELD = "{peer}"  # in train.init_from: replaced by each peer's index (one file per peer)


# ------------------------------------------------------------------------------------------ scoring
def topk_correct(probs: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows have their label among their ``k`` highest scores (k capped at the classes)."""
    if len(labels) == 0:
        return 0
    top = probs.topk(min(k, probs.shape[1]), dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


@torch.no_grad()
def predict(model: nn.Module, loader: BatchLoader, device: torch.device, *, channels_last: bool = False,
            autocast: Callable[[torch.Tensor], contextlib.AbstractContextManager] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32, CPU) of ``model`` in eval mode over the loader's batches, and their labels."""
    model.eval()
    probs, labels = [], []
    for x, y in loader.epoch(0):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x) if autocast is not None else contextlib.nullcontext():
            probs.append(F.softmax(model(x).float(), dim=1).cpu())
        labels.append(y.cpu())
    p = torch.cat(probs) if probs else torch.zeros(0, 1)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    return p, y


@dataclass
class Evaluation:
    """Accuracies in percent; ``ensemble_*`` is None for a single model."""

    labels: list[str]
    top1: list[float]
    top5: list[float]
    ensemble_top1: float | None
    ensemble_top5: float | None
    images: int
    classes: int

    def to_dict(self) -> dict[str, Any]:
        peers = [{"label": label, "top1": a, "top5": b} for label, a, b in zip(self.labels, self.top1, self.top5,
                                                                              strict=True)]
        ensemble = None if self.ensemble_top1 is None else {"top1": self.ensemble_top1, "top5": self.ensemble_top5}
        return {"images": self.images, "classes": self.classes, "peers": peers, "ensemble": ensemble}

    def table(self) -> str:
        rows = [f"{'model':<40} {'top-1':>7} {'top-5':>7}"]
        rows += [f"{label:<40} {a:7.2f} {b:7.2f}" for label, a, b in zip(self.labels, self.top1, self.top5,
                                                                          strict=True)]
        if self.ensemble_top1 is not None:
            rows.append(f"{'ensemble (mean softmax)':<40} {self.ensemble_top1:7.2f} {self.ensemble_top5:7.2f}")
        return "\n".join(rows)


def score(labels: Sequence[str], probs: Sequence[torch.Tensor], targets: torch.Tensor) -> Evaluation:
    """Per-model and ensemble top-1/top-5 of the models' softmax ``probs`` on the same ``targets``."""
    n = max(1, len(targets))

    def pct(count: int) -> float:
        return 100.0 * count / n

    summed = torch.stack(list(probs)).sum(0) if len(probs) > 1 else None
    return Evaluation(
        labels=list(labels),
        top1=[pct(topk_correct(p, targets, 1)) for p in probs],
        top5=[pct(topk_correct(p, targets, 5)) for p in probs],
        ensemble_top1=None if summed is None else pct(topk_correct(summed, targets, 1)),
        ensemble_top5=None if summed is None else pct(topk_correct(summed, targets, 5)),
        images=len(targets), classes=probs[0].shape[1] if probs else 0,
    )


def evaluate_models(models: Mapping[str, nn.Module], loader: BatchLoader, device: torch.device) -> Evaluation:
    """Every model over the same evaluation batches, then :func:`score`."""
    results = [predict(m, loader, device) for m in models.values()]
    return score(list(models), [p for p, _ in results], results[0][1] if results else torch.zeros(0))


def evaluate_saved(path: Path, *, peer: int | None = None, best: bool = False, config: str | None = None,
                   overrides: Sequence[str] = (), device: str = "auto") -> dict[str, Any]:
    """Evaluate what ``path`` holds on the run's test set (or the one the overrides name); the JSON record
    (with ``table``, the printed form)."""
    if peer is not None and peer < 0:
        raise ConfigError(f"--peer {peer} is negative; peers are numbered from 0")
    if not path.exists():
        raise InputError(f"{path} does not exist; give a run directory, a checkpoint, a peer .h5 file or a .pt file")
    states = run.peer_states(path, peer=peer, use_best=best)
    if config is not None:
        cfg = load_config(config, list(overrides))
    else:
        trained = run.read_config(path)
        if trained is None:
            raise ConfigError(f"{path} holds weights only; pass --config with the YAML it was trained with (a "
                              "configs/*.yaml or the run's config.yaml) to build its model")
        cfg = run.with_overrides(trained.cfg, list(overrides))
    _, test_set = build_datasets(cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.data.reference)
    dev = select_device(device, 0)
    num_classes = cfg.model.num_classes or test_set.num_classes
    models = {label: run.load_model(cfg, state, f"{path} ({label})", num_classes=num_classes, device=dev)
              for label, state in states.items()}
    result = evaluate_models(models, BatchLoader(test_set, cfg.data.test_batch_size, shuffle=False), dev)
    return {"source": str(path), "data": cfg.data.name, "data_root": cfg.data.root, "model": cfg.model.name,
            **result.to_dict(), "table": result.table()}


# ------------------------------------------------------------------------------------------ weights
def init_state(spec: str, peer: int, peers: int) -> tuple[State, str]:
    """The state ``train.init_from`` gives ``peer`` of ``peers``, and where it came from.

    ``spec``: a .pt state dict or peer .h5 file (the same for every peer); a checkpoint or run directory
    with K peers (peer i from peer i; K must equal the run's peers, or be 1); or a path holding
    ``{peer}``, filled with each peer's index (one file per peer)."""
    path = Path(spec.replace(PEER_FIELD, str(peer)))
    try:
        if path.is_dir():
            info = run.latest(path)
            if info.peers not in (1, peers):
                raise ConfigError(f"train.init_from={spec} holds {info.peers} peers but this run has {peers}; give "
                                  f"one peer's file ({info.path / peer_file(0)}) for all, or start {info.peers} peers")
            own = peer if info.peers == peers else 0
            return next(iter(load_states(info.path / peer_file(own)).values())), f"{info.path / peer_file(own)}"
        states = load_states(path)
    except (CheckpointError, InputError) as exc:
        raise ConfigError(f"train.init_from={spec}: {exc}") from None
    return next(iter(states.values())), str(path)
